"""MLPerf result series: runs laid out as a submission, compliance checks, scoring, summary, plot.

A series is one folder, `<results_dir>/<series>/`, laid out as MLPerf's submission tree:

    <series>/series.json                         settings and the seeds drawn once for the series
    <series>/systems/<system>.json               the system description (mlperf.system)
    <series>/results/<system>/maskrcnn/result_<i>.txt   one MLPerf log per run
    <series>/attempts/                           logs of runs that died before run_stop, kept aside
    <series>/summary.json, summary.md, plot.png  the score and what it came from

`invoke time` starts a new series (named by its start time) unless given --series; a finished
series is never written to again (refused with one line). A series that stopped part way (a crash,
a lost session) resumes under the same name: finished runs are kept, the others run with the seeds
recorded for them.

Scoring follows MLPerf Training: a run's time is run_stop - run_start; a run that did not end with
status success, or whose log fails the compliance checker, is dropped and counts as the slowest;
the fastest and the slowest runs are set aside and the rest averaged. More than one dropped run: no
score. mlperf_logging's own result_summarizer is not used: its compute_score crashes in 4.1.68.
"""
from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mlperf.errors import UserError

BENCHMARK = "maskrcnn"
MLPERF_RUNS = 5                    # result files MLPerf requires for maskrcnn
MLPERF_TARGETS = {"BBOX": 0.377, "SEGM": 0.339}
_MLLOG = re.compile(r":::MLLOG\s+(\{.*\})\s*$")
_RESULT = re.compile(r"^result_(\d+)\.txt$")


# ---------------------------------------------------------------------------------------------
# Reading logs


@dataclass
class RunLog:
    """What one MLPerf log says about its run."""
    path: Path
    run_start_ms: int | None = None
    run_stop_ms: int | None = None
    status: str | None = None                      # run_stop's status: success, aborted; None: no stop
    evals: list[tuple[int, float | None, float, float]] = field(default_factory=list)  # ms, epoch, BBOX, SEGM
    targets: dict[str, float] = field(default_factory=lambda: dict(MLPERF_TARGETS))
    targets_from_log: bool = False
    submission: dict[str, str] = field(default_factory=dict)   # org, division, status, platform
    seed: int | None = None
    throughput: str | None = None
    config: str | None = None                      # the named system configuration, if the log says

    @property
    def minutes(self) -> float | None:
        if self.run_start_ms is None or self.run_stop_ms is None:
            return None
        return (self.run_stop_ms - self.run_start_ms) / 60000.0

    @property
    def converged_epoch(self) -> float | None:
        """Epoch of the first evaluation that met both targets (None if none did)."""
        for _, epoch, bbox, segm in self.evals:
            if bbox >= self.targets["BBOX"] and segm >= self.targets["SEGM"]:
                return epoch
        return None


def parse_log(path: Path) -> RunLog:
    """Read the :::MLLOG lines of a result file (other lines, e.g. a rank prefix or noise, are skipped)."""
    log = RunLog(path=Path(path))
    try:
        text = log.path.read_text(errors="replace")
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror}") from None
    for line in text.splitlines():
        m = _MLLOG.search(line)
        if not m:
            continue
        try:
            rec = json.loads(m.group(1))
        except json.JSONDecodeError:
            continue
        key, value = rec.get("key"), rec.get("value")
        meta = rec.get("metadata") or {}
        t = rec.get("time_ms")
        if key == "run_start" and log.run_start_ms is None:
            log.run_start_ms = t
        elif key == "run_stop":
            log.run_stop_ms, log.status = t, meta.get("status")
            log.throughput = meta.get("throughput")
        elif key == "eval_accuracy" and isinstance(value, dict) and "BBOX" in value and "SEGM" in value:
            log.evals.append((t, meta.get("epoch_num"), float(value["BBOX"]), float(value["SEGM"])))
        elif key in ("submission_org", "submission_division", "submission_status", "submission_platform"):
            log.submission[key.removeprefix("submission_")] = str(value)
        elif key == "seed" and log.seed is None:
            log.seed = value
        elif key in ("config_name", "system_config") and isinstance(value, str):
            log.config = value
        elif isinstance(value, dict) and "target" in key and "BBOX" in value and "SEGM" in value:
            # an open-division run's own quality targets, e.g. {"key": "quality_target", "value": {...}}
            log.targets = {"BBOX": float(value["BBOX"]), "SEGM": float(value["SEGM"])}
            log.targets_from_log = True
        elif key in ("bbox_target", "segm_target") and isinstance(value, (int, float)):
            log.targets[key.split("_")[0].upper()] = float(value)
            log.targets_from_log = True
    return log


