"""`invoke session.*` against a Backend.AI manager that answers wrongly or with hostile data.

Mocked: the manager, its storage proxy and agent (tests/support/fake_manager.py), as in test_session.py, since
no real manager runs here; a real 23.09 stack cannot be made to send these answers anyway (names
that leave a folder, a status that is a list, a greeting nested 100000 deep, a download that stops
mid-file), so each is the fake with one answer changed. The shape of a failed start's status_data is
23.09.11's (scheduler/dispatcher.py start_session, exceptions.py convert_to_status_data). Everything
else is real: `invoke` as a user types it and the real backend.ai-client 23.9.10 CLI.
"""
from __future__ import annotations

import time

import pytest

from conftest import one_error_line, run_invoke
from tests.support.fake_manager import Stream
from test_session import (IMAGE, backendai_client, client_bin, client_user, inv, manager,  # noqa: F401
                          user)

RUN = "results/all-coco2017-abc"


def remote_results(manager, files: dict[str, bytes]) -> None:
    """What a finished session leaves on its vfolder, written straight there."""
    root = manager.vfolders["mlperf-data"]
    for relative, content in files.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_bytes(content)


@pytest.mark.slow
def test_names_from_the_listing_stay_inside_the_results_folder(manager, client_user, tmp_path):
    remote_results(manager, {f"{RUN}/summary.json": b'{"score": 1}\n', f"{RUN}/result_0.txt": b"log\n"})
    manager.extra_entries["results"] = {"../../../../escaped.txt": b"written where it was never asked to\n"}
    results_dir = tmp_path / "a" / "b" / "results"
    proc = inv({**client_user, "INVOKE_MLPERF_RESULTS_DIR": str(results_dir)},
               "session.results", "mlperf-hostile", "--vfolder", "mlperf-data")
    line = one_error_line(proc, "'../../../../escaped.txt'", "results/", "mlperf-data")
    assert "copied" in line or "kept" in line, line
    assert not list(tmp_path.rglob("escaped.txt")) and not (tmp_path.parent / "escaped.txt").exists()
    local = results_dir / "mlperf-hostile" / "all-coco2017-abc"
    assert (local / "summary.json").read_bytes() == b'{"score": 1}\n'   # the good files are kept
    assert (local / "result_0.txt").read_bytes() == b"log\n"
    assert not [p for p in local.parent.iterdir() if p.name.startswith(".download")]


@pytest.mark.slow
def test_a_storage_proxy_that_stalls_mid_file_is_given_up(manager, client_user, tmp_path):
    remote_results(manager, {f"{RUN}/a.txt": b"first\n", f"{RUN}/b.txt": b"second\n",
                             f"{RUN}/z-checkpoint.bin": bytes(range(256)) * 512})
    manager.stalled.add(f"{RUN}/z-checkpoint.bin")
    config = tmp_path / "stall.yaml"
    config.write_text("mlperf:\n  session:\n    stall_seconds: 2\n")
    started = time.monotonic()
    proc = run_invoke(["-f", str(config), "session.results", "mlperf-stall", "--vfolder", "mlperf-data"],
                      env=client_user, timeout=90)
    line = one_error_line(proc, f"{RUN}/z-checkpoint.bin", "storage proxy", "2 s")
    assert time.monotonic() - started < 60, line
    local = tmp_path / "results" / "mlperf-stall" / "all-coco2017-abc"
    assert (local / "a.txt").read_text() == "first\n" and (local / "b.txt").read_text() == "second\n"
    assert not (local / "z-checkpoint.bin").exists()   # never half a file
    assert not [p for p in local.parent.iterdir() if p.name.startswith(".download")]


@pytest.mark.slow
def test_a_status_that_is_not_text_is_one_line(manager, client_user):
    env = {**client_user, "MLPERF_STUB_LINES": "0"}
    assert inv(env, "session.create", "--name", "mlperf-odd").returncode == 0
    sess = manager.wait_ended("mlperf-odd")
    sess.shown_as = {"status": ["TERMINATED"]}
    one_error_line(inv(env, "session.status", "mlperf-odd"), "status <list>")
    one_error_line(inv(env, "session.logs", "mlperf-odd"), "status <list>")
    sess.shown_as = {"status_data": "[" * 100000 + "]" * 100000}   # a JSONString field the client decodes
    one_error_line(inv(env, "session.status", "mlperf-odd"), "backend.ai ps failed: maximum recursion depth")
    sess.shown_as = {"mounts": ["x/../../etc"]}   # a vfolder name the manager made up
    one_error_line(inv(env, "session.results", "mlperf-odd"), "'x/../../etc'", "--vfolder")


@pytest.mark.slow
def test_a_greeting_nested_deep_or_without_end(manager, user):
    deep = b"[" * 100000 + b"]" * 100000
    manager.greeting = Stream(len(deep), lambda: [deep], "application/json")
    line = one_error_line(inv(user, "session.create", "--name", "mlperf-greet"), "`backend.ai` is not installed")
    assert "23.09: 3.11" in line                      # the general advice, since the manager's version is unknown
    head, size = b'{"manager": "23.09.11", "padding": "', 48 << 20
    manager.greeting = Stream(size, lambda: [head, *(b"x" * 65536 for _ in range(size // 65536))])
    line = one_error_line(inv(user, "session.create", "--name", "mlperf-greet"), "`backend.ai` is not installed")
    assert "is 23.09.11" not in line
    assert manager.greeting_sent < 16 << 20, manager.greeting_sent   # read with a cap, not whole


@pytest.mark.slow
def test_a_name_that_looks_like_an_option_is_refused(manager, client_user):
    one_error_line(inv(client_user, "session.create", "--image=--help", "--name", "mlperf-opt"), "'--help'")
    one_error_line(inv(client_user, "session.create", "--image=-h", "--dry-run"), "'-h'")
    one_error_line(inv(client_user, "session.results", "mlperf-opt", "--vfolder=--help"), "'--help'")
    assert not manager.sessions and not [r for r in manager.requests if r.path == "/session"]


@pytest.mark.slow
def test_a_session_that_failed_to_start_says_the_agents_reason(manager, client_user):
    manager.failing_images[IMAGE] = ("UnsupportedBaseDistroError", "UnsupportedBaseDistroError('debian12')")
    create = inv(client_user, "session.create", "--image", IMAGE, "--name", "mlperf-distro")
    one_error_line(create, "mlperf-distro failed to start", "UnsupportedBaseDistroError('debian12')")
    status = inv(client_user, "session.status", "mlperf-distro")
    assert status.returncode == 1, (status.stdout, status.stderr)
    assert "CANCELLED" in status.stdout and "failed-to-start" in status.stdout
    assert "UnsupportedBaseDistroError('debian12')" in status.stdout
