"""`invoke package`: result series as the submission tree MLCommons expects, checked by its checkers.

    <output>/<org>/systems/<system>.json                              each series' system description
    <output>/<org>/results/<system>/maskrcnn/result_{0..4}.txt        the logs, byte for byte
    <output>/<org>/benchmarks/maskrcnn/implementations/<impl>/        the code that ran, its Dockerfile,
                                                                      a README, a config per system and
                                                                      run_and_time.sh: each run's command
    <output>/package_checker.log, result_summarizer.log, result_summary*.{csv,json}   beside the tree

Series bookkeeping (series.json, summaries, plots, attempts/) stays out of the tree. Names that come
from files (the logs' submission_org, a series' system) become folders only as plain names inside
--output. The code copied in must be the code that ran: each log names its sources digest and
series.json each file's hash, so a package of other code is refused, naming the files. The system
descriptions leave no field blank that MLCommons requires (detected, or from --system-info). The
tree is built in a temporary folder and put in place whole; the checkers' earlier outputs beside it
are removed first (the summarizer appends to its CSV). mlperf_logging.package_checker exits 0 even
when it finds errors, so its verdict is read from its output.
"""
from __future__ import annotations

import json
import re
import shlex
import shutil
from pathlib import Path

from mlperf import PROJECT_ROOT, project
from mlperf.errors import UserError
from mlperf.files import UnsafeName, atomic_write, inside, plain_name, replace_tree, shown, temporary_name, write_json
from mlperf.files import writing
from mlperf.results import system_desc
from mlperf.results.logs import PACKAGE_CHECKER_TIMEOUT, check_ruleset, parse_log, result_files, run_checker
from mlperf.results.series import read_settings
from object_detection.recipe import BENCHMARK, RUNS

IMPLEMENTATION = "backendai-pytorch"
# What the checkers write beside the tree (the summarizer appends to its CSVs): removed before they run.
CHECKER_OUTPUTS = ("package_checker.log", "result_summarizer.log", "result_summary*.csv", "result_summary*.json")


def package(*, results_dir: Path, series: list[str], output: Path, ruleset: str, submitter: str | None,
            image: dict, system_info: Path | None = None) -> Path:
    """Assemble the series into <output>/<org>/, run the package checker and the result summarizer;
    returns the tree. A UserError when the series do not make a submission or a checker objects.
    `system_info`: a JSON file of system-description fields that detection could not fill."""
    check_ruleset(ruleset, for_training=False)
    if not series:
        raise UserError("no series given: pass --series NAME (one per system; see the folders in "
                        f"{results_dir})")
    given = read_system_info(system_info) if system_info is not None else {}
    found = [_series_logs(Path(results_dir), name) for name in series]
    systems = [settings["system"] for _, settings, _ in found]
    if len(set(systems)) != len(systems):
        raise UserError(f"the series name one system twice ({', '.join(systems)}): package one series per system")
    orgs = {log.submission.get("org") for _, _, logs in found for log in logs}
    if len(orgs) != 1:
        raise UserError(f"the series' logs name {len(orgs)} submitters ({', '.join(sorted(map(shown, orgs)))}): "
                        "package the series of one organisation at a time")
    org = orgs.pop()
    try:
        plain_name(org, "submission_org")
    except UnsafeName as bad:
        raise UserError(f"the logs' {bad}: it names the package's folder, so it must be a plain name") from None
    if submitter is not None and submitter != org:
        raise UserError(f"the logs say submission_org {shown(org)}, not {shown(submitter)}; MLPerf logs may not be "
                        "edited, so the package is filed under the organisation they name: drop --submitter or train "
                        "again with it")
    for root, settings, logs in found:
        _check_sources(root, settings, logs)
    descs = {settings["system"]: _system_desc(root, settings, given, ruleset) for root, settings, _ in found}
    output = Path(output)
    with writing("--output", output):
        output.mkdir(parents=True, exist_ok=True)
        try:
            tree = inside(output, org, "submission_org")
        except UnsafeName as bad:
            raise UserError(f"{bad}: choose another --output") from None
        marker = output / f".{org}.invoke-package"  # beside the tree: the checker wants nothing else in it
        if (tree.exists() or tree.is_symlink()) and not marker.is_file():
            raise UserError(f"{tree} exists and was not made by `invoke package`: choose another --output")
        staging = temporary_name(tree)
        try:
            for root, settings, logs in found:
                _add_system(staging, root, settings["system"], logs, descs[settings["system"]])
            _add_implementation(staging, [(root, settings) for root, settings, _ in found], image)
            marker.write_text("the folder beside this one was written by `invoke package`, which may replace it\n")
            replace_tree(staging, tree)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        for pattern in CHECKER_OUTPUTS:
            for old in output.glob(pattern):
                old.unlink()
        _check(tree, ruleset)
    return tree


