"""Background jobs through the entry points: `invoke STEP --detach`, `invoke status`, `invoke logs`."""
from __future__ import annotations

import json
import os
import re
import signal
import time

import pytest

from conftest import ROOT, run_invoke
from mlperf.tasking import task_argv
from tests.support.nap_step import make_harness


@pytest.fixture
def harness(tmp_path, sandbox):
    folder = make_harness(tmp_path / "project")
    env = {**sandbox, "PYTHONPATH": str(ROOT)}
    return folder, env


def job_id(output: str) -> str:
    match = re.search(r"started job (\S+):", output)
    assert match, output
    return match.group(1)


def test_task_argv_leaves_out_what_was_not_given():
    argv = task_argv("train", {"dataset": "shapes", "gpus": None, "resume": False, "list_configs": True,
                               "max_epochs": 2, "detach": True}, drop=("detach",))
    assert argv == ["train", "--dataset", "shapes", "--list-configs", "--max-epochs", "2"]
    assert task_argv("time", {"from_logs": "x y"}) == ["time", "--from-logs", "x y"]
    # With the declared defaults, turning off a default-on option survives the trip.
    defaults = {"batch_sizes": "8,16,32", "baseline": True, "gpus": None}
    assert task_argv("bench", {"batch_sizes": "8,16,32", "baseline": False, "gpus": 2},
                     defaults=defaults) == ["bench", "--no-baseline", "--gpus", "2"]
    assert task_argv("bench", {"batch_sizes": "4", "baseline": True}, defaults=defaults) == \
        ["bench", "--batch-sizes", "4"]


@pytest.mark.slow
def test_detached_step_runs_on_and_logs_follow_returns_its_exit_code(harness, tmp_path):
    folder, env = harness
    started = run_invoke(["nap", "--seconds", "4", "--code", "3", "--detach"], cwd=folder, env=env,
                         check=True)
    jid = job_id(started.stdout)
    assert "invoke logs --job" in started.stdout

    listing = run_invoke(["status"], cwd=folder, env=env, check=True).stdout
    assert re.search(rf"{jid}\s+nap\s+running", listing), listing

    follow = run_invoke(["logs", "--follow"], cwd=folder, env=env)
    assert follow.returncode == 3, follow.stderr
    assert "napping" in follow.stdout and "woke up" in follow.stdout
    assert f"job {jid} failed with exit code 3" in follow.stderr

    listing = run_invoke(["status"], cwd=folder, env=env, check=True).stdout
    assert re.search(rf"{jid}\s+nap\s+failed\s+3", listing), listing
    log = tmp_path / "results" / "jobs" / jid / "output.log"
    assert str(log) in listing and "woke up" in log.read_text()
    # Plain `logs` prints the same output and succeeds.
    again = run_invoke(["logs", "--job", jid], cwd=folder, env=env, check=True)
    assert "woke up" in again.stdout


@pytest.mark.slow
def test_a_killed_job_is_reported_lost(harness, tmp_path):
    folder, env = harness
    started = run_invoke(["nap", "--seconds", "60", "--detach"], cwd=folder, env=env, check=True)
    jid = job_id(started.stdout)
    info = json.loads((tmp_path / "results" / "jobs" / jid / "job.json").read_text())
    deadline = time.monotonic() + 30
    while "napping" not in (tmp_path / "results" / "jobs" / jid / "output.log").read_text():
        assert time.monotonic() < deadline, "the job never started"
        time.sleep(0.2)
    os.killpg(info["pid"], signal.SIGKILL)  # wrapper and step: as if the machine went away

    listing = run_invoke(["status"], cwd=folder, env=env, check=True).stdout
    assert re.search(rf"{jid}\s+nap\s+lost", listing), listing
    follow = run_invoke(["logs", "--follow", "--job", jid[:20]], cwd=folder, env=env)
    assert follow.returncode == 1
    assert "napping" in follow.stdout
    assert f"error: job {jid} was lost" in follow.stderr


def test_status_and_logs_without_jobs(harness):
    folder, env = harness
    assert "no background jobs" in run_invoke(["status"], cwd=folder, env=env, check=True).stdout
    missing = run_invoke(["logs"], cwd=folder, env=env)
    assert missing.returncode == 1
    assert missing.stderr.startswith("error: no background jobs") and "Traceback" not in missing.stderr


@pytest.mark.slow
def test_a_job_whose_wrapper_alone_was_killed_still_runs_then_is_lost(harness, tmp_path):
    folder, env = harness
    jid = job_id(run_invoke(["nap", "--seconds", "5", "--detach"], cwd=folder, env=env, check=True).stdout)
    job = tmp_path / "results" / "jobs" / jid
    deadline = time.monotonic() + 30
    while not (job / "step.pid").exists() or "napping" not in (job / "output.log").read_text():
        assert time.monotonic() < deadline, "the job never started"
        time.sleep(0.2)
    os.kill(json.loads((job / "job.json").read_text())["pid"], signal.SIGKILL)  # the wrapper, not the step
    listing = run_invoke(["status"], cwd=folder, env=env, check=True).stdout
    assert re.search(rf"{jid}\s+nap\s+running", listing), listing  # the step goes on
    follow = run_invoke(["logs", "--follow", "--job", jid], cwd=folder, env=env, timeout=60)
    assert "woke up" in follow.stdout                                # it was followed to its end
    assert follow.returncode == 1 and f"error: job {jid} was lost" in follow.stderr  # no exit code came


@pytest.mark.slow
def test_a_damaged_job_file_is_listed_not_a_traceback(harness, tmp_path):
    folder, env = harness
    jid = job_id(run_invoke(["nap", "--seconds", "0", "--detach"], cwd=folder, env=env, check=True).stdout)
    run_invoke(["logs", "--follow", "--job", jid], cwd=folder, env=env)
    (tmp_path / "results" / "jobs" / jid / "job.json").write_text('["not", "a", "job"]')
    listing = run_invoke(["status"], cwd=folder, env=env)
    assert listing.returncode == 0 and re.search(rf"{jid}\s+\?\s+damaged", listing.stdout), listing.stdout
    assert "Traceback" not in listing.stderr


@pytest.mark.slow
def test_a_secret_in_a_url_is_kept_out_of_the_job_record(harness, tmp_path):
    folder, env = harness
    started = run_invoke(["fetch", "--dataset", "coco2017", "--mirror", "http://alice:s3cret@127.0.0.1:9/?token=abc",
                          "--data-dir", str(tmp_path / "data"), "--detach"], cwd=folder,
                         env={**env, "MLPERF_FETCH_RETRIES": "0"}, check=True)  # the job inherits it
    jid = job_id(started.stdout)
    run_invoke(["logs", "--follow", "--job", jid], cwd=folder, env=env)
    job = tmp_path / "results" / "jobs" / jid
    for text in (started.stdout, (job / "job.json").read_text(), (job / "output.log").read_text(),
                 run_invoke(["status"], cwd=folder, env=env).stdout):
        assert "s3cret" not in text and "token=abc" not in text
    assert "***@127.0.0.1:9" in (job / "job.json").read_text()
    assert oct(job.stat().st_mode & 0o777) == "0o700"
