"""`invoke time`: scoring rules, the real compliance checker, summary files, plot, refusal to overwrite,
and the system description. Logs are synthetic (tests/support/mllog_writer.py) or NVIDIA's published ones."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from conftest import ROOT, one_error_line, run_invoke
from tests.support.mllog_writer import write_log
from mlperf import host, project
from mlperf.errors import UserError
from mlperf.results import system_desc
from mlperf.results.logs import RunLog, parse_log
from mlperf.results.score import run_result, score
from mlperf.results.series import open_series

REFERENCE = ROOT / "tests" / "data" / "nvidia-dgxh100-maskrcnn-v3.0"  # tests/data/README.md: source


def run(index, minutes, status="success", compliant=True):
    """A RunResult as evaluate() makes it: dropped when not success or not compliant."""
    return run_result(index, _FakeLog(minutes, status), (compliant, [] if compliant else ["rule"]))


class _FakeLog(RunLog):
    """A parsed log with a given duration and status (the scoring rules need nothing else)."""

    def __init__(self, minutes, status):
        super().__init__(path=Path(f"result_{minutes}.txt"), run_start_ms=0, run_stop_ms=int(minutes * 60000),
                         status=status)


# --- scoring rules, on parsed runs -----------------------------------------------------------


def test_all_succeed_drops_fastest_and_slowest():
    s = score([run(0, 14), run(1, 10), run(2, 12), run(3, 11), run(4, 13)])
    assert s.kind == "mlperf" and s.minutes == pytest.approx(12.0)
    assert s.used == [2, 3, 4] and s.dropped == []


def test_one_aborted_counts_as_slowest_even_when_quick():
    s = score([run(0, 10), run(1, 11), run(2, 5, "aborted"), run(3, 12), run(4, 13)])
    assert s.kind == "mlperf" and s.dropped == [2]
    assert s.minutes == pytest.approx(12.0)        # 10 set aside as fastest, the aborted as slowest
    assert s.used == [1, 3, 4]


def test_two_dropped_means_no_score():
    s = score([run(0, 10), run(1, 11, "aborted"), run(2, 12), run(3, 13, compliant=False), run(4, 14)])
    assert s.minutes is None and s.kind == "none"
    assert s.dropped == [1, 3] and "no score" in s.note


def test_checker_failure_is_dropped():
    r = run(0, 9, compliant=False)
    assert r.dropped and "compliance" in r.reason
    s = score([r, run(1, 10), run(2, 11), run(3, 12), run(4, 13)])
    assert s.minutes == pytest.approx(12.0) and s.used == [2, 3, 4]
    # 9 minutes, the quickest, is not the "fastest" set aside: it is the dropped (slowest) one
    assert s.dropped == [0]


def test_crashed_run_without_log_is_dropped():
    r = run_result(3, None, None, crashed_rc=1)
    assert r.dropped and r.status == "crashed" and "exited 1" in r.reason


@pytest.mark.parametrize("spec, minutes, kind", [
    ([(10, "success")], 10.0, "mean"),
    ([(10, "success"), (20, "aborted")], 10.0, "mean"),
    ([(10, "success"), (20, "success")], 15.0, "mean"),
    ([(10, "aborted"), (20, "aborted")], None, "none"),
    ([(10, "success"), (12, "success"), (14, "success")], 12.0, "olympic"),
    ([(10, "success"), (12, "success"), (14, "aborted"), (11, "success")], 11.5, "olympic"),
])
def test_other_run_counts(spec, minutes, kind):
    s = score([run(i, m, st) for i, (m, st) in enumerate(spec)])
    assert s.kind == kind
    assert s.minutes == (pytest.approx(minutes) if minutes is not None else None)
    if kind in ("mean", "olympic"):
        assert "not an MLPerf score" in s.note


# --- through `invoke time --from-logs`, with the real checker -------------------------------


def _summary(results_dir: Path, name: str) -> dict:
    return json.loads((results_dir / "scores" / name / "summary.json").read_text())


def no_mlperf_score(proc, why: str = "not an MLPerf score") -> None:
    """The scoring ran and was printed, and the command failed because the score is not MLPerf's."""
    assert "| run | minutes |" in proc.stdout
    one_error_line(proc, "no MLPerf score: ", why)


