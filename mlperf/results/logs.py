"""Reading MLPerf result logs: what a log says about its run, and the MLCommons compliance verdict."""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from mlperf.errors import UserError
from mlperf.files import shown
from object_detection.recipe import QUALITY_TARGETS

RESULT_NAME = re.compile(r"^result_(\d+)\.txt$")
# The non-MLPerf record that names the code a run ran (mlperf.project.sources_digest; the checker ignores it).
SOURCES_KEY = "sources_digest"


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
    sources_digest: str | None = None              # the SOURCES_KEY record: the code that ran
    skipped: list[str] = field(default_factory=list)   # "line N: why" for each record line left out

    @property
    def minutes(self) -> float | None:
        if self.run_start_ms is None or self.run_stop_ms is None:
            return None
        return (float(self.run_stop_ms) - float(self.run_start_ms)) / 60000.0

    @property
    def converged_epoch(self) -> float | None:
        """Epoch of the first evaluation that met both targets (None if none did)."""
        for _, epoch, bbox, segm in self.evals:
            if bbox >= self.targets["BBOX"] and segm >= self.targets["SEGM"]:
                return epoch
        return None


def parse_log(path: Path) -> RunLog:
    """Read the :::MLLOG lines of a result file (other lines, e.g. a rank prefix or noise, are skipped).

    A record whose time or accuracy is not a finite number is a UserError naming the file and line:
    the score would otherwise be wrong without a word. A line the reader cannot take (over
    MAX_LINE, not JSON, nested too deeply, a record of the wrong shape) is left out and listed in
    `skipped` with the reason."""
    log = RunLog(path=Path(path))
    try:
        for number, rec in records(log.path, log.skipped):
            try:
                problem = _read_record(log, rec)
            except (TypeError, ValueError, OverflowError):
                raise UserError(f"{path} line {number}: the {shown(rec.get('key'))} record has a time or value "
                                "that is not a finite number: this is not a log the MLPerf logger wrote") from None
            if problem:
                log.skipped.append(f"line {number}: {problem}")
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or exc}") from None
    return log


TOKEN = ":::MLLOG"
# The longest line a log may have. The MLPerf logger writes lines of well under a kilobyte; the
# compliance checker's parser takes time quadratic in a record line's length (its `.*:::MLLOG `
# substitution), so a log with a longer record line is not given to it.
MAX_LINE = 16 * 1024
_CHUNK = 1 << 16


def records(source, skipped: list | None = None):
    """(line number, record) for each :::MLLOG line of a log that holds a JSON object, in one pass.

    `source`: the log's text, or its path (read a line at a time, never more than MAX_LINE
    characters of one line in memory). With `skipped`, a list, each record line left out is added
    to it as "line N: why" (over MAX_LINE, not JSON, nested too deeply, not an object)."""
    def note(number: int, why: str) -> None:
        if skipped is not None:
            skipped.append(f"line {number}: {why}")

    for number, line, length, token in _lines(source):
        if not token:
            continue
        if length > MAX_LINE:
            note(number, f"{length} characters, over the {MAX_LINE}-character limit of a log line")
            continue
        rec, why = _record(line)
        if rec is not None:
            yield number, rec
        elif why:
            note(number, why)


def _lines(source):
    """(number, line, length, holds TOKEN) for each line; a line over MAX_LINE comes as "" with its length."""
    if isinstance(source, str):
        for number, line in enumerate(source.splitlines(), start=1):
            yield number, line if len(line) <= MAX_LINE else "", len(line), TOKEN in line
        return
    with open(source, encoding="utf-8", errors="replace", newline="") as handle:
        number = 0
        while True:
            line = handle.readline(MAX_LINE + 1)
            if not line:
                return
            number += 1
            if len(line) <= MAX_LINE or line.endswith(("\n", "\r")):
                text = line.rstrip("\r\n")
                yield number, text, len(text), TOKEN in text
                continue
            length, token, tail = len(line), TOKEN in line, line[-len(TOKEN):]
            while not line.endswith(("\n", "\r")):   # the rest of an over-long line: read, never kept
                line = handle.readline(_CHUNK)
                if not line:
                    break
                token = token or TOKEN in tail + line
                tail, length = line[-len(TOKEN):], length + len(line)
            yield number, "", length - (len(line) - len(line.rstrip("\r\n"))), token