def _series_logs(results_dir: Path, name: str):
    """(series folder, its series.json, parsed logs) of a finished series of RUNS runs."""
    try:
        root = inside(results_dir, name, "--series")
    except UnsafeName as bad:
        raise UserError(f"{bad}: give a series folder name from {results_dir}") from None
    meta = root / "series.json"
    if not meta.is_file():
        raise UserError(f"{root} is not a result series (no series.json): give a folder name from "
                        f"{root.parent}")
    settings = read_settings(meta)
    system = settings["system"]
    logs_dir = root / "results" / system / BENCHMARK
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
    return root, settings, logs


def _recorded_sources(settings: dict) -> dict[str, str] | None:
    files = settings.get("sources")
    if not isinstance(files, dict) or not files or not all(
            isinstance(k, str) and isinstance(v, str) and re.fullmatch(r"[0-9a-f]{64}", v) for k, v in files.items()):
        return None
    return files


def _check_sources(root: Path, settings: dict, logs) -> None:
    """The code here is the code every run of the series ran: each log's sources digest is the one
    series.json records, and every file's hash is still the recorded one (else the files, named)."""
    files = _recorded_sources(settings)
    if files is None:
        raise UserError(f"series {root.name} does not record the code it ran (no sources in {root / 'series.json'}; "
                        "series made before this check lack them): a package must hold the code that ran, so run "
                        "the series again with this version")
    digest = project.sources_digest(files=files)
    other = [log.path.name for log in logs if log.sources_digest != digest]
    if other:
        raise UserError(f"series {root.name}: {', '.join(other)} did not run the code {root / 'series.json'} records "
                        f"(sources digest {digest[:12]}...): the runs of one submission run one code; run the "
                        "series again")
    changed = project.changed_sources(files)
    if changed:
        shown_files = ", ".join(changed[:8]) + (f" and {len(changed) - 8} more" if len(changed) > 8 else "")
        raise UserError(f"the code here differs from what series {root.name} ran ({shown_files}): the package "
                        f"holds the code that ran, so package from a checkout of it (each file's hash is in "
                        f"{root / 'series.json'})")


def read_system_info(path: Path) -> dict:
    """--system-info FILE: a JSON object of system-description fields (values text, or a mapping for
    other_software_stack), for every system; or one such object per system name."""
    try:
        given = json.loads(Path(path).read_text())
    except OSError as exc:
        raise UserError(f"cannot read --system-info {path}: {exc.strerror or exc}") from None
    except (ValueError, RecursionError):
        raise UserError(f"--system-info {path} is not JSON: give an object of system-description fields, e.g. "
                        '{"cooling": "air", "host_memory_configuration": "16x 64GB DDR5-4800"}') from None
    if not isinstance(given, dict):
        raise UserError(f"--system-info {path} holds {shown(given)}, not an object of system-description fields")
    per_system = all(isinstance(v, dict) and k not in system_desc.SYSTEM_DESC_FIELDS for k, v in given.items()) and given
    for fields in (given.values() if per_system else [given]):
        for key, value in fields.items():
            if key not in system_desc.SYSTEM_DESC_FIELDS:
                raise UserError(f"--system-info {path}: {shown(key)} is not a field of MLPerf's system description "
                                f"(they are {', '.join(system_desc.SYSTEM_DESC_FIELDS)})")
            if not (isinstance(value, str) or (key == "other_software_stack" and isinstance(value, dict))):
                raise UserError(f"--system-info {path}: {key} is {shown(value)}; the system description's fields are text")
    return {"per_system": given} if per_system else {"all": given}