@pytest.mark.slow
def test_from_logs_scores_synthetic_series(tmp_path, sandbox):
    logs = tmp_path / "published"
    for i, minutes in enumerate([30, 31, 32, 33]):
        write_log(logs / f"result_{i}.txt", minutes=minutes, seed=i + 1)
    write_log(logs / "result_4.txt", minutes=20, break_rule=True, seed=5)   # quickest, but non-compliant
    proc = run_invoke(["time", "--from-logs", str(logs)], env=sandbox)
    no_mlperf_score(proc, "the RCP check failed")   # closed logs at batch 16: no reference convergence point
    assert "score: 32.00 minutes" in proc.stdout
    results_dir = Path(sandbox["INVOKE_MLPERF_RESULTS_DIR"])
    summary = _summary(results_dir, "published")
    by_index = {r["index"]: r for r in summary["runs"]}
    assert [by_index[i]["compliant"] for i in range(5)] == [True, True, True, True, False]
    assert by_index[4]["dropped"] and "global_batch_size" in by_index[4]["messages"][0]
    assert by_index[0]["epochs"] == 4 and by_index[0]["bbox"] == pytest.approx(0.38)
    assert summary["score"]["minutes"] == pytest.approx(32.0) and summary["score"]["used"] == [1, 2, 3]
    assert summary["targets"] == {"BBOX": 0.377, "SEGM": 0.339}

    out = results_dir / "scores" / "published"
    md = (out / "summary.md").read_text()
    assert "| 4 | 20.00 | 4 | 0.3800 | 0.3450 | success (dropped) | FAIL |" in md
    assert "score: 32.00 minutes" in md
    with Image.open(out / "plot.png") as img:
        assert img.format == "PNG" and img.size[0] >= 600
        colours = img.convert("RGB").getcolors(maxcolors=1 << 16)
        assert colours is None or len(colours) > 20          # lines, text and legend, not a blank canvas
    assert sorted(p.name for p in logs.iterdir()) == [f"result_{i}.txt" for i in range(5)]  # input untouched


@pytest.mark.slow
def test_open_division_targets_come_from_the_log(tmp_path, sandbox):
    logs = tmp_path / "shapes-run"
    write_log(logs / "result_0.txt", minutes=2, division="open", final=(0.06, 0.055),
              targets={"BBOX": 0.05, "SEGM": 0.05})
    proc = run_invoke(["time", "--from-logs", str(logs)], env=sandbox)
    no_mlperf_score(proc, "mean of 1 successful run(s) of 1")
    summary = _summary(Path(sandbox["INVOKE_MLPERF_RESULTS_DIR"]), "shapes-run")
    assert summary["targets"] == {"BBOX": 0.05, "SEGM": 0.05} and summary["division"] == "open"
    assert summary["runs"][0]["compliant"] and summary["runs"][0]["epochs"] == 4
    assert summary["score"]["kind"] == "mean" and "not an MLPerf score" in proc.stdout


@pytest.mark.slow
def test_a_series_without_a_score_fails_after_writing_its_summary(tmp_path, sandbox):
    logs = tmp_path / "two-aborted"
    for i in range(5):
        aborted = {"status": "aborted", "final": (0.2, 0.2)} if i < 2 else {}
        write_log(logs / f"result_{i}.txt", minutes=30 + i, seed=i + 1, **aborted)
    proc = run_invoke(["time", "--from-logs", str(logs)], env=sandbox)
    line = one_error_line(proc, "2 runs dropped (0, 1): no score (MLPerf allows one)", "summary.md")
    assert "| 0 | 30.00 |" in proc.stdout                      # the table still shows each run
    summary = _summary(Path(sandbox["INVOKE_MLPERF_RESULTS_DIR"]), "two-aborted")
    assert summary["score"]["minutes"] is None and line.endswith("scores/two-aborted/summary.md")