def result_files(folder: Path) -> dict[int, Path]:
    """result_<i>.txt files of a folder by run index."""
    found = {}
    for p in Path(folder).glob("result_*.txt"):
        m = _RESULT.match(p.name)
        if m and p.is_file():
            found[int(m.group(1))] = p
    return dict(sorted(found.items()))


# ---------------------------------------------------------------------------------------------
# Compliance


def check_compliance(path: Path, ruleset: str) -> tuple[bool, list[str]]:
    """Run the MLCommons compliance checker (training usage) on one log: (passed, its messages).

    Messages are the checker's WARNING/ERROR lines without the level prefix, e.g. the failed rule;
    the final FAILED/SUCCESS verdict is in the bool.
    """
    with tempfile.TemporaryDirectory(prefix="mlperf-compliance-") as tmp:
        try:
            proc = subprocess.run(
                [sys.executable, "-m", "mlperf_logging.compliance_checker", "--usage", "training",
                 "--ruleset", ruleset, "--log_output", os.path.join(tmp, "checker.log"), str(path)],
                capture_output=True, text=True, timeout=300, cwd=tmp)
        except subprocess.TimeoutExpired:
            return False, ["compliance checker did not finish within 300 s"]
    output = proc.stdout + proc.stderr
    messages = []
    for line in output.splitlines():
        m = re.match(r"^(WARNING|ERROR)\s+-\s+(.*)$", line)
        if m and m.group(2).strip() != "FAILED":
            messages.append(m.group(2).strip())
        elif "Traceback" in line or line.startswith(("usage:", "mlperf_logging")):
            messages.append(line.strip())
    ok = proc.returncode == 0 and re.search(r"^INFO\s+-\s+SUCCESS", output, re.M) is not None
    if not ok and not messages:
        messages.append(output.strip().splitlines()[-1] if output.strip()
                        else f"checker exited {proc.returncode}")
    return ok, messages


# ---------------------------------------------------------------------------------------------
# Scoring


@dataclass
class RunResult:
    """One run as the score sees it."""
    index: int
    path: str | None
    minutes: float | None
    status: str                     # success, aborted, crashed (no run_stop), missing
    compliant: bool | None          # None: not checked (no log)
    messages: list[str]
    epochs: float | None            # epoch at which the targets were met
    bbox: float | None              # last evaluation
    segm: float | None
    seed: int | None = None
    dropped: bool = False
    reason: str = ""                # why it was dropped


@dataclass
class Score:
    minutes: float | None           # None: no score
    kind: str                       # "mlperf", "olympic" (N != 5), "mean" (N < 3), "none"
    note: str                       # one sentence a person reads
    used: list[int]                 # run indices averaged
    dropped: list[int]


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
        messages=messages, epochs=log.converged_epoch if status == "success" else None,
        bbox=last[2] if last else None, segm=last[3] if last else None, seed=log.seed)
    if status != "success":
        result.dropped, result.reason = True, f"run_stop status {status}" if log.status else "no run_stop"
    elif log.minutes is None:
        result.dropped, result.reason = True, "no run_start"
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
                     f"(MLPerf scores {MLPERF_RUNS} runs)", used, dropped)
    if len(dropped) > 1:
        return Score(None, "none", f"{len(dropped)} runs dropped ({', '.join(map(str, dropped))}): "
                     "no score (MLPerf allows one)", [], dropped)
    kept = ok[1:] if dropped else ok[1:-1]          # the dropped run is the slowest one set aside
    mean = sum(r.minutes for r in kept) / len(kept)
    used = sorted(r.index for r in kept)
    what = f"mean of the middle {len(kept)} of {n} runs"
    if n == MLPERF_RUNS:
        return Score(mean, "mlperf", f"{what}: MLPerf score", used, dropped)
    return Score(mean, "olympic", f"{what}: not an MLPerf score (MLPerf scores {MLPERF_RUNS} runs)",
                 used, dropped)


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


# ---------------------------------------------------------------------------------------------
# Reporting


def format_table(runs: list[RunResult]) -> str:
    """The per-run table, as Markdown (readable as plain text too)."""
    def num(x, fmt):
        return format(x, fmt) if x is not None else "-"

    rows = ["| run | minutes | epochs | BBOX | SEGM | status | compliance |",
            "| ---: | ---: | ---: | ---: | ---: | --- | --- |"]
    for r in runs:
        compliance = {True: "pass", False: "FAIL", None: "-"}[r.compliant]
        status = r.status + (" (dropped)" if r.dropped else "")
        epochs = num(r.epochs, "g") if r.epochs is not None else "-"
        rows.append(f"| {r.index} | {num(r.minutes, '.2f')} | {epochs} | {num(r.bbox, '.4f')} | "
                    f"{num(r.segm, '.4f')} | {status} | {compliance} |")
    return "\n".join(rows)