def _record(line: str):
    """(record, None), or (None, why) for a record line that is not one JSON object ((None, None):
    the token is there but no record follows it, as in a line that merely mentions it)."""
    body = line[line.find(TOKEN) + len(TOKEN):].strip()
    if not body.startswith("{"):
        return None, None
    try:
        rec = json.loads(body)
    except RecursionError:
        return None, "the record is nested too deeply"
    except ValueError as exc:   # not JSON, or a number of more digits than Python converts
        return None, f"not a JSON record ({shown(str(exc).splitlines()[0], 120)})"
    if not isinstance(rec, dict):
        return None, "not a JSON object"
    return rec, None


def _read_record(log: RunLog, rec: dict) -> str | None:
    """Take what the score needs from one record; why it was left out, for a record of the wrong
    shape (a key that is not text, metadata that is not a mapping, a status that is not text)."""
    key, value, meta = rec.get("key"), rec.get("value"), rec.get("metadata")
    if not isinstance(key, str):
        return f"its key is {shown(key)}, not a name"
    if meta is None:
        meta = {}
    elif not isinstance(meta, dict):
        return f"the {shown(key)} record's metadata is {shown(meta)}, not a mapping"
    t = rec.get("time_ms")
    if key in ("run_start", "run_stop", "eval_accuracy", "epoch_start"):
        t = _number(t)
    if key == "run_start" and log.run_start_ms is None:
        log.run_start_ms = t
    elif key == "run_stop":
        status = meta.get("status")
        if not isinstance(status, str):
            return f"the run_stop record's status is {shown(status)}, not a word such as success"
        log.run_stop_ms, log.status = t, status
        log.throughput = meta.get("throughput") if isinstance(meta.get("throughput"), str) else None
    elif key == "epoch_start" and meta.get("epoch_num") is not None:
        log.epochs_run = _number(meta["epoch_num"])
    elif key == "eval_accuracy" and isinstance(value, dict) and "BBOX" in value and "SEGM" in value:
        epoch = meta.get("epoch_num")
        log.evals.append((t, None if epoch is None else _number(epoch), _number(value["BBOX"]),
                          _number(value["SEGM"])))
    elif key in ("submission_org", "submission_division", "submission_status", "submission_platform"):
        log.submission[key.removeprefix("submission_")] = _text(value)
    elif key == "submission_benchmark":
        log.benchmark = _text(value)
    elif key == "seed" and log.seed is None:
        log.seed = value if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() < 64 else None
    elif key in ("config_name", "system_config") and isinstance(value, str):
        log.config = value
    elif key == "model" and isinstance(value, str):
        log.model = value
    elif key == SOURCES_KEY and isinstance(value, str):
        log.sources_digest = value
    elif isinstance(value, dict) and "target" in key and "BBOX" in value and "SEGM" in value:
        # an open-division run's own quality targets, e.g. {"key": "quality_target", "value": {...}}
        log.targets = {"BBOX": _number(value["BBOX"]), "SEGM": _number(value["SEGM"])}
        log.targets_from_log = True
    elif key in ("bbox_target", "segm_target") and isinstance(value, (int, float)):
        log.targets[key.split("_")[0].upper()] = float(_number(value))
        log.targets_from_log = True
    return None


def _number(value) -> float:
    """A finite JSON number (bools and strings are not numbers, though Python would take them; an
    integer beyond a float's range or an Infinity would make every sum after it meaningless)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        raise ValueError(f"{shown(value)} is not a finite number")
    return value


def _text(value) -> str:
    """A record's value where text belongs (an organisation, a division): text as it is, anything
    else by its type, never a structure's full rendering."""
    return value if isinstance(value, str) else shown(value)


def result_files(folder: Path) -> dict[int, Path]:
    """result_<i>.txt files of a folder by run index."""
    found = {}
    for p in Path(folder).glob("result_*.txt"):
        m = RESULT_NAME.match(p.name)
        if m and p.is_file():
            found[int(m.group(1))] = p
    return dict(sorted(found.items()))


def over_long_line(path: Path) -> str | None:
    """Why MLCommons' checkers must not be given this log (their parser is quadratic in a record
    line's length): its first record line over MAX_LINE, or None when it has none."""
    try:
        number = next((n for n, _, length, token in _lines(Path(path)) if token and length > MAX_LINE), None)
    except OSError as exc:
        return f"cannot read {path}: {exc.strerror or exc}"
    if number is None:
        return None
    return (f"{Path(path).name} line {number} is over the {MAX_LINE}-character limit of a log line (not a log "
            "the MLPerf logger wrote)")