@pytest.mark.slow
def test_reference_nvidia_dgxh100_scores_19_18(sandbox):
    assert REFERENCE.is_dir(), f"NVIDIA's published logs belong in {REFERENCE} (tests/data/README.md)"
    proc = run_invoke(["time", "--from-logs", str(REFERENCE), "--ruleset", "3.0.0"], env=sandbox, check=True)
    assert "score: 19.18 minutes" in proc.stdout
    summary = _summary(Path(sandbox["INVOKE_MLPERF_RESULTS_DIR"]), REFERENCE.name)
    runs = {r["index"]: r for r in summary["runs"]}
    assert runs[2]["status"] == "aborted" and runs[2]["dropped"]
    assert runs[2]["minutes"] == pytest.approx(39.22, abs=0.005)
    assert all(runs[i]["compliant"] and runs[i]["epochs"] == 14 for i in (0, 1, 3, 4))
    # mlperf-logging 4.x fails the aborted run on its only unmet rule: the quality target was never reached
    assert runs[2]["compliant"] is False
    assert len(runs[2]["messages"]) == 1 and "BBOX'] >= 0.377" in runs[2]["messages"][0]
    assert summary["score"] == {"minutes": pytest.approx(19.18, abs=0.005), "kind": "mlperf",
                                "note": summary["score"]["note"], "used": [1, 3, 4], "dropped": [2],
                                "rcp": "RCP Interpolation, RCP test PASSED"}  # closed division: RCPs judge it


def test_from_logs_without_logs_is_one_line(tmp_path, sandbox):
    proc = run_invoke(["time", "--from-logs", str(tmp_path)], env=sandbox)
    assert proc.returncode == 1
    assert proc.stderr.strip().startswith("error: no result_*.txt in") and len(proc.stderr.splitlines()) == 1


# --- the results tree ------------------------------------------------------------------------


def test_finished_series_is_never_overwritten(tmp_path, sandbox):
    results_dir = Path(sandbox["INVOKE_MLPERF_RESULTS_DIR"])
    settings = {"runs": 2, "dataset": "shapes", "config": None, "max_epochs": None, "gpus": None,
                "ruleset": "3.1.0", "system": "testbox"}
    series = open_series(results_dir, "s1", settings)
    assert len(set(series.settings["seeds"])) == 2               # distinct seeds, recorded up front
    finished = [write_log(series.log(i), minutes=3 + i) for i in range(2)]
    before = [(p.read_bytes(), p.stat().st_mtime_ns) for p in finished]

    proc = run_invoke(["time", "--series", "s1", "--runs", "2", "--dataset", "shapes"], env=sandbox)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: series s1 is finished")
    assert "Traceback" not in proc.stderr
    assert [(p.read_bytes(), p.stat().st_mtime_ns) for p in finished] == before

    # a folder of result files this tool did not make is refused too, and left alone
    foreign = results_dir / "theirs" / "results" / "x" / "maskrcnn" / "result_0.txt"
    write_log(foreign, minutes=5)
    proc = run_invoke(["time", "--series", "theirs", "--runs", "1"], env=sandbox)
    assert proc.returncode == 1 and "not a series of this tool" in proc.stderr
    assert not (results_dir / "theirs" / "series.json").exists()


def test_resumed_series_keeps_seeds_and_refuses_other_settings(tmp_path):
    settings = {"runs": 3, "dataset": "shapes", "config": None, "max_epochs": None, "gpus": None,
                "ruleset": "3.1.0", "system": "testbox"}
    first = open_series(tmp_path, "s2", settings)
    write_log(first.log(0), minutes=3)
    again = open_series(tmp_path, "s2", settings)
    assert again.settings["seeds"] == first.settings["seeds"] and list(again.finished()) == [0]
    with pytest.raises(UserError, match="other settings.*runs=3"):
        open_series(tmp_path, "s2", dict(settings, runs=5))


