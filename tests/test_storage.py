"""Inside a Backend.AI session only vfolders outlive the session: what the steps do about it.

A session is what its variables say (BACKENDAI_SESSION_ID, as the agent sets in every kernel); the
vfolder mounts come from BACKENDAI_PERSISTENT_PATHS (Backend.AI 26.4.4+) here, since this machine
has no /home/work mounts. The mountinfo parser, used on older releases, is tested on a session's
own /proc/self/mountinfo lines.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, one_error_line
from mlperf import storage

# From a Backend.AI 24.09 session (hostdir scratch, two vfolders, one read-only), trimmed.
MOUNTINFO = r"""
1290 1200 0:310 / / rw,relatime master:400 - overlay overlay rw,lowerdir=/var/lib/docker/l/A
1301 1290 253:1 /scratches/4f1e/work /home/work rw,relatime - ext4 /dev/mapper/vg-root rw
1302 1301 253:1 /krunner/DO_NOT_STORE_PERSISTENT_FILES_HERE.md /home/work/DO_NOT_STORE_PERSISTENT_FILES_HERE.md ro,relatime - ext4 /dev/mapper/vg-root rw
1303 1301 0:77 /vfroot/local/5a/1c/mlperf-data /home/work/mlperf-data rw,relatime - nfs4 nas:/vfroot rw
1304 1301 0:77 /vfroot/local/77/01/coco\040shared /home/work/coco\040shared ro,relatime - nfs4 nas:/vfroot rw
1305 1301 0:78 /_data /home/work/samples ro,relatime - ext4 /dev/sdb rw
1306 1301 0:77 /vfroot/local/9e/3a/.local /home/work/.local rw,relatime - nfs4 nas:/vfroot rw
1307 1290 0:79 / /dev/shm rw,nosuid,nodev - tmpfs shm rw,size=16777216k
"""


@pytest.fixture
def session(tmp_path) -> dict:
    """A session with one writable vfolder (tmp/vf) and the project's own folders on scratch."""
    vfolder = tmp_path / "vf"
    vfolder.mkdir()
    env = {"BACKENDAI_SESSION_ID": "0f3c-test", "BACKENDAI_PERSISTENT_PATHS": str(vfolder)}
    return {"vfolder": vfolder, "env": env, "scratch": tmp_path / "scratch"}