def format_score(s: Score) -> str:
    if s.minutes is None:
        return f"score: none: {s.note}"
    return f"score: {s.minutes:.2f} minutes ({s.note}; runs {', '.join(map(str, s.used))})"


def _atomic_write(path: Path, data: str | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    if isinstance(data, bytes):
        tmp.write_bytes(data)
    else:
        tmp.write_text(data)
    os.replace(tmp, path)


def plot(parsed: dict[int, RunLog], path: Path, title: str) -> None:
    """Eval accuracy against minutes since run_start, a colour per run: BBOX solid, SEGM dashed, targets."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=100)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    targets = next((log.targets for log in parsed.values() if log.targets_from_log), MLPERF_TARGETS)
    for n, (i, log) in enumerate(sorted(parsed.items())):
        if not log.evals or log.run_start_ms is None:
            continue
        c = colours[n % len(colours)]
        xs = [(t - log.run_start_ms) / 60000 for t, *_ in log.evals]
        ax.plot(xs, [e[2] for e in log.evals], "-", color=c, marker=".", label=f"run {i} BBOX")
        ax.plot(xs, [e[3] for e in log.evals], "--", color=c, marker=".", label=f"run {i} SEGM")
    ax.axhline(targets["BBOX"], color="black", linestyle="-", linewidth=1,
               label=f"BBOX target {targets['BBOX']:g}")
    ax.axhline(targets["SEGM"], color="black", linestyle="--", linewidth=1,
               label=f"SEGM target {targets['SEGM']:g}")
    ax.set_xlabel("minutes since run_start")
    ax.set_ylabel("eval accuracy (COCO mAP)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="lower right")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(tmp, format="png")
    plt.close(fig)
    os.replace(tmp, path)


def write_summary(out_dir: Path, *, name: str, runs: list[RunResult], parsed: dict[int, RunLog],
                  sc: Score, ruleset: str, extra: dict | None = None) -> dict:
    """summary.json, summary.md and plot.png in out_dir; returns the summary mapping."""
    targets = next((log.targets for log in parsed.values() if log.targets_from_log), MLPERF_TARGETS)
    first = next(iter(parsed.values()), None)
    summary = {
        "name": name,
        "benchmark": BENCHMARK,
        "ruleset": ruleset,
        "division": first.submission.get("division", "") if first else "",
        "platform": first.submission.get("platform", "") if first else "",
        "targets": targets,
        "score": asdict(sc),
        "runs": [asdict(r) for r in runs],
        **(extra or {}),
    }
    _atomic_write(out_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    md = [f"# {BENCHMARK} result series `{name}`", "",
          f"Ruleset {ruleset}; quality targets BBOX {targets['BBOX']:g}, SEGM {targets['SEGM']:g}.", "",
          format_table(runs), "", format_score(sc), ""]
    reasons = [f"- run {r.index}: {r.reason}" + (f": {r.messages[0]}" if r.messages else "")
               for r in runs if r.dropped]
    if reasons:
        md += ["Dropped runs:", "", *reasons, ""]
    md += ["![eval accuracy against time](plot.png)", ""]
    _atomic_write(out_dir / "summary.md", "\n".join(md))
    plot(parsed, out_dir / "plot.png", f"{BENCHMARK} {name}: eval accuracy")
    return summary


def report(runs: list[RunResult], sc: Score, out_dir: Path) -> None:
    print(format_table(runs))
    for r in runs:
        if r.dropped:
            detail = f": {r.messages[0]}" if r.messages else ""
            print(f"run {r.index} dropped: {r.reason}{detail}")
    print(format_score(sc))
    print(f"summary: {out_dir / 'summary.md'}, {out_dir / 'summary.json'}, plot {out_dir / 'plot.png'}")


# ---------------------------------------------------------------------------------------------
# Scoring existing logs (--from-logs)


def _find_logs_folder(folder: Path) -> Path:
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder: give the folder that holds result_*.txt")
    if result_files(folder):
        return folder
    holders = sorted({p.parent for p in folder.rglob("result_*.txt") if _RESULT.match(p.name)})
    if len(holders) == 1:
        return holders[0]
    if not holders:
        raise UserError(f"no result_*.txt in {folder}: give the folder that holds the MLPerf logs")
    raise UserError(f"{folder} holds result files in {len(holders)} folders "
                    f"({', '.join(str(h) for h in holders[:3])}...): give one of them")


def score_logs(folder: Path, *, ruleset: str, results_dir: Path) -> dict:
    """Score a folder of result_*.txt without training (e.g. published results, to compare).

    The input folder is never written to (it may be someone's published submission, and root ignores
    permission bits, so "writable" proves nothing): the summary goes to <results_dir>/scores/<name>/.
    """
    folder = _find_logs_folder(Path(folder))
    logs = result_files(folder)
    runs, parsed = evaluate(logs, ruleset)
    sc = score(runs)
    name = folder.name if folder.name != BENCHMARK else f"{folder.parent.name}-{BENCHMARK}"
    out_dir = Path(results_dir) / "scores" / name
    summary = write_summary(out_dir, name=name, runs=runs, parsed=parsed, sc=sc, ruleset=ruleset,
                            extra={"logs": str(folder.resolve())})
    report(runs, sc, out_dir)
    return summary


# ---------------------------------------------------------------------------------------------
# Running a series (run_and_time)


@dataclass
class Series:
    """A result series folder and its recorded settings."""
    root: Path
    settings: dict

    @property
    def system(self) -> str:
        return self.settings["system"]

    @property
    def logs_dir(self) -> Path:
        return self.root / "results" / self.system / BENCHMARK

    def log(self, i: int) -> Path:
        return self.logs_dir / f"result_{i}.txt"

    def finished(self) -> dict[int, Path]:
        """Runs whose log reached run_stop (success or aborted): final, never run again."""
        return {i: p for i, p in result_files(self.logs_dir).items()
                if i < self.settings["runs"] and parse_log(p).status is not None}


def _new_series_name(results_dir: Path, dataset: str) -> str:
    base = time.strftime("%Y%m%d-%H%M%S") + f"-{dataset}"
    name, k = base, 1
    while (results_dir / name).exists():
        k += 1
        name = f"{base}-{k}"
    return name


def open_series(results_dir: Path, series: str | None, settings: dict, *,
                finished_ok: bool = False) -> Series:
    """Create a new series, or reopen an unfinished one with the same settings.

    A finished series is refused (UserError) unless finished_ok (invoke all, which then only rescores).
    Seeds are drawn once here and kept in series.json, so a resumed series reuses them.
    """
    results_dir = Path(results_dir)
    name = series or _new_series_name(results_dir, settings["dataset"])
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise UserError(f"series name {name!r} must be a plain name (letters, digits, '.', '_', '-')")
    root = results_dir / name
    meta = root / "series.json"
    if meta.is_file():
        recorded = json.loads(meta.read_text())
        wanted = {k: v for k, v in settings.items() if v is not None}
        differ = [k for k, v in wanted.items() if k != "system" and recorded.get(k) != v]
        if differ:
            raise UserError(f"series {name} was started with other settings "
                            f"({', '.join(f'{k}={recorded.get(k)!r}' for k in differ)}): "
                            "resume it with those, or choose a new --series name")
        s = Series(root, recorded)
        done = s.finished()
        if len(done) >= recorded["runs"] and not finished_ok:
            raise UserError(f"series {name} is finished ({len(done)} runs in {s.logs_dir}) and is never "
                            "overwritten: choose a new --series name, or score it with --from-logs")
        return s
    if root.exists() and any(root.rglob("result_*.txt")):
        raise UserError(f"{root} holds result files that are not a series of this tool; they are left "
                        "untouched: choose another --series name or --results-dir")
    if not settings.get("system"):
        from mlperf.system import default_system_name

        settings = dict(settings, system=default_system_name())
    rng = random.SystemRandom()
    recorded = dict(settings, name=name, seeds=rng.sample(range(1, 2**31), settings["runs"]),
                    created=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    _atomic_write(meta, json.dumps(recorded, indent=2) + "\n")
    return Series(root, recorded)


def config_note(name: str | None) -> str:
    """sw_notes text for the named system configuration the runs used ("" when not known)."""
    if not name:
        return ""
    from mlperf import launch

    try:
        described = launch.describe_config(name)
    except UserError:
        return f"system configuration {name}"
    return f"system configuration {name}: " + ", ".join(f"{k}={v}" for k, v in described.items() if k != "name")


def write_system_desc(s: Series, parsed: dict[int, RunLog] | None = None) -> Path:
    """systems/<system>.json: detected hardware, plus submitter/division/status/config from the logs."""
    from mlperf import system

    logs = list((parsed or {}).values())
    sub = next((log.submission for log in logs if log.submission), {})
    config = s.settings.get("config") or next((log.config for log in logs if log.config), None)
    desc = system.detect_system(
        s.system, submitter=sub.get("org", ""), division=sub.get("division", ""),
        status=sub.get("status", ""), sw_notes=config_note(config))
    path = s.root / "systems" / f"{s.system}.json"
    _atomic_write(path, json.dumps(desc, indent=4) + "\n")
    return path


def time_series(*, runs: int, results_dir: Path, system: str | None, ruleset: str, dataset: str,
                data_dir: Path, config: str | None = None, gpus=None, max_epochs=None,
                series: str | None = None, finished_ok: bool = False,
                resume_hint: str | None = None) -> dict:
    """Train `runs` times with distinct seeds into an MLPerf results tree, then check and score it.

    A run whose trainer fails keeps the series going and counts as dropped; its partial log is moved
    to attempts/ so that a later resume runs it again rather than treating it as finished. After the
    summary is written, crashed runs end the call with a UserError that says how to resume.
    """
    if runs < 1:
        raise UserError(f"--runs must be at least 1 (got {runs}); MLPerf scores {MLPERF_RUNS}")
    settings = {"runs": runs, "dataset": dataset, "config": config, "max_epochs": max_epochs,
                "gpus": gpus, "ruleset": ruleset, "system": system}
    s = open_series(Path(results_dir), series, settings, finished_ok=finished_ok)
    print(f"series {s.settings['name']}: {s.root}")
    resume_hint = resume_hint or f"invoke time --series {s.settings['name']} --results-dir {results_dir}"
    write_system_desc(s)
    crashed: dict[int, int] = {}
    done = s.finished()
    for i in range(s.settings["runs"]):
        if i in done:
            print(f"run {i}: finished earlier, kept ({s.log(i)})")
            continue
        crashed_rc = _train_one(s, i, data_dir)
        if crashed_rc is not None:
            crashed[i] = crashed_rc
    logs = {i: p for i, p in s.finished().items()}
    run_list, parsed = evaluate(logs, s.settings["ruleset"], crashed=crashed, expected=s.settings["runs"])
    sc = score(run_list)
    write_system_desc(s, parsed)
    summary = write_summary(s.root, name=s.settings["name"], runs=run_list, parsed=parsed, sc=sc,
                            ruleset=s.settings["ruleset"],
                            extra={"system": s.system, "seeds": s.settings["seeds"],
                                   "dataset": s.settings["dataset"], "config": s.settings.get("config")})
    report(run_list, sc, s.root)
    if crashed:
        codes = ", ".join(f"run {i} exit {rc}" for i, rc in sorted(crashed.items()))
        raise UserError(f"{len(crashed)} run(s) of series {s.settings['name']} crashed ({codes}; output above, "
                        f"partial logs in {s.root / 'attempts'}): fix the cause, then run `{resume_hint}` "
                        "to run them again (finished runs are kept)")
    return summary


def _train_one(s: Series, i: int, data_dir: Path) -> int | None:
    """One training run into result_<i>.txt; the trainer's exit code if it left no finished log."""
    from mlperf import launch

    final = s.log(i)
    partial = final.with_name(final.name + ".partial")
    final.parent.mkdir(parents=True, exist_ok=True)
    if partial.exists():                       # a run that died earlier: keep its log, start afresh
        _set_aside(s, partial, i, "interrupted")
    seed = s.settings["seeds"][i]
    print(f"run {i}/{s.settings['runs']}: seed {seed}, log {final}", flush=True)
    rc = launch.train(dataset=s.settings["dataset"], data_dir=Path(data_dir), gpus=s.settings.get("gpus"),
                      nodes=None, batch_size=None, config=s.settings.get("config"), seed=seed,
                      max_epochs=s.settings.get("max_epochs"), resume=False, device=None, log=partial)
    finished = partial.exists() and parse_log(partial).status is not None
    if finished:
        os.replace(partial, final)
        if rc != 0:
            print(f"run {i}: trainer exited {rc} after run_stop; the log is kept as it ends")
        return None
    print(f"run {i}: trainer exited {rc} without run_stop: dropped; the series continues")
    if partial.exists():
        _set_aside(s, partial, i, f"rc{rc}")
    return rc if rc != 0 else -1


def _set_aside(s: Series, partial: Path, i: int, why: str) -> None:
    attempts = s.root / "attempts"
    attempts.mkdir(parents=True, exist_ok=True)
    target = attempts / f"result_{i}-{time.strftime('%Y%m%d-%H%M%S')}-{why}.txt"
    os.replace(partial, target)