# --- system description ----------------------------------------------------------------------


def test_detect_system_fields_and_types(tmp_path):
    from mlperf_logging.system_desc_checker.system_desc_checker import check_system_desc

    desc = system_desc.detect_system("testbox", submitter="tests", division="open", status="research")
    assert tuple(desc) == system_desc.SYSTEM_DESC_FIELDS
    assert all(isinstance(v, str) for k, v in desc.items() if k != "other_software_stack")
    assert isinstance(desc["other_software_stack"], dict)
    gpus = host.gpus()
    assert desc["accelerators_per_node"] == str(len(gpus))
    if not gpus:            # this CPU machine, and CI: no accelerator, said so rather than left blank
        assert desc["accelerators_per_node"] == "0"
        assert desc["accelerator_model_name"] == desc["accelerator_memory_capacity"] == "N/A (no accelerator)"
    assert desc["host_storage_capacity"].endswith(" GB") and desc["host_networking_topology"] == "N/A (single node)"
    assert desc["status"] == "Research, Development, or Internal (RDI)"     # no ruleset: the checker's words
    assert system_desc.detect_system("testbox", status="onprem", ruleset="3.1.0")["status"] == "onprem"
    assert system_desc.detect_system("testbox", status="onprem", ruleset="4.0.0")["status"] == "Available on-premise"
    cpu = host.cpu_info()
    assert desc["host_processor_model_name"] and int(desc["host_processor_vcpu_count"]) == cpu["vcpus"]
    assert desc["host_memory_capacity"].endswith(" GB") and desc["framework"].startswith("PyTorch ")
    assert desc["system_name"] == "testbox" and desc["number_of_nodes"] == "1"
    path = tmp_path / "testbox.json"
    path.write_text(json.dumps(desc))
    valid, name, *_ = check_system_desc(str(path), "training", "3.1.0")
    assert valid and name == "testbox"


# --- scoring guards -------------------------------------------------------------------------


def test_logs_of_another_benchmark_are_refused(tmp_path, sandbox):
    logs = tmp_path / "ssd"
    for i in range(5):
        write_log(logs / f"result_{i}.txt", minutes=10 + i, benchmark="ssd", seed=i + 1)
    line = one_error_line(run_invoke(["time", "--from-logs", str(logs)], env=sandbox))
    assert "submission_benchmark ssd" in line and "not maskrcnn" in line


@pytest.mark.parametrize("ruleset", ["3.1", "9.9.9", "4.0.0"])
def test_an_unknown_ruleset_is_one_line_listing_the_known_ones(ruleset, tmp_path, sandbox):
    logs = tmp_path / "published"
    write_log(logs / "result_0.txt", minutes=10)
    line = one_error_line(run_invoke(["time", "--from-logs", str(logs), "--ruleset", ruleset], env=sandbox))
    assert f"--ruleset {ruleset!r} has no maskrcnn rules" in line and "3.0.0" in line and "3.1.0" in line
    line = one_error_line(run_invoke(["train", "--dataset", "shapes", "--data-dir", str(tmp_path), "--ruleset",
                                      ruleset, "--dry-run"], env=sandbox))  # the schedules come from it too
    assert "has no maskrcnn rules" in line


@pytest.mark.slow
def test_logs_that_fail_the_ruleset_but_pass_an_older_one_say_which(tmp_path, sandbox):
    logs = tmp_path / "v0.7"
    for i in range(5):
        write_log(logs / f"result_{i}.txt", minutes=10 + i, v07=True, seed=i + 1)
    proc = run_invoke(["time", "--from-logs", str(logs)], env=sandbox)
    assert "every run fails ruleset 3.1.0, and they pass 0.7.0: score them with --ruleset 0.7.0" in proc.stdout
    again = run_invoke(["time", "--from-logs", str(logs), "--ruleset", "0.7.0"], env=sandbox)
    assert again.returncode == 0, again.stdout + again.stderr    # compliant under 0.7.0, which predates RCPs
    assert "score: 12.00 minutes" in again.stdout and "every run fails" not in again.stdout
    assert "RCP: not applicable (ruleset 0.7.0 predates RCPs)" in again.stdout