def _run(args, env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    """`invoke <args>` with exactly `env` (run_invoke adds to this process's environment instead)."""
    return subprocess.run([sys.executable, "-m", "invoke", *args], cwd=ROOT, env={**env, "PYTHONUNBUFFERED": "1"},
                          capture_output=True, text=True, timeout=timeout)


def run_in_session(args, session, timeout: float = 300) -> subprocess.CompletedProcess:
    """In the session, with no data or results folder chosen by the environment (as a user's shell)."""
    mine = {k: v for k, v in os.environ.items()
            if not k.startswith("BACKENDAI_") and k not in ("INVOKE_MLPERF_DATA_DIR", "INVOKE_MLPERF_RESULTS_DIR")}
    return _run(args, {**mine, **session["env"]}, timeout)


def test_mountinfo_gives_the_vfolders_and_not_the_agents_own_mounts(tmp_path):
    info = tmp_path / "mountinfo"
    info.write_text(MOUNTINFO)
    mounts = storage.persistent_mounts({"BACKENDAI_SESSION_ID": "x"}, info)
    assert {(str(m.path), m.read_only) for m in mounts} == {
        ("/home/work/mlperf-data", False), ("/home/work/coco shared", True), ("/home/work/.local", False)}
    assert storage.persistent_mounts({}, info) == []                      # not a session: nothing to say
    assert storage.mount_of(Path("/home/work/mlperf-data/results/x"), mounts).path == Path("/home/work/mlperf-data")
    assert storage.mount_of(Path("/home/work/mlperf-maskrcnn/results"), mounts) is None   # scratch
    assert storage.mount_of(Path("/home/work/mlperf-data-old"), mounts) is None           # a prefix is not a parent


def test_the_platforms_list_wins_and_mountinfo_says_which_are_read_only(tmp_path):
    info = tmp_path / "mountinfo"
    info.write_text(MOUNTINFO)
    env = {"BACKENDAI_SESSION_ID": "x", "BACKENDAI_PERSISTENT_PATHS": "/home/work/coco shared:/data/mapped"}
    mounts = storage.persistent_mounts(env, info)
    assert [(str(m.path), m.read_only) for m in mounts] == [("/home/work/coco shared", True), ("/data/mapped", False)]
    problem = storage.scratch_problem("results", Path("/home/work/coco shared/r"), mounts, "--results-dir", env)
    assert "read-only vfolder /home/work/coco shared" in problem and "--results-dir /data/mapped/results" in problem


def test_a_run_with_results_on_scratch_is_refused_naming_the_vfolder(session, tiny_shapes):
    scratch = session["scratch"] / "results"
    for task in (["train", *tiny_shapes["args"], "--device", "cpu"], ["time", *tiny_shapes["args"], "--runs", "1"],
                 ["all", "--manifest", str(tiny_shapes["manifest"]), "--data-dir", str(tiny_shapes["data_dir"])]):
        proc = run_in_session([*task, "--results-dir", str(scratch)], session)
        line = one_error_line(proc, f"results {scratch}", "is on the session's scratch",
                              f"--results-dir {session['vfolder'] / 'results'}", "--scratch-ok")
        assert "deleted with the session" in line
        assert not scratch.exists()                       # refused before anything was written


@pytest.mark.slow
def test_scratch_ok_accepts_losing_them(session, tiny_shapes):
    log = session["scratch"] / "results" / "result_0.txt"
    proc = run_in_session(["train", *tiny_shapes["args"], "--device", "cpu", "--max-epochs", "1", "--log", str(log),
                           "--scratch-ok"], session)
    assert proc.returncode == 0, proc.stderr
    assert log.is_file()


def test_with_nothing_chosen_the_one_vfolder_is_the_default_and_it_says_so(session):
    proc = run_in_session(["paths", "--json"], session)
    assert proc.returncode == 0, proc.stderr
    paths = json.loads(proc.stdout.strip().splitlines()[-1])
    vfolder = session["vfolder"]
    assert paths["data_dir"] == {"path": str(vfolder / "data"), "where": f"vfolder {vfolder}"}
    assert paths["results_dir"]["path"] == str(vfolder / "results")
    assert paths["jobs_dir"]["path"] == str(vfolder / "results" / "jobs")
    assert f"using the only vfolder mounted, {vfolder / 'results'} (--results-dir to choose)" in proc.stderr
    # an explicit choice is kept, even on scratch (train/time/all then refuse it, doctor fails it)
    chosen = run_in_session(["paths", "--json", "--results-dir", str(session["scratch"])], session)
    assert json.loads(chosen.stdout.strip().splitlines()[-1])["results_dir"] == {
        "path": str(session["scratch"]), "where": "scratch: deleted with the session"}


def test_two_vfolders_make_no_default_and_none_says_how_to_mount_one(session, tiny_shapes):
    second = session["vfolder"].parent / "vf2"
    second.mkdir()
    two = {**session, "env": {**session["env"], "BACKENDAI_PERSISTENT_PATHS": f"{session['vfolder']}:{second}"}}
    proc = run_in_session(["train", *tiny_shapes["args"], "--device", "cpu"], two)
    one_error_line(proc, "is on the session's scratch", f"one of the mounted vfolders ({session['vfolder']}, {second})")
    none = {**session, "env": {"BACKENDAI_SESSION_ID": "x"}}
    proc = run_in_session(["train", *tiny_shapes["args"], "--device", "cpu"], none)
    one_error_line(proc, "backend.ai vfolder create mlperf-data", "-v mlperf-data")


@pytest.mark.slow
def test_doctor_fails_one_row_per_folder_on_scratch(session, tiny_shapes):
    scratch = session["scratch"]
    proc = run_in_session(["doctor", *tiny_shapes["args"], "--results-dir", str(scratch / "results")], session)
    assert proc.returncode == 1
    rows = {line.split("  ")[0]: line for line in proc.stdout.splitlines()}
    for role in ("results", "checkpoints", "jobs"):
        assert "FAIL" in rows[f"storage {role}"] and f"--results-dir {session['vfolder'] / 'results'}" in rows[f"storage {role}"]
    assert "FAIL" in rows["storage data"]                 # tiny's data folder is not on the vfolder either
    assert "interactive (or not known)" in rows["session type"] and "batch session" in rows["session type"]
    assert proc.stderr.startswith("error: ") and "storage results" in proc.stderr

    on_vfolder = run_in_session(["doctor", *tiny_shapes["args"][:-2], "--data-dir", str(session["vfolder"] / "data"),
                                 "--results-dir", str(session["vfolder"] / "results")],
                                {**session, "env": {**session["env"], "_BACKEND_BATCH_MODE": "1"}})
    rows = {line.split("  ")[0]: line for line in on_vfolder.stdout.splitlines()}
    assert all(" ok " in rows[f"storage {role}"] for role in ("data", "results", "checkpoints", "jobs")), on_vfolder.stdout
    assert "session type" not in rows                     # a batch session's command: no idle checker


def test_outside_a_session_nothing_changes(tmp_path, tiny_shapes):
    env = {k: v for k, v in os.environ.items() if not k.startswith("BACKENDAI_")}
    proc = _run(["paths", "--json", "--results-dir", str(tmp_path / "r")], env)
    assert json.loads(proc.stdout)["results_dir"] == {"path": str(tmp_path / "r"), "where": "local disk"}
    assert proc.stderr == ""
