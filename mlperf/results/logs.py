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