@pytest.mark.slow
def test_two_logs_folders_of_one_name_keep_their_own_summaries(tmp_path, sandbox):
    results_dir = Path(sandbox["INVOKE_MLPERF_RESULTS_DIR"])
    first, second = tmp_path / "a" / "run", tmp_path / "b" / "run"
    for folder, minutes in ((first, 10), (second, 20)):
        write_log(folder / "result_0.txt", minutes=minutes)
        no_mlperf_score(run_invoke(["time", "--from-logs", str(folder)], env=sandbox))  # one run each
    a, b = _summary(results_dir, "run"), _summary(results_dir, "run-2")
    assert a["logs"] == str(first.resolve()) and a["score"]["minutes"] == pytest.approx(10)
    assert b["logs"] == str(second.resolve()) and b["score"]["minutes"] == pytest.approx(20)
    no_mlperf_score(run_invoke(["time", "--from-logs", str(first)], env=sandbox))  # the same logs: rescored in place
    assert sorted(p.name for p in (results_dir / "scores").iterdir()) == ["run", "run-2"]


@pytest.mark.slow
def test_a_closed_series_without_a_reference_convergence_point_is_no_mlperf_score(tmp_path, sandbox):
    logs = tmp_path / "batch-1024"
    for i in range(5):
        write_log(logs / f"result_{i}.txt", minutes=10 + i, batch=1024, epochs=14, seed=i + 1)
    proc = run_invoke(["time", "--from-logs", str(logs)], env=sandbox)
    summary = _summary(Path(sandbox["INVOKE_MLPERF_RESULTS_DIR"]), "batch-1024")
    assert all(r["compliant"] for r in summary["runs"])             # the compliance checker is satisfied
    assert summary["score"]["kind"] == "olympic" and "Missing RCP" in summary["score"]["rcp"]
    assert "MLPerf score;" not in proc.stdout and "not an MLPerf score (the RCP check failed" in proc.stdout
    no_mlperf_score(proc, "Missing RCP")


def test_non_numeric_accuracy_or_time_is_one_line(tmp_path, sandbox):
    logs = tmp_path / "edited"
    path = write_log(logs / "result_0.txt", minutes=10)
    text = path.read_text().replace('"BBOX": 0.38,', '"BBOX": "0.38",', 1)
    path.write_text(text)
    line = one_error_line(run_invoke(["time", "--from-logs", str(logs)], env=sandbox))
    assert "result_0.txt line" in line and "'eval_accuracy' record" in line and "not a finite number" in line


# --- invoke package ---------------------------------------------------------------------------


def nvidia_series(results_dir: Path, name: str = "dgxh100-v3.0") -> Path:
    """A series folder as `invoke time` lays one out, holding NVIDIA's published closed-division logs and
    system description (no COCO run is possible here; tests/data/README.md says where they come from)."""
    root = results_dir / name
    logs = root / "results" / "dgxh100" / "maskrcnn"
    logs.mkdir(parents=True)
    files = project.sources()
    digest = project.sources_digest(files=files)
    for i in range(5):
        (logs / f"result_{i}.txt").write_text(with_sources_digest((REFERENCE / f"result_{i}.txt").read_text(), digest))
    desc = json.loads((REFERENCE / "system_desc.json").read_text())
    desc["system_name"] = "dgxh100"
    (root / "systems").mkdir()
    (root / "systems" / "dgxh100.json").write_text(json.dumps(desc, indent=4))
    commands = {str(i): ["env", "OMP_NUM_THREADS=14", "python", "-m", "torch.distributed.run", "--nproc-per-node=8",
                         "--standalone", "-m", "object_detection.train", f"--seed={i + 1}"] for i in range(5)}
    (root / "series.json").write_text(json.dumps({"name": name, "runs": 5, "dataset": "coco2017", "system": "dgxh100",
                                                  "ruleset": "3.0.0", "seeds": [1, 2, 3, 4, 5], "sources": files,
                                                  "sources_digest": digest, "commands": commands,
                                                  "command": ["invoke", "time", "--series", name]}))
    return root


