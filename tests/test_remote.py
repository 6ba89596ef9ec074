"""`fab -H host ...` against a real OpenSSH server on 127.0.0.1: deploy, forwarded steps, failures,
detached jobs that survive a dropped connection, and results brought back.

The "remote" project folder is a temporary folder on this machine; deploy uses --no-venv with this
venv's python so nothing is downloaded.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT
from tests.support.nap_step import add_nap_to, make_harness
from tests.support.sshd import free_port, start_sshd


def fab(args: list[str], env: dict, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fabric", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    """sshd, a project deployed to a temporary 'remote' folder (twice), and `fab` options for it."""
    tmp = tmp_path_factory.mktemp("remote")
    server = start_sshd(tmp / "sshd")
    remote = tmp / "remote-project"
    local = make_harness(tmp / "local")   # fab runs from here: the project's tasks plus `nap`
    home = tmp / "home"  # ~/.ssh/known_hosts knows this server's key, as a user's would after checking it
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "known_hosts").write_text(server.known_hosts.read_text())
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", "HOME": str(home),
           "FABRIC_MLPERF_REMOTE_PATH": str(remote), "FABRIC_MLPERF_RESULTS_DIR": str(tmp / "local-results")}
    deploy = ["deploy", "--python", sys.executable, "--no-venv"]
    try:
        first = fab([*server.fab_args(), *deploy], env, local, timeout=300)
        second = fab([*server.fab_args(), *deploy], env, local)
        add_nap_to(remote)
        yield {"server": server, "env": env, "cwd": local, "remote": remote, "tmp": tmp,
               "deploys": (first, second)}
    finally:
        server.stop()


def run(host, *args, env=None, timeout=120):
    return fab([*host["server"].fab_args(), *args], {**host["env"], **(env or {})}, host["cwd"], timeout)


@pytest.mark.slow
def test_deploy_copies_code_only_and_twice_is_nearly_free(host):
    first, second = host["deploys"]
    assert first.returncode == 0, first.stderr
    remote = host["remote"]
    assert (remote / "tasks.py").is_file() and (remote / "mlperf" / "remote.py").is_file()
    for skipped in (".venv", ".git", "data", "results"):
        assert not (remote / skipped).exists(), skipped
    assert "setting up the environment" in first.stdout
    assert second.returncode == 0, second.stderr
    # Nothing changed in between: rsync sends no file, only its file list (a few kB).
    files, sent = map(int, re.search(r"deploy: (\d+) file\(s\) updated .*\((\d+) bytes sent\)",
                                     second.stdout).groups())
    first_sent = int(re.search(r"\((\d+) bytes sent\)", first.stdout).group(1))
    assert files == 0, second.stdout
    assert sent < first_sent / 10, (sent, first_sent)
    assert "requirements unchanged, environment kept" in second.stdout
    assert "setting up the environment" not in second.stdout


@pytest.mark.slow
def test_doctor_runs_on_the_host(host):
    proc = run(host, "doctor")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert re.search(r"package torch\s+ok", proc.stdout)
    assert "/dev/shm" in proc.stdout and "ready" in proc.stdout


@pytest.mark.slow
def test_remote_failure_reaches_the_user_with_its_exit_code(host):
    proc = run(host, "verify", "--manifest", "/nonexistent")
    assert proc.returncode == 1
    port = host["server"].port
    assert f"error: verify failed on root@127.0.0.1:{port} with exit code 1; last lines:" in proc.stderr
    assert "/nonexistent" in proc.stderr.splitlines()[-1]
    code = run(host, "nap", "--seconds", "0", "--code", "7")
    assert code.returncode == 7 and "with exit code 7" in code.stderr


@pytest.mark.slow
def test_not_deployed_unreachable_and_refused_are_one_line(host, tmp_path):
    server = host["server"]
    missing = run(host, "status", env={"FABRIC_MLPERF_REMOTE_PATH": str(tmp_path / "nowhere")})
    assert missing.returncode == 1
    assert missing.stderr.strip().startswith("error: the project is not deployed on")
    assert "deploy" in missing.stderr and len(missing.stderr.strip().splitlines()) == 1

    closed = fab(["-H", f"root@127.0.0.1:{free_port()}", "-i", str(server.key), "status"],
                 host["env"], host["cwd"])
    assert closed.returncode == 1
    assert closed.stderr.startswith("error: cannot connect to root@127.0.0.1:")
    assert len(closed.stderr.strip().splitlines()) == 1

    wrong_key = fab(["-H", server.destination, "-i", str(server.log.parent / "host_ed25519"), "status"],
                    host["env"], host["cwd"])
    assert wrong_key.returncode == 1 and "Authentication failed" in wrong_key.stderr
    assert "Traceback" not in wrong_key.stderr


@pytest.mark.slow
def test_detached_run_survives_a_dropped_connection_then_results_come_back(host):
    started = run(host, "nap", "--seconds", "8", "--code", "3", "--detach")
    assert started.returncode == 0, started.stderr
    jid = re.search(r"started job (\S+):", started.stdout).group(1)

    # Follow it, then drop the connection hard (SIGKILL to the local fab).
    follower = subprocess.Popen([sys.executable, "-m", "fabric", *host["server"].fab_args(), "logs", "--follow"],
                                cwd=host["cwd"], env=host["env"], stdout=subprocess.PIPE, text=True)
    assert "napping" in follower.stdout.readline()
    follower.send_signal(signal.SIGKILL)
    follower.wait()

    listing = run(host, "status")
    assert re.search(rf"{jid}\s+nap\s+running", listing.stdout), listing.stdout + listing.stderr

    reattached = run(host, "logs", "--follow", "--job", jid)
    assert reattached.returncode == 3, reattached.stderr
    assert "woke up" in reattached.stdout
    assert re.search(rf"{jid}\s+nap\s+failed\s+3", run(host, "status").stdout)

    local_results = Path(host["env"]["FABRIC_MLPERF_RESULTS_DIR"])
    mine = local_results / f"127.0.0.1_{host['server'].port}" / "keep-me.txt"
    mine.parent.mkdir(parents=True)
    mine.write_text("local only")
    fetched = run(host, "results")
    assert fetched.returncode == 0, fetched.stderr
    log = mine.parent / "jobs" / jid / "output.log"
    assert "woke up" in log.read_text()
    assert (mine.parent / "jobs" / jid / "exitcode").read_text().strip() == "3"
    assert mine.read_text() == "local only"   # never deletes local results
    again = run(host, "results")
    assert "results: 0 file(s) copied" in again.stdout


@pytest.mark.slow
def test_status_logs_and_results_follow_the_results_dir_the_steps_were_given(host):
    """A Backend.AI walkthrough puts results on a vfolder, not under the project: every task that
    reads them back takes the same --results-dir the steps were given."""
    elsewhere = str(host["tmp"] / "vfolder" / "results")
    started = run(host, "nap", "--seconds", "0", "--detach", "--results-dir", elsewhere)
    assert started.returncode == 0, started.stderr
    jid = re.search(r"started job (\S+):", started.stdout).group(1)
    assert (Path(elsewhere) / "jobs" / jid).is_dir()
    followed = run(host, "logs", "--follow", "--job", jid, "--results-dir", elsewhere)
    assert followed.returncode == 0 and "woke up" in followed.stdout, followed.stderr
    assert re.search(rf"{jid}\s+nap\s+finished", run(host, "status", "--results-dir", elsewhere).stdout)
    assert jid not in run(host, "status").stdout          # the default folder's jobs are others
    fetched = run(host, "results", "--results-dir", elsewhere, "--local-dir", str(host["tmp"] / "back"))
    assert fetched.returncode == 0, fetched.stderr
    assert (host["tmp"] / "back" / f"127.0.0.1_{host['server'].port}" / "jobs" / jid / "output.log").is_file()
    missing = run(host, "results", "--results-dir", str(host["tmp"] / "nowhere"))
    assert missing.returncode == 1 and "does not exist" in missing.stderr and "--results-dir" in missing.stderr


@pytest.mark.slow
def test_host_keys_are_checked_as_ssh_checks_them(host, tmp_path):
    """A key not in ~/.ssh/known_hosts is refused (one line), taken and saved only on the opt-in, and
    a key that differs from the saved one is refused, for Fabric's steps and rsync's alike."""
    server = host["server"]
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    env = {"HOME": str(home)}
    unknown = run(host, "status", env=env)
    assert unknown.returncode == 1 and "is not known here" in unknown.stderr
    assert "FABRIC_MLPERF_REMOTE_ACCEPT_NEW_HOST_KEYS=1" in unknown.stderr
    assert len(unknown.stderr.strip().splitlines()) == 1
    fetched = run(host, "results", env=env)
    assert fetched.returncode == 1 and "is not known here" in fetched.stderr  # rsync's ssh refuses it too

    accepted = run(host, "status", env={**env, "FABRIC_MLPERF_REMOTE_ACCEPT_NEW_HOST_KEYS": "1"})
    assert accepted.returncode == 0, accepted.stderr
    saved = (home / ".ssh" / "known_hosts").read_text()
    assert f"[127.0.0.1]:{server.port}" in saved and server.known_hosts.read_text().split()[2] in saved
    assert run(host, "status", env=env).returncode == 0  # known now: no opt-in needed

    other = tmp_path / "other_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    forged = f"[127.0.0.1]:{server.port} {Path(f'{other}.pub').read_text().split()[0]} " \
             f"{Path(f'{other}.pub').read_text().split()[1]}\n"
    (home / ".ssh" / "known_hosts").write_text(forged)
    changed = run(host, "status", env={**env, "FABRIC_MLPERF_REMOTE_ACCEPT_NEW_HOST_KEYS": "1"})
    assert changed.returncode == 1 and "has CHANGED" in changed.stderr and "ssh-keygen -R" in changed.stderr
    rsync_changed = run(host, "results", env=env)
    assert rsync_changed.returncode == 1 and "has CHANGED" in rsync_changed.stderr


@pytest.mark.slow
def test_a_port_out_of_range_is_one_line_not_another_port(host):
    proc = fab(["-H", "root@127.0.0.1:99999", "-i", str(host["server"].key), "status"], host["env"], host["cwd"])
    assert proc.returncode == 1 and proc.stderr.strip() == \
        "error: port 99999 of root@127.0.0.1 is not a port number (1-65535): check -H"
