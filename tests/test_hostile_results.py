"""Hostile result logs, series and folders through the commands a user types (`invoke time --from-logs`,
`invoke time`, `invoke all`, `invoke package`): each is one `error:` line or a record left out with its
reason, never a traceback, a hang, a wrong score, or a file outside the folder it belongs in."""
from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from conftest import one_error_line, run_invoke
from tests.support.mllog_writer import T0, write_log
from mlperf import project
from test_results import NVIDIA_SYSTEM_INFO, REFERENCE, nvidia_series


def open_series_logs(folder: Path, minutes=(30, 31, 32, 33, 34)) -> list[Path]:
    """Five open-division logs (no RCP judges them): a score of the middle three, 32.00, when all count."""
    return [write_log(folder / f"result_{i}.txt", minutes=m, division="open", seed=i + 1,
                      final=(0.06, 0.055), targets={"BBOX": 0.05, "SEGM": 0.05}) for i, m in enumerate(minutes)]


def summary_of(sandbox: dict, name: str) -> dict:
    return json.loads((Path(sandbox["INVOKE_MLPERF_RESULTS_DIR"]) / "scores" / name / "summary.json").read_text())


def no_traceback(proc) -> None:
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stdout[-3000:] + proc.stderr[-3000:]


# --- one pass over a log, with a line-length cap --------------------------------------------------


@pytest.mark.slow
def test_long_lines_are_left_out_in_linear_time_and_never_given_to_the_checker(tmp_path, sandbox):
    """2 MB of `:::MLLOG {` made the old reader's regex rescan from each of them (minutes); a 600 KB record
    made the compliance checker's own parser quadratic (its `.*:::MLLOG ` substitution: minutes more)."""
    logs = tmp_path / "long-lines"
    paths = open_series_logs(logs)
    n = len(paths[2].read_text().splitlines())
    with paths[2].open("a") as log:
        log.write(":::MLLOG {" * 200_000 + "\n")
        log.write(":::MLLOG " + json.dumps({"key": "x", "value": "a" * 600_000, "time_ms": T0}) + "\n")
    began = time.monotonic()
    proc = run_invoke(["time", "--from-logs", str(logs)], env=sandbox, timeout=120)
    assert time.monotonic() - began < 90
    no_traceback(proc)
    assert proc.returncode == 0, proc.stderr
    assert f"run 2: line {n + 1}: 2000000 characters, over the 16384-character limit of a log line: left out" \
        in proc.stdout
    assert f"run 2: line {n + 2}: 600" in proc.stdout
    runs = {r["index"]: r for r in summary_of(sandbox, "long-lines")["runs"]}
    assert runs[2]["dropped"] and runs[2]["compliant"] is False
    assert "not given to the compliance checker" in runs[2]["messages"][0]
    assert "score: 32.67 minutes" in proc.stdout       # 31, 33, 34: the dropped run counts as the slowest


# --- run times ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_run_whose_run_stop_precedes_run_start_is_dropped_with_the_reason(tmp_path, sandbox):
    logs = tmp_path / "backwards"
    open_series_logs(logs, minutes=(30, 31, 32, 33, -18518.5))
    proc = run_invoke(["time", "--from-logs", str(logs)], env=sandbox)
    no_traceback(proc)
    assert proc.returncode == 0, proc.stderr
    assert "run 4 dropped: run time -18518.50 minutes: run_stop does not come after run_start" in proc.stdout
    summary = summary_of(sandbox, "backwards")
    assert summary["score"]["minutes"] == pytest.approx(32.0) and summary["score"]["dropped"] == [4]
    assert "score: 32.00 minutes" in proc.stdout and "-" not in proc.stdout.split("score: ")[1][:12]


# --- records the MLPerf logger never writes ---------------------------------------------------------


def edited(tmp_path: Path, name: str, edit) -> Path:
    """A one-run folder whose log went through `edit(list of records) -> list of lines`."""
    path = write_log(tmp_path / name / "result_0.txt", minutes=10, division="open", targets={"BBOX": 0.05, "SEGM": 0.05},
                     final=(0.06, 0.055))
    recs = [json.loads(line.split(":::MLLOG ", 1)[1]) for line in path.read_text().splitlines()]
    path.write_text("\n".join(edit(recs)) + "\n")
    return path.parent


