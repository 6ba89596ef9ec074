"""Reading MLPerf result logs: what a log says about its run, and the MLCommons compliance verdict."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from mlperf.errors import UserError
from object_detection.recipe import QUALITY_TARGETS

_MLLOG = re.compile(r":::MLLOG\s+(\{.*\})\s*$")
RESULT_NAME = re.compile(r"^result_(\d+)\.txt$")


@dataclass
class RunLog:
    """What one MLPerf log says about its run."""
    path: Path
    run_start_ms: int | None = None
    run_stop_ms: int | None = None
    status: str | None = None                      # run_stop's status: success, aborted; None: no stop
    evals: list[tuple[int, float | None, float, float]] = field(default_factory=list)  # ms, epoch, BBOX, SEGM
    targets: dict[str, float] = field(default_factory=lambda: dict(QUALITY_TARGETS))
    targets_from_log: bool = False
    submission: dict[str, str] = field(default_factory=dict)   # org, division, status, platform
    seed: int | None = None
    throughput: str | None = None
    config: str | None = None                      # the named system configuration, if the log says
    benchmark: str | None = None                   # submission_benchmark
    model: str | None = None                       # the non-MLPerf "model" record: which network ran
    epochs_run: float | None = None                # the last epoch that started

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
    """Read the :::MLLOG lines of a result file (other lines, e.g. a rank prefix or noise, are skipped).

    A record whose time or accuracy is not a number is a UserError naming the file and line: the
    score would otherwise be wrong without a word."""
    log = RunLog(path=Path(path))
    try:
        text = log.path.read_text(errors="replace")
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror}") from None
    for number, rec in records(text):
        try:
            _read_record(log, rec)
        except (TypeError, ValueError):
            raise UserError(f"{path} line {number}: the {rec.get('key')!r} record has a time or value that is "
                            "not a number: this is not a log the MLPerf logger wrote") from None
    return log


def records(text: str):
    """(line number, record) for each :::MLLOG line of a log's text that holds a JSON object."""
    for number, line in enumerate(text.splitlines(), start=1):
        m = _MLLOG.search(line)
        if not m:
            continue
        try:
            rec = json.loads(m.group(1))
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            yield number, rec


def _read_record(log: RunLog, rec: dict) -> None:
    key, value = rec.get("key"), rec.get("value")
    meta = rec.get("metadata") or {}
    t = rec.get("time_ms")
    if key in ("run_start", "run_stop", "eval_accuracy", "epoch_start"):
        t = _number(t)
    if key == "run_start" and log.run_start_ms is None:
        log.run_start_ms = t
    elif key == "run_stop":
        log.run_stop_ms, log.status = t, meta.get("status")
        log.throughput = meta.get("throughput")
    elif key == "epoch_start" and meta.get("epoch_num") is not None:
        log.epochs_run = _number(meta["epoch_num"])
    elif key == "eval_accuracy" and isinstance(value, dict) and "BBOX" in value and "SEGM" in value:
        epoch = meta.get("epoch_num")
        log.evals.append((t, None if epoch is None else _number(epoch), _number(value["BBOX"]),
                          _number(value["SEGM"])))
    elif key in ("submission_org", "submission_division", "submission_status", "submission_platform"):
        log.submission[key.removeprefix("submission_")] = str(value)
    elif key == "submission_benchmark":
        log.benchmark = str(value)
    elif key == "seed" and log.seed is None:
        log.seed = value
    elif key in ("config_name", "system_config") and isinstance(value, str):
        log.config = value
    elif key == "model" and isinstance(value, str):
        log.model = value
    elif isinstance(value, dict) and "target" in key and "BBOX" in value and "SEGM" in value:
        # an open-division run's own quality targets, e.g. {"key": "quality_target", "value": {...}}
        log.targets = {"BBOX": _number(value["BBOX"]), "SEGM": _number(value["SEGM"])}
        log.targets_from_log = True
    elif key in ("bbox_target", "segm_target") and isinstance(value, (int, float)):
        log.targets[key.split("_")[0].upper()] = float(value)
        log.targets_from_log = True