def _system_desc(root: Path, settings: dict, given: dict, ruleset: str) -> dict:
    """The series' system description with the user's fields over it, every required field filled."""
    system = settings["system"]
    path = root / "systems" / f"{system}.json"
    try:
        desc = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):
        desc = None
    if not isinstance(desc, dict):
        raise UserError(f"{path} is damaged (not a JSON object): run `invoke time --series {root.name}` again to "
                        "write it")
    desc = {**desc, **given.get("all", {}), **given.get("per_system", {}).get(system, {})}
    if isinstance(desc.get("status"), str):
        desc["status"] = system_desc.status_wording(
            {v: k for k, v in system_desc.AVAILABILITY.items()}.get(desc["status"], desc["status"]), ruleset)
    blank = system_desc.blank_fields(desc)
    if blank:
        example = json.dumps({name: "..." for name in blank[:2]})
        raise UserError(f"{path} leaves {', '.join(blank)} blank, which MLCommons requires a meaningful answer for "
                        f"and this host could not detect: give them in a JSON file, `invoke package --system-info "
                        f"FILE` (e.g. {example})")
    return desc


def _add_system(tree: Path, root: Path, system: str, logs, desc: dict) -> None:
    """The system description and the logs of one series, the logs copied unchanged."""
    write_json(tree / "systems" / f"{system}.json", desc, indent=4)
    results = tree / "results" / system / BENCHMARK
    results.mkdir(parents=True, exist_ok=True)
    for log in logs:
        shutil.copy2(log.path, results / log.path.name)
        if (results / log.path.name).read_bytes() != log.path.read_bytes():
            raise UserError(f"copying {log.path} changed it: the disk at {tree} is failing")


