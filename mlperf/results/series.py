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

import contextlib
import json
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path

from mlperf.errors import UserError
from mlperf.files import LockBusy, exclusive_lock, read_json, rename, shown, write_json
from mlperf.files import writing
from mlperf.results.logs import RESULT_NAME, RunLog, check_ruleset, parse_log, result_files
from mlperf.results.report import report, write_summary
from mlperf.results.score import evaluate, judge_convergence, score, suggest_ruleset
from object_detection.recipe import BENCHMARK, RUNS


def find_logs_folder(folder: Path) -> Path:
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
    check_ruleset(ruleset, for_training=False)
    folder = find_logs_folder(Path(folder))
    logs = result_files(folder)
    with writing("--results-dir", Path(results_dir)):
        return _score_logs(folder, logs, ruleset, Path(results_dir))


def _score_logs(folder: Path, logs: dict[int, Path], ruleset: str, results_dir: Path) -> dict:
    runs, parsed = evaluate(logs, ruleset)
    other = {str(log.benchmark) for log in parsed.values() if log.benchmark != BENCHMARK}
    if other:
        raise UserError(f"{folder} holds logs of another benchmark (submission_benchmark {', '.join(sorted(other))}), "
                        f"not {BENCHMARK}: give the folder of a {BENCHMARK} result")
    sc = judge_convergence(score(runs), parsed, folder, ruleset)
    name = folder.name if folder.name != BENCHMARK else f"{folder.parent.name}-{BENCHMARK}"
    out_dir = _scores_folder(Path(results_dir) / "scores", name, folder)
    summary = write_summary(out_dir, name=out_dir.name, runs=runs, parsed=parsed, sc=sc, ruleset=ruleset,
                            extra={"logs": str(folder.resolve())})
    report(runs, sc, out_dir, hint=suggest_ruleset(runs, parsed, ruleset), model=summary["model"])
    require_score(summary, out_dir)
    return summary