def lines(recs):
    return [":::MLLOG " + json.dumps(r) for r in recs]


def replace(key, change):
    """An edit that replaces the first `key` record's JSON line by change(record) (a line of text)."""
    def edit(recs):
        out, done = [], False
        for r in recs:
            if r["key"] == key and not done:
                out.append(change(r))
                done = True
            else:
                out.append(":::MLLOG " + json.dumps(r))
        return out
    return edit


def with_field(**fields):
    return lambda r: ":::MLLOG " + json.dumps({**r, **fields})


def raw_value(field: str, text: str):
    """The record with `field` set to `text` as it stands in the JSON (a number json.dumps cannot write)."""
    return lambda r: ":::MLLOG " + json.dumps({**r, field: "@@"}).replace('"@@"', text)


LEFT_OUT = {
    # a record nested 100000 deep: over the line limit; 5000 deep fits in it, and is too deep to read
    "nested-100000": (lambda recs: lines(recs) + [':::MLLOG {"key": "x", "value": ' + "[" * 100_000 + "]" * 100_000 + "}"],
                      "characters, over the 16384-character limit"),
    "nested-5000": (lambda recs: lines(recs) + [':::MLLOG {"key": "x", "value": ' + "[" * 5000 + "]" * 5000 + "}"],
                    "the record is nested too deeply"),
    "digits-5000": (replace("seed", raw_value("value", "7" * 5000)), "Exceeds the limit (4300 digits)"),
    "metadata-list": (replace("eval_accuracy", with_field(metadata=[1, 2])),
                      "the 'eval_accuracy' record's metadata is <list>, not a mapping"),
    "status-mapping": (replace("run_stop", with_field(metadata={"status": {"ok": True}})),
                       "the run_stop record's status is <dict>, not a word such as success"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(LEFT_OUT))
def test_a_record_no_logger_writes_is_left_out_with_its_reason(case, tmp_path, sandbox):
    edit, reason = LEFT_OUT[case]
    proc = run_invoke(["time", "--from-logs", str(edited(tmp_path, case, edit))], env=sandbox)
    no_traceback(proc)
    left_out = [line for line in proc.stdout.splitlines() if line.startswith("run 0: line ")]
    assert left_out and reason in left_out[0] and left_out[0].endswith(": left out"), proc.stdout
    one_error_line(proc, "no MLPerf score")      # one run is never an MLPerf score; the summary is written
    summary = summary_of(sandbox, case)
    assert reason in summary["runs"][0]["skipped"][0]
    if case == "status-mapping":                 # without its run_stop the run has no end: dropped, not scored
        assert summary["runs"][0]["dropped"] and summary["score"]["minutes"] is None


ONE_LINE = {
    "time-1e400": (replace("run_stop", raw_value("time_ms", "1e400")), "'run_stop' record"),
    "time-10^400": (replace("run_stop", raw_value("time_ms", "1" + "0" * 400)), "'run_stop' record"),
    "accuracy-infinity": (replace("eval_accuracy", raw_value("value", '{"BBOX": Infinity, "SEGM": 0.3}')),
                          "'eval_accuracy' record"),
}


@pytest.mark.parametrize("case", sorted(ONE_LINE))
def test_a_time_or_accuracy_that_is_not_finite_is_one_line(case, tmp_path, sandbox):
    edit, record = ONE_LINE[case]
    proc = run_invoke(["time", "--from-logs", str(edited(tmp_path, case, edit))], env=sandbox)
    one_error_line(proc, "result_0.txt line", record, "not a finite number")
    assert not (Path(sandbox["INVOKE_MLPERF_RESULTS_DIR"]) / "scores" / case / "summary.json").exists()


# --- arguments ----------------------------------------------------------------------------------


@pytest.mark.parametrize("task", ["time", "all"])
def test_runs_that_is_not_a_number_is_one_line(task, tmp_path, sandbox):
    proc = run_invoke([task, "--runs", "abc", "--dataset", "shapes"], env=sandbox)
    one_error_line(proc, "--runs must be a whole number of at least 1, not 'abc'")
    assert not (Path(sandbox["INVOKE_MLPERF_RESULTS_DIR"])).exists() or not any(
        Path(sandbox["INVOKE_MLPERF_RESULTS_DIR"]).rglob("series.json"))


# --- folders that cannot be written ---------------------------------------------------------------


@pytest.fixture
def unwritable(tmp_path):
    """make(kind) -> a folder that cannot be written: "read-only" (a read-only bind mount; chmod stops no root
    process) or "full" (a 64 KiB tmpfs, filled), as a shared vfolder or a full disk is. Needs root to mount."""
    mounted = []

    def make(kind: str) -> Path:
        folder = tmp_path / kind
        folder.mkdir()
        if kind == "read-only":
            source = tmp_path / "ro-source"
            source.mkdir()
            commands = [["mount", "--bind", str(source), str(folder)], ["mount", "-o", "remount,ro,bind", str(folder)]]
        else:
            commands = [["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(folder)]]
        for cmd in commands:
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode:
                pytest.skip(f"cannot mount here (needs root): {proc.stderr.strip()}")
            if folder not in mounted:
                mounted.append(folder)
        if kind == "full":
            fd = os.open(folder / "filler", os.O_WRONLY | os.O_CREAT)
            try:
                while os.write(fd, b"x" * 4096):
                    pass
            except OSError:
                pass
            finally:
                os.close(fd)
        return folder

    yield make
    for folder in mounted:
        subprocess.run(["umount", "-l", str(folder)], check=True)


@pytest.mark.parametrize("kind", ["read-only", "full"])
def test_from_logs_into_a_folder_that_cannot_be_written_is_one_line(kind, unwritable, tmp_path, sandbox):
    logs = tmp_path / "logs"
    open_series_logs(logs)
    before = {p.name: p.read_bytes() for p in logs.iterdir()}
    results = unwritable(kind)
    proc = run_invoke(["time", "--from-logs", str(logs), "--results-dir", str(results)], env=sandbox)
    line = one_error_line(proc, "cannot write", str(results), "free there", "--results-dir")
    assert ("No space left on device" in line) == (kind == "full") and ("Read-only" in line) == (kind == "read-only")
    assert {p.name: p.read_bytes() for p in logs.iterdir()} == before


def test_time_into_a_read_only_results_folder_is_one_line(unwritable, tiny_shapes, sandbox):
    results = unwritable("read-only")
    proc = run_invoke(["time", *tiny_shapes["args"], "--runs", "1", "--max-epochs", "1", "--results-dir", str(results)],
                      env={**sandbox, "BACKENDAI_CLUSTER_HOSTS": ""})
    one_error_line(proc, "cannot write", str(results), "Read-only file system", "--results-dir")


def test_package_into_a_full_output_folder_is_one_line(unwritable, tmp_path, sandbox):
    root = nvidia_series(Path(sandbox["INVOKE_MLPERF_RESULTS_DIR"]))
    info = tmp_path / "info.json"
    info.write_text(json.dumps(NVIDIA_SYSTEM_INFO))
    out = unwritable("full")
    proc = run_invoke(["package", "--series", root.name, "--ruleset", "3.0.0", "--output", str(out),
                       "--system-info", str(info)], env=sandbox)
    one_error_line(proc, "cannot write", str(out), "No space left on device", "free there", "--output")
    assert sorted(p.name for p in out.iterdir()) == ["filler"]     # no half tree left behind


# --- names from files that become folders -----------------------------------------------------------


def test_an_org_from_the_logs_that_climbs_out_of_output_is_refused(tmp_path, sandbox):
    root = nvidia_series(Path(sandbox["INVOKE_MLPERF_RESULTS_DIR"]))
    escape = tmp_path / "escaped"
    for log in (root / "results" / "dgxh100" / "maskrcnn").iterdir():
        log.write_text(log.read_text().replace('"value": "NVIDIA"', json.dumps({"value": f"/../../../{escape}"})[1:-1]))
    out = tmp_path / "deep" / "er" / "out"
    info = tmp_path / "info.json"
    info.write_text(json.dumps(NVIDIA_SYSTEM_INFO))
    proc = run_invoke(["package", "--series", root.name, "--ruleset", "3.0.0", "--output", str(out),
                       "--system-info", str(info)], env=sandbox)
    one_error_line(proc, "submission_org", "is not a plain file name")
    assert not escape.exists() and not list(tmp_path.glob(".*invoke-package*"))


@pytest.mark.parametrize("damage", ["system ../../x", "cut off"])
def test_a_damaged_series_json_is_one_line(damage, tmp_path, sandbox):
    root = nvidia_series(Path(sandbox["INVOKE_MLPERF_RESULTS_DIR"]))
    meta = root / "series.json"
    if damage == "cut off":
        meta.write_text(meta.read_text()[:40])
    else:
        meta.write_text(json.dumps({**json.loads(meta.read_text()), "system": "../../x"}))
    proc = run_invoke(["package", "--series", root.name, "--ruleset", "3.0.0", "--output", str(tmp_path / "out")],
                      env=sandbox)
    line = one_error_line(proc, str(meta))
    assert ("is damaged" in line) if damage == "cut off" else ("is not a plain file name" in line)
    assert not (tmp_path / "out").exists() and not (tmp_path / "x").exists()


# --- the code that ran -----------------------------------------------------------------------------


def test_package_refuses_code_that_differs_from_what_ran_naming_the_files(tmp_path, sandbox):
    """The series records another hash for mlperf/launch.py (as if it had been edited since), and its logs name
    the digest of that record: the package would hold code no run ran."""
    root = nvidia_series(Path(sandbox["INVOKE_MLPERF_RESULTS_DIR"]))
    meta = root / "series.json"
    settings = json.loads(meta.read_text())
    old = settings["sources_digest"]
    settings["sources"]["mlperf/launch.py"] = "0" * 64
    settings["sources_digest"] = project.sources_digest(files=settings["sources"])
    meta.write_text(json.dumps(settings))
    logs = root / "results" / "dgxh100" / "maskrcnn"
    package = ["package", "--series", root.name, "--ruleset", "3.0.0", "--output", str(tmp_path / "out")]
    line = one_error_line(run_invoke(package, env=sandbox))
    assert "result_0.txt, result_1.txt, result_2.txt, result_3.txt, result_4.txt did not run the code" in line
    for log in logs.iterdir():
        log.write_text(log.read_text().replace(old, settings["sources_digest"]))
    line = one_error_line(run_invoke(package, env=sandbox))
    assert "the code here differs from what series dgxh100-v3.0 ran (mlperf/launch.py)" in line
    assert not (tmp_path / "out").exists()


# --- rulesets before RCPs ---------------------------------------------------------------------------


@pytest.mark.slow
def test_a_v07_result_is_scored_as_mlcommons_scored_it(tmp_path, sandbox):
    """NVIDIA's v3.0 logs without gradient_accumulation_steps, as v0.7 logs were (rulesets from 1.0.0 require it,
    0.7.0's checker does not know it): the RCP checker has no 0.7 (its "RCP Checker only supported in 1.0.0, ...")."""
    logs = tmp_path / "v0.7"
    logs.mkdir()
    for i in range(5):
        text = (REFERENCE / f"result_{i}.txt").read_text()
        (logs / f"result_{i}.txt").write_text("".join(line for line in text.splitlines(keepends=True)
                                                      if '"key": "gradient_accumulation_steps"' not in line))
    proc = run_invoke(["time", "--from-logs", str(logs), "--ruleset", "0.7.0"], env=sandbox)
    no_traceback(proc)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr
    assert "score: 19.18 minutes" in proc.stdout and "RCP: not applicable (ruleset 0.7.0 predates RCPs)" in proc.stdout
    summary = summary_of(sandbox, "v0.7")
    assert summary["score"]["kind"] == "mlperf" and summary["score"]["dropped"] == [2]
    three = run_invoke(["time", "--from-logs", str(logs), "--ruleset", "3.0.0"], env=sandbox)
    assert "every run fails ruleset 3.0.0, and they pass" in three.stdout      # they are not 3.0.0 logs
    assert os.path.isdir(logs) and sorted(p.name for p in logs.iterdir()) == [f"result_{i}.txt" for i in range(5)]
