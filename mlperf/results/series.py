"""MLPerf result series: runs laid out as a submission tree, trained, checked and scored.

A series is one folder, `<results_dir>/<series>/`, laid out as MLPerf's submission tree:

    <series>/series.json                         settings and the seeds drawn once for the series
    <series>/systems/<system>.json               the system description (mlperf.results.system_desc)
    <series>/results/<system>/maskrcnn/result_<i>.txt   one MLPerf log per run
    <series>/attempts/                           logs of runs that died before run_stop, kept aside
    <series>/summary.json, summary.md, plot.png  the score and what it came from

`invoke time` starts a new series (named by its start time) unless given --series; a finished
series is never written to again (refused with one line). A series that stopped part way (a crash,
a lost session) resumes under the same name: finished runs are kept, the others run with the seeds
recorded for them. `score_logs` scores a folder of logs someone else wrote (--from-logs).
"""
from __future__ import annotations

import json
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path

from mlperf.errors import UserError
from mlperf.files import rename, write_json
from mlperf.results.logs import RESULT_NAME, RunLog, parse_log, result_files
from mlperf.results.report import report, write_summary
from mlperf.results.score import evaluate, score
from object_detection.recipe import BENCHMARK, RUNS


def _find_logs_folder(folder: Path) -> Path:
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder: give the folder that holds result_*.txt")
    if result_files(folder):
        return folder
    holders = sorted({p.parent for p in folder.rglob("result_*.txt") if RESULT_NAME.match(p.name)})
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
        from mlperf.results.system_desc import default_system_name

        settings = dict(settings, system=default_system_name())
    rng = random.SystemRandom()
    recorded = dict(settings, name=name, seeds=rng.sample(range(1, 2**31), settings["runs"]),
                    created=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    write_json(meta, recorded, indent=2)
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
    from mlperf.results import system_desc

    logs = list((parsed or {}).values())
    sub = next((log.submission for log in logs if log.submission), {})
    config = s.settings.get("config") or next((log.config for log in logs if log.config), None)
    desc = system_desc.detect_system(
        s.system, submitter=sub.get("org", ""), division=sub.get("division", ""),
        status=sub.get("status", ""), sw_notes=config_note(config))
    path = s.root / "systems" / f"{s.system}.json"
    write_json(path, desc, indent=4)
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
        raise UserError(f"--runs must be at least 1 (got {runs}); MLPerf scores {RUNS}")
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
                      max_epochs=s.settings.get("max_epochs"), resume=False, device=None, log=partial,
                      ruleset=s.settings["ruleset"])
    finished = partial.exists() and parse_log(partial).status is not None
    if finished:
        rename(partial, final)
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
    rename(partial, target)