def _scores_folder(scores: Path, name: str, logs: Path) -> Path:
    """scores/<name>/ for these logs: the folder they were scored into before, else a free name
    (name-2, ...): two logs folders of one name never overwrite each other's summary."""
    candidate, k = scores / name, 1
    while (candidate / "summary.json").is_file() and read_json(candidate / "summary.json").get("logs") != \
            str(logs.resolve()):
        k += 1
        candidate = scores / f"{name}-{k}"
    return candidate




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
                finished_ok: bool = False, create: bool = True) -> Series | None:
    """Create a new series, or reopen an unfinished one with the same settings.

    A finished series is refused (UserError) unless finished_ok (invoke all, which then only rescores).
    Seeds are drawn once here and kept in series.json, so a resumed series reuses them. With
    `create` False nothing is written: the refusals are checked, and a new series is None.
    """
    results_dir = Path(results_dir)
    name = series or _new_series_name(results_dir, settings["dataset"])
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise UserError(f"series name {name!r} must be a plain name (letters, digits, '.', '_', '-')")
    root = results_dir / name
    meta = root / "series.json"
    if meta.is_file():
        recorded = read_settings(meta)
        # What a series records of its runs must match; a setting it predates (not in series.json)
        # cannot be compared, and the system and node count are found, not chosen.
        wanted = {k: v for k, v in settings.items() if v is not None and k in recorded}
        differ = [k for k, v in wanted.items() if k not in ("system", "nodes_count") and recorded[k] != v]
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
    if not create:
        return None
    if not settings.get("system"):
        from mlperf.results.system_desc import default_system_name

        settings = dict(settings, system=default_system_name())
    rng = random.SystemRandom()
    recorded = dict(settings, name=name, seeds=rng.sample(range(1, 2**31), settings["runs"]),
                    created=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    write_json(meta, recorded, indent=2)
    return Series(root, recorded)


def read_settings(meta: Path) -> dict:
    """series.json as this tool wrote it; a damaged one (cut off, edited) is a UserError: its seeds
    are the series', and its system names folders."""
    recorded = read_json(meta)
    seeds = recorded.get("seeds")
    if not (isinstance(recorded.get("runs"), int) and isinstance(seeds, list) and len(seeds) == recorded["runs"]
            and all(isinstance(x, int) for x in seeds) and isinstance(recorded.get("system"), str)):
        raise UserError(f"{meta} is damaged (not the settings and seeds this tool writes): restore it, or start "
                        "a new series with another --series name")
    from mlperf.files import UnsafeName, plain_name

    try:
        plain_name(recorded["system"], "its system name")
    except UnsafeName as bad:
        raise UserError(f"{meta}: {bad}: it names a folder of the series, so it must be a plain name") from None
    return recorded


def parse_runs(value) -> int:
    """--runs as a whole number of at least 1 (a flag or invoke.yaml gives text)."""
    text = str(value).strip()
    if not text.isdigit() or int(text) < 1:
        raise UserError(f"--runs must be a whole number of at least 1, not {shown(value)}; MLPerf scores {RUNS}")
    return int(text)


def series_command(settings: dict, results_dir: Path, data_dir: Path) -> list[str]:
    """The `invoke time` command that runs (or resumes) this series, as series.json records it (a
    list of words: whatever reads it quotes them, so no word can become shell syntax)."""
    argv = ["invoke", "time", "--series", settings["name"], "--results-dir", str(Path(results_dir).resolve())]
    argv += ["--manifest", settings["manifest"]] if settings.get("manifest") else ["--dataset", settings["dataset"]]
    argv += ["--data-dir", str(Path(data_dir).resolve()), "--runs", str(settings["runs"]),
             "--ruleset", settings["ruleset"], "--system", settings["system"]]
    for key in ("config", "gpus", "nodes", "max_epochs", "submitter", "status"):
        if settings.get(key) is not None:
            argv += [f"--{key.replace('_', '-')}", str(settings[key])]
    return argv


def save_settings(s: Series) -> None:
    write_json(s.root / "series.json", s.settings, indent=2)


def record_sources(s: Series, results_dir: Path, data_dir: Path) -> None:
    """series.json gets what a reviewer asks of the series: the command that runs it and the code it
    runs (each file's hash: `invoke package` names the files that differ). A series that already
    has runs keeps its record; if the code changed since, say so now rather than at packaging."""
    from mlperf import project

    if "sources" not in s.settings and not s.finished():
        files = project.sources()
        s.settings.update(command=series_command(s.settings, results_dir, data_dir), sources=files,
                          sources_digest=project.sources_digest(files=files))
        save_settings(s)
    elif isinstance(s.settings.get("sources"), dict):
        changed = project.changed_sources(s.settings["sources"])
        if changed:
            print(f"warning: the code differs from what series {s.settings['name']} ran so far "
                  f"({', '.join(changed[:5])}{', ...' if len(changed) > 5 else ''}): `invoke package` will refuse "
                  "the series", flush=True)


def config_note(name: str | None) -> str:
    """sw_notes text for the named system configuration the runs used ("" when not known)."""
    if not name:
        return ""
    from mlperf import planning

    try:
        described = planning.describe_config(name)
    except UserError:
        return f"system configuration {name}"
    return f"system configuration {name}: " + ", ".join(f"{k}={v}" for k, v in described.items() if k != "name")


def write_system_desc(s: Series, parsed: dict[int, RunLog] | None = None) -> Path:
    """systems/<system>.json: detected hardware, plus submitter/division/status/config from the logs."""
    from mlperf.results import system_desc

    logs = list((parsed or {}).values())
    sub = next((log.submission for log in logs if log.submission), {})
    config = s.settings.get("config") or next((log.config for log in logs if log.config), None)
    nodes = s.settings.get("nodes_count") or 1
    desc = system_desc.detect_system(
        s.system, submitter=sub.get("org", s.settings.get("submitter") or ""), division=sub.get("division", ""),
        status=sub.get("status", s.settings.get("status") or ""), nodes=nodes, sw_notes=config_note(config),
        ruleset=s.settings.get("ruleset"), folder=s.root)
    path = s.root / "systems" / f"{s.system}.json"
    write_json(path, desc, indent=4)
    return path


def time_series(*, runs: int, results_dir: Path, system: str | None, ruleset: str, dataset: str | None,
                data_dir: Path, manifest: str | None = None, config: str | None = None, gpus=None, max_epochs=None, nodes=None,
                submitter: str | None = None, status: str | None = None, series: str | None = None,
                finished_ok: bool = False, resume_hint: str | None = None, dry_run: bool = False) -> dict:
    """Train `runs` times with distinct seeds into an MLPerf results tree, then check and score it.

    The first run is planned before anything is written, so bad input or a host that lacks what
    the runs need is one line with no series folder left behind (`dry_run`: print that plan). A
    run whose trainer fails keeps the series going and counts as dropped; its partial log is moved
    to attempts/ so that a later resume runs it again rather than treating it as finished. After the
    summary is written, crashed runs end the call with a UserError that says how to resume.
    """
    from mlperf import planning

    runs = parse_runs(runs)
    check_ruleset(ruleset)
    from mlperf.datasets import resolve

    ds = resolve(dataset, manifest)
    settings = {"runs": runs, "dataset": ds.name, "manifest": manifest, "config": config, "max_epochs": max_epochs,
                "gpus": gpus, "nodes": nodes, "ruleset": ruleset, "system": system, "submitter": submitter,
                "status": status}
    first = planning.plan(**_run_arguments(settings, data_dir, seed=None, log=Path(results_dir) / "result_0.txt"),
                          dry_run=True)
    if dry_run:
        print(json.dumps({"series": {"runs": runs, "results_dir": str(results_dir), "name": series},
                          "run": first.describe()}, indent=2))
        return {}
    settings["nodes_count"] = first.nnodes  # for the system description
    open_series(Path(results_dir), series, settings, finished_ok=finished_ok, create=False)  # refusals first
    if first.missing:
        raise UserError(first.missing[0])
    with writing("--results-dir", Path(results_dir)):
        s = open_series(Path(results_dir), series, settings, finished_ok=finished_ok)
        print(f"series {s.settings['name']}: {s.root}")
        resume_hint = resume_hint or f"invoke time --series {s.settings['name']} --results-dir {results_dir}"
        with _only_runner(s):
            record_sources(s, Path(results_dir), Path(data_dir))
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
            summary = score_series(s, crashed)
    if crashed:
        codes = ", ".join(f"run {i} exit {rc}" for i, rc in sorted(crashed.items()))
        raise UserError(f"{len(crashed)} run(s) of series {s.settings['name']} crashed ({codes}; output above, "
                        f"partial logs in {s.root / 'attempts'}): fix the cause, then run `{resume_hint}` "
                        "to run them again (finished runs are kept)")
    require_score(summary, s.root)
    return summary


def require_score(summary: dict, where: Path) -> None:
    """A series without an MLPerf score (none at all, too few runs, or runs the RCP checker rejects)
    is a failed command (exit 1), not a result: say why, once. The summary is written already."""
    sc = summary["score"]
    if sc["kind"] != "mlperf":
        raise UserError(f"no MLPerf score: {sc['note']}; each run: {where / 'summary.md'}")


@contextlib.contextmanager
def _only_runner(s: Series):
    """One process at a time trains a series (a lock in its folder): a second `invoke time --series`
    of it stops at once instead of training the same runs into the same .partial logs."""
    with contextlib.ExitStack() as held:
        try:
            held.enter_context(exclusive_lock(s.root / ".lock"))
        except LockBusy as busy:
            raise UserError(f"series {s.settings['name']} is being run by another process (pid {busy.holder}): "
                            "wait for it, or stop it, and run the same command again to resume") from None
        yield


def score_series(s: Series, crashed: dict[int, int]) -> dict:
    """Check and score a series' finished runs; write the system description, summary and plot."""
    logs = {i: p for i, p in s.finished().items()}
    run_list, parsed = evaluate(logs, s.settings["ruleset"], crashed=crashed, expected=s.settings["runs"])
    sc = judge_convergence(score(run_list), parsed, s.logs_dir, s.settings["ruleset"])
    write_system_desc(s, parsed)
    summary = write_summary(s.root, name=s.settings["name"], runs=run_list, parsed=parsed, sc=sc,
                            ruleset=s.settings["ruleset"],
                            extra={"system": s.system, "seeds": s.settings["seeds"],
                                   "dataset": s.settings["dataset"], "config": s.settings.get("config")})
    report(run_list, sc, s.root, hint=suggest_ruleset(run_list, parsed, s.settings["ruleset"]), model=summary["model"])
    return summary


def _run_arguments(settings: dict, data_dir: Path, *, seed: int | None, log: Path) -> dict:
    """planning.plan's arguments for one run of a series with these settings."""
    from mlperf.datasets import resolve

    ds = resolve(None, settings["manifest"]) if settings.get("manifest") else resolve(settings["dataset"])
    from object_detection.run_request import RunRequest

    return dict(dataset=ds, data_dir=Path(data_dir), gpus=settings.get("gpus"),
                nodes=settings.get("nodes"), batch_size=None, config=settings.get("config"), device=None, log=log,
                request=RunRequest(seed=seed, max_epochs=settings.get("max_epochs"), ruleset=settings["ruleset"],
                                   submitter=settings.get("submitter"), status=settings.get("status")))


def _train_one(s: Series, i: int, data_dir: Path) -> int | None:
    """One training run into result_<i>.txt; the trainer's exit code if it left no finished log."""
    from mlperf import launch, planning

    final = s.log(i)
    partial = final.with_name(final.name + ".partial")
    final.parent.mkdir(parents=True, exist_ok=True)
    if partial.exists():                       # a run that died earlier: keep its log, start afresh
        _set_aside(s, partial, i, "interrupted")
    seed = s.settings["seeds"][i]
    print(f"run {i}/{s.settings['runs']}: seed {seed}, log {final}", flush=True)
    arguments = _run_arguments(s.settings, data_dir, seed=seed, log=partial)
    plan = planning.plan(**arguments, dry_run=True)  # no warning twice: launch.train plans it again
    command = ["env", f"OMP_NUM_THREADS={plan.threads}",
               *(f"{k}={v}" for k, v in launch.launcher_env(plan.nproc, plan.cluster).items()),
               *launch.launcher_args(plan.nproc, plan.cluster), *plan.trainer_args()]
    s.settings.setdefault("commands", {})[str(i)] = command  # run_and_time.sh shows it, quoted
    save_settings(s)
    rc = launch.train(**arguments)
    log = parse_log(partial) if partial.exists() else None
    if log is not None and log.status is not None:
        rename(partial, final)
        if rc != 0:
            print(f"run {i}: trainer exited {rc} after run_stop; the log is kept as it ends")
        print(run_line(i, s.settings["runs"], log), flush=True)
        return None
    print(f"run {i}: trainer exited {rc} without run_stop: dropped; the series continues")
    if partial.exists():
        _set_aside(s, partial, i, f"rc{rc}")
    return rc if rc != 0 else -1


def run_line(i: int, runs: int, log: RunLog) -> str:
    """One line for a finished run: its place in the series, time, epochs, last accuracy, status."""
    last = log.evals[-1] if log.evals else (None, None, float("nan"), float("nan"))
    epochs = log.converged_epoch if log.status == "success" else log.epochs_run
    return (f"run {i}/{runs}: {log.minutes or 0:.2f} minutes, {epochs if epochs is not None else '-'} epochs, "
            f"BBOX {last[2]:.4f}, SEGM {last[3]:.4f}: {log.status}")


def _set_aside(s: Series, partial: Path, i: int, why: str) -> None:
    attempts = s.root / "attempts"
    attempts.mkdir(parents=True, exist_ok=True)
    target = attempts / f"result_{i}-{time.strftime('%Y%m%d-%H%M%S')}-{why}.txt"
    rename(partial, target)