def _add_implementation(tree: Path, systems: list[tuple[Path, dict]], image: dict) -> None:
    """The code that ran (what the image holds), the image's Dockerfile, a README, a config per
    system, and run_and_time.sh with each run's command as it ran."""
    from mlperf.image import dockerfile_for

    target = tree / "benchmarks" / BENCHMARK / "implementations" / IMPLEMENTATION
    for relative in project.runtime_files(PROJECT_ROOT):
        (target / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(PROJECT_ROOT / relative, target / relative)  # README.md: replaced by the one below
    dockerfile, _ = dockerfile_for(image["base"], resources=dict(image.get("resources") or {}))
    (target / "Dockerfile").write_text(dockerfile)
    for _, settings in systems:
        write_json(target / f"config_{settings['system']}.json", {key: settings.get(key) for key in (
            "dataset", "config", "runs", "gpus", "nodes_count", "max_epochs", "ruleset", "seeds", "sources_digest")},
            indent=2)
    atomic_write(target / "run_and_time.sh", run_and_time(systems), mode=0o755)
    (target / "README.md").write_text(_readme([settings["system"] for _, settings in systems]))


def _words(value) -> list[str] | None:
    return value if isinstance(value, list) and value and all(isinstance(w, str) for w in value) else None


def run_and_time(systems: list[tuple[Path, dict]]) -> str:
    """A script that runs one run of the submission with the command and flags it ran with (from
    series.json, each word quoted: a recorded word never becomes shell syntax)."""
    first = systems[0][1]["system"]
    lines = ["#!/usr/bin/env bash",
             "# One run of this submission, with the exact command and flags it ran with: the trainer's command",
             "# line as `invoke time` launched it, recorded in series.json when the run started (the paths are",
             "# those of the host that ran it). Usage: [SYSTEM=<system>] RUN=<i> bash run_and_time.sh",
             "set -euo pipefail",
             f"SYSTEM=${{SYSTEM:-{shlex.quote(first)}}}",
             'RUN=${RUN:-0}', ""]
    branches = []
    for _, settings in systems:
        system = settings["system"]
        command = _words(settings.get("command"))
        lines.append(f"# {system}: series {shlex.quote(str(settings.get('name', '')))}, sources digest "
                     f"{settings.get('sources_digest', '')}")
        if command:
            lines.append("#   the whole series: " + shlex.join(command).replace("\n", "\\n"))
        commands = settings.get("commands") if isinstance(settings.get("commands"), dict) else {}
        for i in range(int(settings.get("runs") or RUNS)):
            words = _words(commands.get(str(i)))
            if words is None:
                raise UserError(f"series {settings.get('name')} does not record the command of run {i} (series.json "
                                "\"commands\"): run_and_time.sh must show it; run the series again with this version")
            seed = (settings.get("seeds") or [None] * (i + 1))[i]
            branches.append(f"  {shlex.quote(f'{system}/{i}')})  # seed {seed}\n    exec {shlex.join(words)} ;;")
    lines += ["", 'case "$SYSTEM/$RUN" in', *branches,
              '  *) echo "run_and_time.sh: no recorded run $RUN of system $SYSTEM" >&2; exit 1 ;;', "esac", ""]
    return "\n".join(lines)


def _readme(systems: list[str]) -> str:
    configs = ", ".join(f"`config_{s}.json`" for s in systems)
    return f"""# MLPerf Training {BENCHMARK}: Mask R-CNN R50-FPN on PyTorch, for Backend.AI

The code that produced the results of this submission: the trainer (`object_detection/`, torch and
torchvision) and the steps that fetch, verify, train and score (`mlperf/`, run with Invoke through
`tasks.py`). `Dockerfile` builds the image the runs used (Backend.AI labels included); {configs}
record each system's settings, the seeds of its runs and the sources digest of the code they ran
(`mlperf.project.sources_digest` of these files; each log names it in a `sources_digest` record).
`run_and_time.sh` runs one run with the exact command and flags it ran with (`RUN=<i>`).

    pip install -r requirements.txt
    invoke fetch --dataset coco2017 && invoke verify --dataset coco2017
    invoke time --dataset coco2017 --config CONFIG          # five runs, checked and scored
    invoke train --dataset coco2017 --config CONFIG --dry-run   # what one run will do

`invoke train --list-configs` lists the system configurations; README.md has the rest.
"""


def _check(tree: Path, ruleset: str) -> None:
    """The package checker and the result summarizer on the tree, their logs kept beside it."""
    out = tree.parent
    checked, text = run_checker("package_checker", str(tree), "training", ruleset,
                                "--log_output", str(out / "package_checker.log"), cwd=out, timeout=PACKAGE_CHECKER_TIMEOUT)
    (out / "package_checker.log").write_text(text)  # the whole output, whatever --log_output kept
    summarized, summary_text = run_checker("result_summarizer", str(tree), "training", ruleset,
                                           "--csv", str(out / "result_summary.csv"), cwd=out,
                                           timeout=PACKAGE_CHECKER_TIMEOUT)
    (out / "result_summarizer.log").write_text(summary_text)
    for tool, code in (("package checker", checked), ("result summarizer", summarized)):
        if code is None:
            raise UserError(f"the {tool} did not finish within {PACKAGE_CHECKER_TIMEOUT} s on {tree}; run "
                            f"`invoke package` again, or the checker by hand to see where it stops")
    if checked != 0 or "PACKAGE CHECKER FOUND NO ERRORS" not in text:
        errors = re.findall(r"^ERROR\s+-\s+(.*)$", text, re.M) or [text.strip().splitlines()[-1] if text.strip()
                                                                   else f"exit {checked}"]
        raise UserError(f"the package checker found errors in {tree} (first: {errors[0].strip()}); its whole "
                        f"output is in {out / 'package_checker.log'}")
    summary = out / "result_summary_detailed.json"  # per benchmark: time, batch, epochs, RCP verdict
    rows = json.loads(summary.read_text()) if summarized == 0 and summary.is_file() else []
    if not any(row.get(f"{BENCHMARK}:time_to_train") is not None for row in rows):
        raise UserError(f"the result summarizer gave no {BENCHMARK} score for {tree} (exit {summarized});"
                        f" its output is in {out / 'result_summarizer.log'}")
    for row in rows:
        print(f"{row.get('system')}: {BENCHMARK} {row[f'{BENCHMARK}:time_to_train']:.2f} minutes "
              f"({row.get('division')}, RCP {row.get(f'{BENCHMARK}:RCP') or 'not checked'})")
    print(f"package: {tree} passes the package checker ({out / 'package_checker.log'}) and the result "
          f"summarizer ({summary})")
