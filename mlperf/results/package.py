"""`invoke package`: result series as the submission tree MLCommons expects, checked by its checkers.

    <output>/<org>/systems/<system>.json                              each series' system description
    <output>/<org>/results/<system>/maskrcnn/result_{0..4}.txt        the logs, byte for byte
    <output>/<org>/benchmarks/maskrcnn/implementations/<impl>/        the code that ran, its Dockerfile,
                                                                      a README and a config per system
    <output>/package_checker.log, result_summarizer.log, result_summary*.{csv,json}   beside the tree

Series bookkeeping (series.json, summaries, plots, attempts/) stays out of the tree. The tree is
built in a temporary folder and put in place whole. mlperf_logging.package_checker exits 0 even when
it finds errors, so its verdict is read from its output.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

from mlperf import PROJECT_ROOT, project
from mlperf.errors import UserError
from mlperf.files import replace_tree, temporary_name, write_json
from mlperf.results.logs import check_ruleset, parse_log, result_files
from object_detection.recipe import BENCHMARK, RUNS

IMPLEMENTATION = "backendai-pytorch"


def package(*, results_dir: Path, series: list[str], output: Path, ruleset: str, submitter: str | None,
            image: dict) -> Path:
    """Assemble the series into <output>/<org>/, run the package checker and the result summarizer;
    returns the tree. A UserError when the series do not make a submission or a checker objects."""
    check_ruleset(ruleset, for_training=False)
    if not series:
        raise UserError("no series given: pass --series NAME (one per system; see the folders in "
                        f"{results_dir})")
    found = [_series_logs(Path(results_dir) / name) for name in series]
    orgs = {log.submission.get("org") for _, _, logs in found for log in logs}
    if len(orgs) != 1:
        raise UserError(f"the series' logs name {len(orgs)} submitters ({', '.join(sorted(map(str, orgs)))}): "
                        "package the series of one organisation at a time")
    org = orgs.pop()
    if submitter is not None and submitter != org:
        raise UserError(f"the logs say submission_org {org!r}, not {submitter!r}; MLPerf logs may not be edited, "
                        "so the package is filed under the organisation they name: drop --submitter or train "
                        "again with it")
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    tree = output / org
    marker = output / f".{org}.invoke-package"  # beside the tree: the checker wants nothing else in it
    if tree.exists() and not marker.is_file():
        raise UserError(f"{tree} exists and was not made by `invoke package`: choose another --output")
    staging = temporary_name(tree)
    try:
        for root, system, logs in found:
            _add_system(staging, root, system, logs)
        _add_implementation(staging, [(root, system) for root, system, _ in found], image)
        marker.write_text("the folder beside this one was written by `invoke package`, which may replace it\n")
        replace_tree(staging, tree)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    _check(tree, ruleset)
    return tree


def _series_logs(root: Path):
    """(series folder, system name, parsed logs) of a finished series of RUNS runs."""
    settings = root / "series.json"
    if not settings.is_file():
        raise UserError(f"{root} is not a result series (no series.json): give a folder name from "
                        f"{root.parent}")
    system = json.loads(settings.read_text()).get("system")
    logs_dir = root / "results" / str(system) / BENCHMARK
    files = result_files(logs_dir)
    if sorted(files) != list(range(RUNS)):
        raise UserError(f"series {root.name} has runs {sorted(files)} in {logs_dir}, but MLPerf takes "
                        f"result_0.txt to result_{RUNS - 1}.txt: finish it first (invoke time --series {root.name})")
    if not (root / "systems" / f"{system}.json").is_file():
        raise UserError(f"series {root.name} has no system description systems/{system}.json: run "
                        f"`invoke time --series {root.name}` again to write it")
    logs = [parse_log(path) for path in files.values()]
    unfinished = [log.path.name for log in logs if log.status is None]
    if unfinished:
        raise UserError(f"series {root.name}: {', '.join(unfinished)} never reached run_stop")
    return root, system, logs


def _add_system(tree: Path, root: Path, system: str, logs) -> None:
    """The system description and the logs of one series, copied unchanged."""
    (tree / "systems").mkdir(parents=True, exist_ok=True)
    shutil.copy2(root / "systems" / f"{system}.json", tree / "systems" / f"{system}.json")
    results = tree / "results" / system / BENCHMARK
    results.mkdir(parents=True, exist_ok=True)
    for log in logs:
        shutil.copy2(log.path, results / log.path.name)
        if (results / log.path.name).read_bytes() != log.path.read_bytes():
            raise UserError(f"copying {log.path} changed it: the disk at {tree} is failing")


def _add_implementation(tree: Path, systems: list[tuple[Path, str]], image: dict) -> None:
    """The code that ran (what the image holds), the image's Dockerfile, a README, a config per system."""
    from mlperf.image import dockerfile_for

    target = tree / "benchmarks" / BENCHMARK / "implementations" / IMPLEMENTATION
    for relative in project.runtime_files(PROJECT_ROOT):
        (target / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(PROJECT_ROOT / relative, target / relative)  # README.md: replaced by the one below
    dockerfile, _ = dockerfile_for(image["base"], resources=dict(image.get("resources") or {}))
    (target / "Dockerfile").write_text(dockerfile)
    for root, system in systems:
        settings = json.loads((root / "series.json").read_text())
        write_json(target / f"config_{system}.json", {key: settings.get(key) for key in (
            "dataset", "config", "runs", "gpus", "nodes_count", "max_epochs", "ruleset", "seeds")}, indent=2)
    (target / "README.md").write_text(_readme([system for _, system in systems]))


def _readme(systems: list[str]) -> str:
    configs = ", ".join(f"`config_{s}.json`" for s in systems)
    return f"""# MLPerf Training {BENCHMARK}: Mask R-CNN R50-FPN on PyTorch, for Backend.AI

The code that produced the results of this submission: the trainer (`object_detection/`, torch and
torchvision) and the steps that fetch, verify, train and score (`mlperf/`, run with Invoke through
`tasks.py`). `Dockerfile` builds the image the runs used (Backend.AI labels included); {configs}
record each system's settings and the seeds of its runs.

    pip install -r requirements.txt
    invoke fetch --dataset coco2017 && invoke verify --dataset coco2017
    invoke time --dataset coco2017 --config CONFIG          # five runs, checked and scored
    invoke train --dataset coco2017 --config CONFIG --dry-run   # what one run will do

`invoke train --list-configs` lists the system configurations; README.md has the rest.
"""


def _check(tree: Path, ruleset: str) -> None:
    """The package checker and the result summarizer on the tree, their logs kept beside it."""
    out = tree.parent
    checker = subprocess.run([sys.executable, "-m", "mlperf_logging.package_checker", str(tree), "training", ruleset,
                              "--log_output", str(out / "package_checker.log")],
                             capture_output=True, text=True, cwd=out, timeout=1800)
    text = checker.stdout + checker.stderr
    (out / "package_checker.log").write_text(text)  # the whole output, whatever --log_output kept
    summarizer = subprocess.run([sys.executable, "-m", "mlperf_logging.result_summarizer", str(tree), "training",
                                 ruleset, "--csv", str(out / "result_summary.csv")],
                                capture_output=True, text=True, cwd=out, timeout=1800)
    (out / "result_summarizer.log").write_text(summarizer.stdout + summarizer.stderr)
    if checker.returncode != 0 or "PACKAGE CHECKER FOUND NO ERRORS" not in text:
        errors = re.findall(r"^ERROR\s+-\s+(.*)$", text, re.M) or [text.strip().splitlines()[-1] if text.strip()
                                                                   else f"exit {checker.returncode}"]
        raise UserError(f"the package checker found errors in {tree} (first: {errors[0].strip()}); its whole "
                        f"output is in {out / 'package_checker.log'}")
    summary = out / "result_summary_detailed.json"  # per benchmark: time, batch, epochs, RCP verdict
    rows = json.loads(summary.read_text()) if summarizer.returncode == 0 and summary.is_file() else []
    if not any(row.get(f"{BENCHMARK}:time_to_train") is not None for row in rows):
        raise UserError(f"the result summarizer gave no {BENCHMARK} score for {tree} (exit {summarizer.returncode});"
                        f" its output is in {out / 'result_summarizer.log'}")
    for row in rows:
        print(f"{row.get('system')}: {BENCHMARK} {row[f'{BENCHMARK}:time_to_train']:.2f} minutes "
              f"({row.get('division')}, RCP {row.get(f'{BENCHMARK}:RCP') or 'not checked'})")
    print(f"package: {tree} passes the package checker ({out / 'package_checker.log'}) and the result "
          f"summarizer ({summary})")