CHECKER_TIMEOUT = 300  # seconds for one log or one folder; package-wide checks get PACKAGE_CHECKER_TIMEOUT
PACKAGE_CHECKER_TIMEOUT = 1800


def run_checker(tool: str, *args: str, cwd, timeout: int = CHECKER_TIMEOUT) -> tuple[int | None, str]:
    """`python -m mlperf_logging.<tool> ARGS` with this interpreter, in `cwd` (the checkers write files
    where they run): its exit code and its output (stdout then stderr); exit code None when it ran
    past `timeout` seconds. The one way the project runs the MLCommons checkers."""
    try:
        proc = subprocess.run([sys.executable, "-m", f"mlperf_logging.{tool}", *args], capture_output=True,
                              text=True, timeout=timeout, cwd=cwd)
    except subprocess.TimeoutExpired:
        return None, ""
    return proc.returncode, proc.stdout + proc.stderr


def check_compliance(path: Path, ruleset: str) -> tuple[bool, list[str]]:
    """Run the MLCommons compliance checker (training usage) on one log: (passed, its messages).

    Messages are the checker's WARNING/ERROR lines without the level prefix, e.g. the failed rule;
    the final FAILED/SUCCESS verdict is in the bool. A log with a record line over MAX_LINE fails
    without being given to the checker, whose parser would take minutes over it.
    """
    too_long = over_long_line(path)
    if too_long:
        return False, [f"{too_long}: not given to the compliance checker"]
    with tempfile.TemporaryDirectory(prefix="mlperf-compliance-") as tmp:
        code, output = run_checker("compliance_checker", "--usage", "training", "--ruleset", ruleset, "--log_output",
                                   os.path.join(tmp, "checker.log"), str(Path(path).resolve()), cwd=tmp)
    if code is None:
        return False, [f"compliance checker did not finish within {CHECKER_TIMEOUT} s"]
    messages = []
    if "Traceback (most recent call last)" in output:  # the checker itself crashed on the log: say on what
        last = output.strip().splitlines()[-1]
        messages.append(f"the compliance checker crashed on this log ({shown(last.strip(), 160)})")
    for line in output.splitlines():
        m = re.match(r"^(WARNING|ERROR)\s+-\s+(.*)$", line)
        if m and m.group(2).strip() != "FAILED":
            messages.append(m.group(2).strip())
        elif line.startswith(("usage:", "mlperf_logging")):
            messages.append(line.strip())
    ok = code == 0 and re.search(r"^INFO\s+-\s+SUCCESS", output, re.M) is not None
    if not ok and not messages:
        messages.append(output.strip().splitlines()[-1] if output.strip() else f"checker exited {code}")
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


def rcp_rulesets() -> list[str]:
    """The training rulesets mlperf-logging's RCP checker has reference convergence points for (it
    refuses the others: "RCP Checker only supported in 1.0.0, ...")."""
    from importlib import resources

    folder = resources.files("mlperf_logging") / "rcp_checker"
    return sorted(p.name.removeprefix("training_") for p in folder.iterdir()
                  if re.fullmatch(r"training_\d+\.\d+\.\d+", p.name))


def check_rcp(folder: Path, ruleset: str) -> tuple[bool, str]:
    """mlperf-logging's RCP checker on a folder of closed-division logs (the check the package
    checker makes): (passed, its verdict line, e.g. "RCP found, RCP test PASSED")."""
    too_long = next(filter(None, map(over_long_line, result_files(folder).values())), None)
    if too_long:
        return False, f"not checked: {too_long}"
    with tempfile.TemporaryDirectory(prefix="mlperf-rcp-") as tmp:
        code, output = run_checker("rcp_checker", str(Path(folder).resolve()), "--rcp_usage", "training",
                                   "--rcp_version", ruleset, "--rcp_pass", "pruned_rcps",
                                   "--log_output", os.path.join(tmp, "rcp.log"), cwd=tmp)
    if code is None:
        return False, f"the RCP checker did not finish within {CHECKER_TIMEOUT} s"
    verdict = re.findall(r"^(?:INFO|ERROR)\s+-\s+(.*RCP test (?:PASSED|FAILED).*?)(?:, consider.*)?$", output, re.M)
    normalised = re.findall(r"Score should be normalized by factor of .*", output)
    message = verdict[-1] if verdict else (output.strip().splitlines() or [f"exit {code}"])[-1]
    return code == 0, message + (f" ({normalised[-1]})" if normalised else "")