def with_sources_digest(log: str, digest: str) -> str:
    """A log with the sources_digest record the trainer writes after the submission records (as a series of
    this tool's has it; NVIDIA's own logs name no digest)."""
    out = []
    for line in log.splitlines(keepends=True):
        out.append(line)
        if '"key": "submission_platform"' in line:
            rec = json.loads(line.split(":::MLLOG ", 1)[1])
            rec.update(key="sources_digest", value=digest, metadata={"file": "train.py", "lineno": 1})
            out.append(":::MLLOG " + json.dumps(rec) + "\n")
    return "".join(out)


# What NVIDIA's published description leaves blank of the fields MLCommons requires an answer for.
NVIDIA_SYSTEM_INFO = {"host_networking_topology": "fat tree", "host_memory_configuration": "32x 64GB DDR5",
                      "accelerator_host_interconnect": "PCIe Gen5 x16", "cooling": "air"}


@pytest.mark.slow
def test_package_of_a_closed_series_passes_the_package_checker(tmp_path, sandbox):
    results_dir = Path(sandbox["INVOKE_MLPERF_RESULTS_DIR"])
    root = nvidia_series(results_dir)
    info = tmp_path / "system-info.json"
    info.write_text(json.dumps(NVIDIA_SYSTEM_INFO))
    package = ["package", "--series", root.name, "--ruleset", "3.0.0", "--output", str(tmp_path / "out")]
    line = one_error_line(run_invoke(package, env=sandbox))    # what the description leaves blank, named
    assert "dgxh100.json leaves host_networking_topology, host_memory_configuration, accelerator_host_interconnect, " \
           "cooling blank" in line and "--system-info FILE" in line
    proc = run_invoke([*package, "--system-info", str(info)], env=sandbox, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr
    tree = tmp_path / "out" / "NVIDIA"
    assert sorted(p.name for p in tree.iterdir()) == ["benchmarks", "results", "systems"]
    results = tree / "results" / "dgxh100" / "maskrcnn"
    assert sorted(p.name for p in results.iterdir()) == [f"result_{i}.txt" for i in range(5)]
    series_logs = root / "results" / "dgxh100" / "maskrcnn"
    assert all((results / f"result_{i}.txt").read_bytes() == (series_logs / f"result_{i}.txt").read_bytes()
               for i in range(5))                                   # the logs exactly as they were
    impl = tree / "benchmarks" / "maskrcnn" / "implementations" / "backendai-pytorch"
    for part in ("object_detection/train.py", "mlperf/launch.py", "tasks.py", "requirements.txt", "Dockerfile",
                 "README.md", "config_dgxh100.json", "run_and_time.sh"):
        assert (impl / part).is_file(), part
    script = (impl / "run_and_time.sh").read_text()
    assert "  dgxh100/3)  # seed 4\n    exec env OMP_NUM_THREADS=14 python -m torch.distributed.run" in script
    assert subprocess.run(["bash", "-n", str(impl / "run_and_time.sh")]).returncode == 0     # a valid script
    wrong = subprocess.run(["bash", str(impl / "run_and_time.sh")], env={"RUN": "7", "PATH": "/usr/bin:/bin"},
                           capture_output=True, text=True)
    assert wrong.returncode == 1 and "no recorded run 7 of system dgxh100" in wrong.stderr
    assert project.sources_digest(files=project.sources(impl)) != ""   # the copied code, whole
    assert json.loads((impl / "config_dgxh100.json").read_text())["sources_digest"] == project.sources_digest()
    desc = json.loads((tree / "systems" / "dgxh100.json").read_text())
    assert desc["cooling"] == "air" and desc["status"] == "onprem"      # the user's answers; 3.0.0's own word
    assert not list(tree.rglob("series.json")) and not list(tree.rglob("summary*")) and not list(tree.rglob("*.png"))
    assert "PACKAGE CHECKER FOUND NO ERRORS" in (tmp_path / "out" / "package_checker.log").read_text()
    [row] = json.loads((tmp_path / "out" / "result_summary_detailed.json").read_text())
    assert row["maskrcnn:time_to_train"] == pytest.approx(19.18, abs=0.005) and row["maskrcnn:RCP"] == "Pass"
    assert "19.18 minutes" in proc.stdout and "passes the package checker" in proc.stdout
    again = run_invoke([*package, "--system-info", str(info)], env=sandbox, timeout=600)
    assert again.returncode == 0, again.stderr  # its own tree is replaced whole
    csv = (tmp_path / "out" / "result_summary_detailed.csv").read_text().splitlines()
    assert len(csv) == 2, csv                   # header and this package's row: none of the earlier package's


def test_package_refuses_what_is_not_a_submission(tmp_path, sandbox):
    results_dir = Path(sandbox["INVOKE_MLPERF_RESULTS_DIR"])
    root = nvidia_series(results_dir)
    line = one_error_line(run_invoke(["package", "--series", root.name, "--submitter", "Someone Else",
                                      "--ruleset", "3.0.0"], env=sandbox))
    assert "the logs say submission_org 'NVIDIA'" in line
    (root / "results" / "dgxh100" / "maskrcnn" / "result_4.txt").unlink()
    line = one_error_line(run_invoke(["package", "--series", root.name, "--ruleset", "3.0.0"], env=sandbox))
    assert "has runs [0, 1, 2, 3]" in line
    line = one_error_line(run_invoke(["package", "--series", "nothing-here"], env=sandbox))
    assert "is not a result series" in line


@pytest.mark.slow
def test_one_process_at_a_time_runs_a_series(tiny_shapes, tmp_path, sandbox):
    import subprocess
    import sys
    import time

    results = tmp_path / "results"
    args = ["time", *tiny_shapes["args"], "--runs", "1", "--max-epochs", "1", "--results-dir", str(results),
            "--series", "once"]
    env = {**__import__("os").environ, **sandbox, "BACKENDAI_CLUSTER_HOSTS": "", "PYTHONUNBUFFERED": "1"}
    first = subprocess.Popen([sys.executable, "-m", "invoke", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while not list(results.glob("once/results/*/maskrcnn/result_0.txt.partial")):
            assert first.poll() is None and time.monotonic() < deadline, first.stdout.read() if first.stdout else ""
            time.sleep(0.1)
        second = run_invoke(args, env={**sandbox, "BACKENDAI_CLUSTER_HOSTS": ""})
        line = one_error_line(second)
        assert f"series once is being run by another process (pid {first.pid})" in line
    finally:
        out, _ = first.communicate(timeout=600)
    assert "run 0/1:" in out and "crashed" not in out, out
    [log] = results.glob("once/results/*/maskrcnn/result_0.txt")
    parsed = parse_log(log)
    assert parsed.status in ("success", "aborted")
    # what a reviewer gets: the code that ran, in the log and in series.json, and the command the run ran
    settings = json.loads((results / "once" / "series.json").read_text())
    # (compared with each other, not with the tree now: in a shared checkout the code may change meanwhile)
    assert parsed.sources_digest == settings["sources_digest"] == project.sources_digest(files=settings["sources"])
    assert set(settings["sources"]) == {str(p) for p in project.runtime_files()}
    assert settings["command"][:4] == ["invoke", "time", "--series", "once"]
    trainer = settings["commands"]["0"]
    assert "object_detection.train" in trainer and f"--seed={settings['seeds'][0]}" in trainer
    assert f"--sources-digest={settings['sources_digest']}" in trainer
    from mlperf.results.logs import check_compliance

    ok, messages = check_compliance(log, "3.1.0")     # the record is one the checker takes
    assert not any("sources_digest" in m for m in messages), messages
