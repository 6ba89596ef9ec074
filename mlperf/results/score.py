"""Scoring a series the way MLPerf Training does.

A run's time is run_stop - run_start; a run that did not end with status success, or whose log
fails the compliance checker, is dropped and counts as the slowest; the fastest and the slowest
runs are set aside and the rest averaged. More than one dropped run: no score. mlperf_logging's own
result_summarizer is not used: its compute_score crashes in 4.1.68.
"""
from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from mlperf.files import shown
from mlperf.results.logs import RunLog, check_compliance, check_rcp, compliance_rulesets, parse_log, rcp_rulesets
from object_detection.recipe import RUNS


@dataclass
class RunResult:
    """One run as the score sees it."""
    index: int
    path: str | None
    minutes: float | None
    status: str                     # success, aborted, crashed (no run_stop), missing
    compliant: bool | None          # None: not checked (no log)
    messages: list[str]
    epochs: float | None            # epoch at which the targets were met (a run that did not: epochs run)
    bbox: float | None              # last evaluation
    segm: float | None
    seed: int | None = None
    dropped: bool = False
    reason: str = ""                # why it was dropped
    skipped: list[str] = field(default_factory=list)   # log lines the reader left out, each with why


@dataclass
class Score:
    minutes: float | None           # None: no score
    kind: str                       # "mlperf", "olympic" (N != 5, or RCP failed), "mean" (N < 3), "none"
    note: str                       # one sentence a person reads
    used: list[int]                 # run indices averaged
    dropped: list[int]
    rcp: str = ""                   # the RCP checker's verdict (closed division), or why it was not run


def run_result(index: int, log: RunLog | None, compliance: tuple[bool, list[str]] | None,
               crashed_rc: int | None = None) -> RunResult:
    """Combine a parsed log and its compliance verdict into a RunResult, deciding whether it is dropped."""
    if log is None:
        status = "crashed" if crashed_rc is not None else "missing"
        reason = f"trainer exited {crashed_rc} before run_stop" if crashed_rc is not None else "no log"
        return RunResult(index, None, None, status, None, [], None, None, None, dropped=True, reason=reason)
    ok, messages = compliance if compliance is not None else (None, [])
    last = log.evals[-1] if log.evals else None
    status = log.status or "crashed"
    result = RunResult(
        index=index, path=str(log.path), minutes=log.minutes, status=status, compliant=ok,
        messages=messages, epochs=log.converged_epoch if status == "success" else log.epochs_run,
        bbox=last[2] if last else None, segm=last[3] if last else None, seed=log.seed, skipped=list(log.skipped))
    if status != "success":
        result.dropped, result.reason = True, f"run_stop status {shown(status)}" if log.status else "no run_stop"
    elif log.minutes is None:
        result.dropped, result.reason = True, "no run_start"
    elif not (math.isfinite(log.minutes) and log.minutes > 0):
        result.dropped = True
        result.reason = (f"run time {log.minutes:.2f} minutes: run_stop does not come after run_start"
                         if math.isfinite(log.minutes) else "run time is not a finite number")
        result.minutes = None if not math.isfinite(log.minutes) else log.minutes
    elif ok is False:
        result.dropped, result.reason = True, "fails the compliance checker"
    return result


def score(runs: list[RunResult]) -> Score:
    """MLPerf's olympic score over the runs, with a defined answer for N != 5.

    N >= 3: a dropped run is the slowest; set aside the fastest and the slowest, average the rest;
    more than one dropped: no score. N == 5 is an MLPerf score; other N >= 3 use the same rule but are
    marked as not one. N < 3: the mean of the successful runs, marked "not an MLPerf score".
    """
    n = len(runs)
    dropped = [r.index for r in runs if r.dropped]
    ok = sorted((r for r in runs if not r.dropped), key=lambda r: r.minutes)
    if n == 0:
        return Score(None, "none", "no runs: no score", [], [])
    if n < 3:
        if not ok:
            return Score(None, "none", "no successful run: no score", [], dropped)
        used = [r.index for r in ok]
        mean = sum(r.minutes for r in ok) / len(ok)
        return Score(mean, "mean", f"mean of {len(ok)} successful run(s) of {n}: not an MLPerf score "
                     f"(MLPerf scores {RUNS} runs)", used, dropped)
    if len(dropped) > 1:
        return Score(None, "none", f"{len(dropped)} runs dropped ({', '.join(map(str, dropped))}): "
                     "no score (MLPerf allows one)", [], dropped)
    kept = ok[1:] if dropped else ok[1:-1]          # the dropped run is the slowest one set aside
    mean = sum(r.minutes for r in kept) / len(kept)
    used = sorted(r.index for r in kept)
    what = f"mean of the middle {len(kept)} of {n} runs"
    if n == RUNS:
        return Score(mean, "mlperf", f"{what}: MLPerf score", used, dropped)
    return Score(mean, "olympic", f"{what}: not an MLPerf score (MLPerf scores {RUNS} runs)",
                 used, dropped)


def judge_convergence(sc: Score, parsed: dict[int, RunLog], folder: Path, ruleset: str) -> Score:
    """A closed-division score is an MLPerf score only if the RCP checker accepts the runs'
    convergence (mlperf-logging's own check, as the package checker makes it). Rulesets from before
    RCPs existed (0.6, 0.7) are scored as MLCommons scored them then: without one."""
    divisions = {log.submission.get("division") for log in parsed.values()}
    if divisions != {"closed"}:
        sc.rcp = "not checked: open division (RCPs judge closed-division runs only)"
        return sc
    if ruleset not in rcp_rulesets():
        sc.rcp = f"not applicable (ruleset {ruleset} predates RCPs)"
        return sc
    ok, verdict = check_rcp(folder, ruleset)
    sc.rcp = verdict
    if sc.kind == "mlperf" and not ok:
        sc.kind = "olympic"
        sc.note = sc.note.replace(": MLPerf score", f": not an MLPerf score (the RCP check failed: {verdict})")
    return sc


def suggest_ruleset(runs: list[RunResult], parsed: dict[int, RunLog], ruleset: str) -> str | None:
    """When every run fails `ruleset`'s compliance checker, another ruleset their logs pass (an
    older round's logs, say), in words; None when some pass or none does."""
    if not runs or any(r.compliant is not False for r in runs):
        return None
    first = parsed[min(parsed)].path
    for other in compliance_rulesets():
        if other != ruleset and check_compliance(first, other)[0]:
            return f"every run fails ruleset {ruleset}, and they pass {other}: score them with --ruleset {other}"
    return None


def evaluate(logs: dict[int, Path], ruleset: str, *, crashed: dict[int, int] | None = None,
             expected: int | None = None) -> tuple[list[RunResult], dict[int, RunLog]]:
    """Parse and compliance-check every log (in parallel: the checker is a process each), as RunResults.

    `crashed` maps run index to a trainer exit code for runs that left no finished log; `expected`
    pads the list with missing runs up to that count.
    """
    parsed = {i: parse_log(p) for i, p in logs.items()}
    with ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
        verdicts = dict(zip(parsed, pool.map(lambda p: check_compliance(p, ruleset), logs.values())))
    indices = set(parsed) | set(crashed or {}) | set(range(expected or 0))
    runs = [run_result(i, parsed.get(i), verdicts.get(i), (crashed or {}).get(i)) for i in sorted(indices)]
    return runs, parsed