def _number(value) -> float:
    """A JSON number (bools and strings are not numbers, though Python would take them)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise ValueError(f"{value!r} is not a number")
    return value


def result_files(folder: Path) -> dict[int, Path]:
    """result_<i>.txt files of a folder by run index."""
    found = {}
    for p in Path(folder).glob("result_*.txt"):
        m = RESULT_NAME.match(p.name)
        if m and p.is_file():
            found[int(m.group(1))] = p
    return dict(sorted(found.items()))


def check_compliance(path: Path, ruleset: str) -> tuple[bool, list[str]]:
    """Run the MLCommons compliance checker (training usage) on one log: (passed, its messages).

    Messages are the checker's WARNING/ERROR lines without the level prefix, e.g. the failed rule;
    the final FAILED/SUCCESS verdict is in the bool.
    """
    with tempfile.TemporaryDirectory(prefix="mlperf-compliance-") as tmp:
        try:
            proc = subprocess.run(
                [sys.executable, "-m", "mlperf_logging.compliance_checker", "--usage", "training",
                 "--ruleset", ruleset, "--log_output", os.path.join(tmp, "checker.log"), str(Path(path).resolve())],
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


def check_ruleset(ruleset: str, *, for_training: bool = True) -> str:
    """`ruleset` if the installed mlperf-logging has Mask R-CNN rules for it (and, for training, the
    RCPs its schedules come from), else a UserError that lists the rulesets it has: the checkers
    would otherwise fail every log with their usage text."""
    from object_detection.recipe import BENCHMARK, rulesets

    known = rulesets() if for_training else sorted(compliance_rulesets(), key=lambda v: tuple(map(int, v.split("."))))
    if ruleset not in known:
        raise UserError(f"--ruleset {ruleset!r} has no {BENCHMARK} rules in the installed mlperf-logging: use one "
                        f"of {', '.join(known)}")
    return ruleset


def compliance_rulesets() -> list[str]:
    """Every training ruleset the compliance checker knows for Mask R-CNN, newest first (including
    0.6.0 and 0.7.0, which have no RCPs)."""
    from importlib import resources

    folder = resources.files("mlperf_logging") / "compliance_checker"
    found = [p.name.removeprefix("training_") for p in folder.iterdir()
             if re.fullmatch(r"training_\d+\.\d+\.\d+", p.name) and (p / "closed_maskrcnn.yaml").is_file()]
    return sorted(found, key=lambda v: tuple(int(x) for x in v.split(".")), reverse=True)


def check_rcp(folder: Path, ruleset: str) -> tuple[bool, str]:
    """mlperf-logging's RCP checker on a folder of closed-division logs (the check the package
    checker makes): (passed, its verdict line, e.g. "RCP found, RCP test PASSED")."""
    with tempfile.TemporaryDirectory(prefix="mlperf-rcp-") as tmp:
        try:
            proc = subprocess.run(
                [sys.executable, "-m", "mlperf_logging.rcp_checker", str(Path(folder).resolve()), "--rcp_usage", "training",
                 "--rcp_version", ruleset, "--rcp_pass", "pruned_rcps", "--log_output", os.path.join(tmp, "rcp.log")],
                capture_output=True, text=True, timeout=300, cwd=tmp)
        except subprocess.TimeoutExpired:
            return False, "the RCP checker did not finish within 300 s"
    output = proc.stdout + proc.stderr
    verdict = re.findall(r"^(?:INFO|ERROR)\s+-\s+(.*RCP test (?:PASSED|FAILED).*?)(?:, consider.*)?$", output, re.M)
    normalised = re.findall(r"Score should be normalized by factor of .*", output)
    message = verdict[-1] if verdict else (output.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
    return proc.returncode == 0, message + (f" ({normalised[-1]})" if normalised else "")
