"""`invoke session.create|status|logs|results|destroy`, through the real Backend.AI client.

Mocked: the Backend.AI manager, with the storage proxy and agent behind it (tests/support/fake_manager.py),
because a real one needs PostgreSQL, Redis, etcd and a Docker-based agent, none of which run here.
The fake answers the REST and GraphQL calls the client makes as manager 23.09.11 answers them and
checks every request's HMAC signature as the manager does. Everything else is real: `invoke` as a
user types it; the real backend.ai-client 23.9.10 CLI (tests/support/backendai_client.py installs it once
into .cache/) signing real HTTP requests; the session's startup command run by /bin/sh, with a
stand-in `invoke` on its PATH (the benchmark itself needs GPUs and COCO) that prints, writes results
to the vfolder and exits with $MLPERF_STUB_EXIT, which reaches it the way every MLPERF_* variable
does: from the user's environment, through `-e` and the manager, into the session.
"""
from __future__ import annotations

import json
import os
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.support.backendai_client import backendai_client  # noqa: F401  (the session fixture)
from conftest import ROOT, run_invoke
from tests.support.fake_manager import FakeManager
from mlperf import backendai_cli as client_cli, session_results, session_spec

ACCESS, SECRET = "AKIAMLPERFTEST0001", "s3cret-KEY-never-shown-0123456789abcdef"
IMAGE = "cr.example.com/mlperf/mlperf-maskrcnn:25.01-py3"
EXIT_LINE = "invoke session: the benchmark exited with code"
ALWAYS_UNSIGNED = {"/", "/manager/announcement"}   # the greeting and the announcement need no auth

STAND_IN = r"""#!/bin/sh
# The benchmark's stand-in inside the fake session: what it was given, some output, results on the vfolder.
echo "invoke $*"
echo "NCCL_DEBUG=$NCCL_DEBUG TORCH_SHOW_CPP_STACKTRACES=$TORCH_SHOW_CPP_STACKTRACES"
results="" prev=""
for arg in "$@"; do [ "$prev" = "--results-dir" ] && results="$arg"; prev="$arg"; done
results="$FAKE_HOME_WORK${results#/home/work}"
i=1
while [ "$i" -le "${MLPERF_STUB_LINES:-2}" ]; do echo "epoch $i"; sleep "${MLPERF_STUB_DELAY:-0}"; i=$((i + 1)); done
mkdir -p "$results/all-coco2017-abc/results/sys/maskrcnn" "$results/all-coco2017-abc/odd names/007"
echo ":::MLLOG run_stop" > "$results/all-coco2017-abc/results/sys/maskrcnn/result_0.txt"
echo '{"score": 1}' > "$results/all-coco2017-abc/summary.json"
echo "x" > "$results/all-coco2017-abc/odd names/two  spaces.txt"
echo "y" > "$results/all-coco2017-abc/odd names/007/12"
exit "${MLPERF_STUB_EXIT:-0}"
"""


@pytest.fixture(scope="session")
def client_bin(backendai_client) -> Path:  # noqa: F811
    """The real client's bin/ folder (its venv holds yarl below 1.17.1, which the 23.9 client needs)."""
    return backendai_client.parent


def fake_manager(folder: Path, **options) -> FakeManager:
    """A fake manager with 16 GPUs free, the project's images, a vfolder mlperf-data, and the
    benchmark's stand-in on its sessions' PATH."""
    vfolder = folder / "vfolders" / "mlperf-data"
    vfolder.mkdir(parents=True)
    container_bin = folder / "container-bin"
    container_bin.mkdir()
    (container_bin / "invoke").write_text(STAND_IN)
    (container_bin / "invoke").chmod(0o755)
    return FakeManager(access_key=ACCESS, secret_key=SECRET, images={IMAGE, default_image()},
                       vfolders={"mlperf-data": vfolder}, home_root=folder / "homes", bin_dirs=[container_bin],
                       gpus=16, **options)


@pytest.fixture
def manager(tmp_path):
    with fake_manager(tmp_path) as fake:
        yield fake


@pytest.fixture
def user(manager, tmp_path) -> dict:
    """A user's environment without the client: its credentials and endpoint, NCCL/TORCH/MLPERF settings
    to pass on, and this project's results folder in tmp_path."""
    return {"BACKEND_ENDPOINT": manager.url, "BACKEND_ACCESS_KEY": ACCESS, "BACKEND_SECRET_KEY": SECRET,
            "PATH": "/usr/bin:/bin", "NCCL_DEBUG": "INFO", "TORCH_SHOW_CPP_STACKTRACES": "1",
            "MLPERF_STUB_EXIT": "0", "INVOKE_MLPERF_RESULTS_DIR": str(tmp_path / "results"),
            "INVOKE_MLPERF_SESSION_POLL_SECONDS": "0.2"}


@pytest.fixture
def client_user(user, client_bin) -> dict:
    """The same user with the real client on PATH."""
    return {**user, "PATH": f"{client_bin}{os.pathsep}{os.environ['PATH']}"}


def default_image() -> str:
    image = yaml.safe_load((ROOT / "invoke.yaml").read_text())["mlperf"]["image"]
    return session_spec.default_image(image["tag"], image["base"])


def inv(env: dict, *args: str) -> subprocess.CompletedProcess:
    proc = run_invoke(list(args), env=env, timeout=120)
    text = proc.stdout + proc.stderr
    assert SECRET not in text and ACCESS not in text, text   # credentials never shown
    assert "Traceback" not in text, text
    return proc


def one_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


def created(manager: FakeManager, name: str) -> dict:
    [body] = [r.body for r in manager.requests if r.method == "POST" and r.path == "/session"
              and r.status == 201 and r.body["name"] == name]
    return body


@pytest.mark.slow
def test_create_sends_the_batch_session_the_manager_expects(manager, client_user):
    proc = inv({**client_user, "MLPERF_STUB_LINES": "1"}, "session.create", "--gpus", "4", "--nodes", "2",
               "--vfolder", "mlperf-data", "--image", IMAGE, "--dataset", "coco2017", "--runs", "3",
               "--cpu", "24", "--mem", "200g", "--shmem", "48g", "--name", "mlperf-two-nodes")
    assert proc.returncode == 0, proc.stderr
    assert "session mlperf-two-nodes started" in proc.stdout
    assert "invoke session.logs mlperf-two-nodes --follow" in proc.stdout
    body = created(manager, "mlperf-two-nodes")
    assert (body["image"], body["type"], body["architecture"]) == (IMAGE, "batch", "x86_64")
    assert (body["clusterSize"], body["clusterMode"]) == (2, "multi-node")
    assert body["config"]["mounts"] == ["mlperf-data"] and body["config"]["mount_map"] == {}
    assert body["config"]["resources"] == {"cpu": "24", "mem": "200g", "cuda.device": "4"}
    assert body["config"]["resource_opts"] == {"shmem": "48g"}
    environ = body["config"]["environ"]
    assert {"NCCL_DEBUG": "INFO", "TORCH_SHOW_CPP_STACKTRACES": "1", "MLPERF_STUB_EXIT": "0"}.items() <= environ.items()
    assert not [k for k in environ if k.startswith(("BACKEND_", "SORNA_"))]
    assert body["startupCommand"] == (
        "invoke all --dataset coco2017 --data-dir /home/work/mlperf-data/data --results-dir "
        "/home/work/mlperf-data/results --runs 3 --nodes all; "
        f'code=$?; echo "{EXIT_LINE} $code"; exit $code')
    assert (body["reuseIfExists"], body["enqueueOnly"], body["maxWaitSeconds"]) == (False, False, 120)
    # Every request but the greeting carried a signature the manager's check accepted.
    assert all(r.signed for r in manager.requests if r.path not in ALWAYS_UNSIGNED), manager.requests
    auth = next(r.headers for r in manager.requests if r.path == "/session")
    assert auth["Authorization"].startswith(f"BackendAI signMethod=HMAC-SHA256, credential={ACCESS}:")
    assert auth["X-BackendAI-Version"] == "v7.20230615" and auth["Date"]
    # The startup command ran through a shell, with the environment it was given.
    sess = manager.wait_ended("mlperf-two-nodes")
    assert sess.console.splitlines() == [
        "invoke all --dataset coco2017 --data-dir /home/work/mlperf-data/data --results-dir "
        "/home/work/mlperf-data/results --runs 3 --nodes all",
        "NCCL_DEBUG=INFO TORCH_SHOW_CPP_STACKTRACES=1", "epoch 1", f"{EXIT_LINE} 0"]


@pytest.mark.slow
def test_create_defaults_come_from_invoke_yaml(manager, client_user):
    proc = inv(client_user, "session.create")
    assert proc.returncode == 0, proc.stderr
    [body] = [r.body for r in manager.requests if r.path == "/session"]
    assert body["image"] == default_image()
    assert body["name"].startswith("mlperf-coco2017-") and session_spec._NAME.match(body["name"])
    assert (body["clusterSize"], body["clusterMode"]) == (1, "single-node")
    assert body["config"]["mounts"] == ["mlperf-data"]
    assert body["config"]["resources"] == {"cpu": "32", "mem": "256g", "cuda.device": "8"}   # 4, 32g per GPU
    assert body["config"]["resource_opts"] == {"shmem": "64g"}                              # 8g per GPU
    assert "--runs 5" in body["startupCommand"] and "--nodes" not in body["startupCommand"]


@pytest.mark.slow
def test_a_cluster_on_one_agent_asks_for_single_node(manager, client_user):
    """--cluster-mode single-node: the manager gets it (all containers on one agent, as the local stack
    has one); the session still runs `invoke all --nodes all`. The default for --nodes 2 stays multi-node."""
    proc = inv({**client_user, "MLPERF_STUB_LINES": "1"}, "session.create", "--gpus", "0", "--nodes", "2",
               "--cluster-mode", "single-node", "--cpu", "1", "--mem", "3g", "--shmem", "256m",
               "--image", IMAGE, "--dataset", "shapes", "--runs", "1", "--name", "mlperf-one-agent")
    assert proc.returncode == 0, proc.stderr
    body = created(manager, "mlperf-one-agent")
    assert (body["clusterSize"], body["clusterMode"]) == (2, "single-node")
    assert "--nodes all" in body["startupCommand"]
    assert body["config"]["resources"] == {"cpu": "1", "mem": "3g"}
    dry = inv(client_user, "session.create", "--dry-run", "--nodes", "2", "--cluster-mode", "multi-node",
              "--image", IMAGE)
    argv = shlex.split(dry.stdout.split("\n", 1)[0])
    assert argv[argv.index("--cluster-mode") + 1] == "multi-node"


@pytest.mark.slow
def test_a_newer_manager_is_named_with_the_client_it_needs(client_user, tmp_path):
    with fake_manager(tmp_path / "newer", version="24.09.14", api_version="v8.20240915") as newer:
        proc = inv({**client_user, "BACKEND_ENDPOINT": newer.url}, "session.create", "--name", "mlperf-newer")
        assert proc.returncode == 0, proc.stderr
        assert "warning: your backend.ai client is older than the manager (24.09.14)" in proc.stderr
        assert "with Python 3.12: pip install 'backend.ai-client~=24.9.0'" in proc.stderr
        [create] = [r for r in newer.requests if r.path == "/session"]
        assert create.status == 201 and create.headers["X-BackendAI-Version"] == "v7.20230615"   # its own


def test_dry_run_prints_the_command_and_spec_and_creates_nothing(manager, user):
    proc = inv(user, "session.create", "--dry-run", "--gpus", "2", "--nodes", "3", "--name", "mlperf-dry",
               "--image", IMAGE, "--dataset", "shapes", "--runs", "1")
    assert proc.returncode == 0, proc.stderr
    first, rest = proc.stdout.split("\n", 1)
    argv = shlex.split(first)
    assert argv[:3] == ["backend.ai", "session", "create"] and argv[-1] == IMAGE
    passed = sorted((k, v) for k, v in {**os.environ, **user}.items() if k.startswith(("NCCL_", "MLPERF_", "TORCH_")))
    assert ("NCCL_DEBUG", "INFO") in passed
    assert argv[3:argv.index("-c")] == [
        "--type", "batch", "--name", "mlperf-dry", "--arch", "x86_64", "--no-reuse", "--max-wait", "120",
        "--cluster-size", "3", "--cluster-mode", "multi-node", "-r", "cpu=8", "-r", "mem=64g", "-r", "cuda.device=2",
        "--resource-opts", "shmem=16g", "-v", "mlperf-data", *[w for k, v in passed for w in ("-e", f"{k}={v}")]]
    spec = json.loads(rest[:rest.rindex("}") + 1])["session"]
    assert spec["startup_command"] == argv[argv.index("-c") + 1]
    assert "--dataset shapes" in spec["startup_command"] and "--nodes all" in spec["startup_command"]
    assert (spec["cluster_size"], spec["cluster_mode"]) == (3, "multi-node")
    assert spec["mount_path"] == "/home/work/mlperf-data"
    assert proc.stdout.rstrip().endswith("dry run: nothing was created")
    assert manager.requests == []


@pytest.mark.slow
def test_follow_status_and_results_of_a_finished_session(manager, client_user, tmp_path):
    # long enough (4 s) that a client call or two, slow on a loaded machine, still sees it running
    env = {**client_user, "MLPERF_STUB_LINES": "4", "MLPERF_STUB_DELAY": "1"}
    assert inv(env, "session.create", "--name", "mlperf-run", "--gpus", "1").returncode == 0
    follow = inv(env, "session.logs", "mlperf-run", "--follow")
    sess = manager.wait_ended("mlperf-run")
    assert follow.returncode == 0, follow.stderr
    assert follow.stdout == sess.console            # every line once, in order, nothing lost at the end
    epochs = [ln for ln in follow.stdout.splitlines() if ln.startswith("epoch")]
    assert epochs == ["epoch 1", "epoch 2", "epoch 3", "epoch 4"]
    polls = [r for r in manager.requests if r.path == "/session/mlperf-run/logs"]
    assert len(polls) >= 2                          # it did follow: the console was fetched while it grew
    assert "result SUCCESS, exit code 0" in follow.stderr

    status = inv(env, "session.status", "mlperf-run")
    assert status.returncode == 0, status.stderr
    assert "TERMINATED" in status.stdout and "result SUCCESS, exit code 0" in status.stdout
    assert "vfolder mlperf-data" in status.stdout

    local = tmp_path / "results" / "mlperf-run" / "all-coco2017-abc"
    pulled = inv(env, "session.results", "mlperf-run")
    assert pulled.returncode == 0, pulled.stderr
    assert "4 file(s) copied from vfolder mlperf-data:results/" in pulled.stdout
    remote = manager.vfolders["mlperf-data"] / "results" / "all-coco2017-abc"
    for relative in ["results/sys/maskrcnn/result_0.txt", "summary.json", "odd names/two  spaces.txt",
                     "odd names/007/12"]:
        assert (local / relative).read_bytes() == (remote / relative).read_bytes(), relative
    assert not [p for p in (tmp_path / "results" / "mlperf-run").iterdir() if p.name.startswith(".download")]

    (remote / "summary.json").write_text('{"score": 2, "longer": true}\n')   # changed on the vfolder
    (local / "mine.txt").write_text("kept")
    again = inv(env, "session.results", "mlperf-run", "--vfolder", "mlperf-data")
    assert "1 file(s) copied" in again.stdout and "(3 already here)" in again.stdout
    assert (local / "summary.json").read_text() == '{"score": 2, "longer": true}\n'
    assert (local / "mine.txt").read_text() == "kept"   # nothing local is deleted

    gone = one_error(inv(env, "session.destroy", "mlperf-run"))
    assert "no active session named mlperf-run" in gone and "invoke session.status mlperf-run" in gone


@pytest.mark.slow
def test_follow_waits_out_the_moment_an_ended_sessions_console_is_gone(manager, client_user):
    """23.09 removes the containers before the session is TERMINATED and answers the console with 500
    meanwhile (seen on the local stack): --follow asks again at the next poll and loses nothing."""
    manager.removal_misses = 1   # TERMINATING until the console was asked once, however slow the machine
    env = {**client_user, "MLPERF_STUB_LINES": "2", "MLPERF_STUB_DELAY": "0.5"}
    assert inv(env, "session.create", "--name", "mlperf-gone", "--gpus", "1").returncode == 0
    follow = inv(env, "session.logs", "mlperf-gone", "--follow")
    sess = manager.wait_ended("mlperf-gone")
    assert follow.returncode == 0, follow.stderr
    assert follow.stdout == sess.console and f"{EXIT_LINE} 0" in follow.stdout
    assert "result SUCCESS, exit code 0" in follow.stderr and "error" not in follow.stderr
    answers = [r.status for r in manager.requests if r.path == "/session/mlperf-gone/logs"]
    assert 500 in answers and answers[-1] == 200, answers


@pytest.mark.slow
def test_a_failed_run_reports_its_exit_code(manager, client_user):
    env = {**client_user, "MLPERF_STUB_EXIT": "3"}
    assert inv(env, "session.create", "--name", "mlperf-fails").returncode == 0
    manager.wait_ended("mlperf-fails")
    follow = inv(env, "session.logs", "mlperf-fails", "--follow")
    assert follow.returncode == 3 and f"{EXIT_LINE} 3" in follow.stdout
    status = inv(env, "session.status", "mlperf-fails")
    assert "result FAILURE, exit code 3" in status.stdout


@pytest.mark.slow
def test_wrong_credentials_are_one_line_and_never_shown(manager, client_user):
    for env in ({**client_user, "BACKEND_SECRET_KEY": "not-the-secret-0000"},
                {**client_user, "BACKEND_ACCESS_KEY": "AKIAX00"}):
        line = one_error(inv(env, "session.create", "--name", "mlperf-nope"))
        assert "refused the credentials (401 auth-failed" in line and "BACKEND_SECRET_KEY" in line
        assert env["BACKEND_SECRET_KEY"] not in line and env["BACKEND_ACCESS_KEY"] not in line
        line = one_error(inv(env, "session.status", "mlperf-nope"))
        assert "401 auth-failed" in line
    assert {r.status for r in manager.requests if r.path not in ALWAYS_UNSIGNED} == {401}
    assert not manager.sessions


@pytest.mark.slow
def test_an_image_backend_ai_does_not_know(manager, client_user):
    line = one_error(inv(client_user, "session.create", "--image", "cr.example.com/mlperf/unknown:1",
                         "--name", "mlperf-img"))
    assert "does not know the image cr.example.com/mlperf/unknown:1" in line
    assert "backend.ai admin image rescan -r cr.example.com" in line and "-p PROJECT" in line


@pytest.mark.slow
def test_a_missing_vfolder(manager, client_user):
    line = one_error(inv(client_user, "session.create", "--vfolder", "coco-data", "--name", "mlperf-vf"))
    assert "no vfolder coco-data" in line and "backend.ai vfolder create coco-data" in line


@pytest.mark.slow
def test_not_enough_resources_queues_the_session(manager, client_user):
    # 4 nodes of 8 GPUs, where the fake manager has 16 free.
    proc = inv(client_user, "session.create", "--gpus", "8", "--nodes", "4", "--name", "mlperf-big")
    assert proc.returncode == 0, proc.stderr
    assert "session mlperf-big is queued" in proc.stdout and "invoke session.status mlperf-big" in proc.stdout
    status = inv(client_user, "session.status", "mlperf-big")
    assert "PENDING: no-available-instances; Could not find a contiguous resource region" in status.stdout
    assert "invoke session.destroy mlperf-big" in status.stdout
    early = inv(client_user, "session.logs", "mlperf-big")
    assert early.returncode == 0 and "mlperf-big is PENDING: no console yet" in early.stderr
    assert inv(client_user, "session.destroy", "mlperf-big").returncode == 0
    assert manager.session("mlperf-big").status == "CANCELLED"


@pytest.mark.slow
def test_a_name_in_use_and_destroying_a_running_session(manager, client_user):
    env = {**client_user, "MLPERF_STUB_LINES": "100", "MLPERF_STUB_DELAY": "0.2"}
    assert inv(env, "session.create", "--name", "mlperf-long").returncode == 0
    line = one_error(inv(env, "session.create", "--name", "mlperf-long"))
    assert "a session named mlperf-long exists already" in line
    stopped = inv(env, "session.destroy", "mlperf-long")
    assert stopped.returncode == 0 and "mlperf-long: terminated" in stopped.stdout
    status = inv(env, "session.status", "mlperf-long")
    assert "TERMINATED" in status.stdout and "result FAILURE, exit code unknown" in status.stdout
    assert "user-requested" in status.stdout


def test_without_the_client_one_line_says_which_to_install(manager, user):
    line = one_error(inv(user, "session.create", "--name", "mlperf-x"))
    assert "`backend.ai` is not installed" in line and "is 23.09.11" in line   # asked the manager which
    assert "pip install 'backend.ai-client~=23.9.0' 'yarl<1.17.1'" in line and "python3.11 -m venv" in line
    unreachable = {**user, "BACKEND_ENDPOINT": "http://127.0.0.1:9"}
    line = one_error(inv(unreachable, "session.status", "mlperf-x"))
    assert "23.09: 3.11; 24.x to 25.5: 3.12; 25.6 and 26.x: 3.13" in line


@pytest.mark.slow
def test_an_unreachable_manager(client_user):
    line = one_error(inv({**client_user, "BACKEND_ENDPOINT": "http://127.0.0.1:9"}, "session.status", "mlperf-x"))
    assert "cannot reach the Backend.AI manager: check BACKEND_ENDPOINT" in line


def test_client_versions_and_what_they_print():
    assert client_cli.client_requirement("23.09.11") == ("'backend.ai-client~=23.9.0' 'yarl<1.17.1'", "3.11")
    assert client_cli.client_requirement("24.09.14") == ("'backend.ai-client~=24.9.0'", "3.12")
    assert client_cli.client_requirement("25.6.0")[1] == client_cli.client_requirement("26.8.1")[1] == "3.13"
    # What backend.ai-client 23.9.10 prints when a newer yarl breaks its signing (captured from it).
    broken = subprocess.CompletedProcess([], 1, "", "\u2718 AttributeError: 'tuple' object has no attribute 'netloc'\n"
                                         "  *** Traceback ***\n")
    assert "pip install 'yarl<1.17.1'" in str(client_cli.client_error(broken, "session logs"))
    # `vfolder ls` of folders whose names are all numbers (tables printed by the client's tabulate): whole
    # numbers keep their text; with one float among them, tabulate reformats all (1e3, 0.50 -> 1000, 0.5).
    rule = "-----------  ------  --------------------  ----------\n"
    whole = ("  file name    size  modified              mode\n" + rule + "        007       2  Dec 01 2026 11:37:05  "
             "drwxr-xr-x\n         12       2  Dec 01 2026 11:37:05  -rw-r--r--\n")
    assert [(n, s, d) for n, s, _, d in session_results.parse_listing(whole)] == [("007", 2, True), ("12", 2, False)]
    floats = ("  file name    size  modified              mode\n" + rule + "     1000         2  Dec 01 2026 11:37:05  "
              "-rw-r--r--\n        0.5       3  Dec 01 2026 11:37:05  -rw-r--r--\n")
    assert [(n, s) for n, s, _, _ in session_results.parse_listing(floats)] == [(None, 2), (None, 3)]
    assert session_results.parse_listing("") is None


def test_credentials_from_a_dotenv_are_redacted_too(tmp_path):
    (tmp_path / ".env").write_text(f"export BACKEND_ACCESS_KEY={ACCESS}\nBACKEND_SECRET_KEY='{SECRET}'\nOTHER=1\n")
    (tmp_path / "deeper").mkdir()
    settings = client_cli.client_settings(environ={"BACKEND_ENDPOINT": "http://m:8081"}, cwd=tmp_path / "deeper")
    assert settings == {"BACKEND_ENDPOINT": "http://m:8081", "BACKEND_ACCESS_KEY": ACCESS, "BACKEND_SECRET_KEY": SECRET}
    assert client_cli.redact(f"key {ACCESS} secret {SECRET}.", settings) == "key *** secret ***."


@pytest.mark.slow
def test_bad_options_are_one_line(user):
    for args, words in [(["--gpus", "eight"], "--gpus 'eight'"), (["--nodes", "0"], "--nodes '0'"),
                        (["--name", "x"], "'x' is not a Backend.AI session name"),
                        (["--vfolder", "a:b"], "--vfolder 'a:b'"), (["--mem", "lots"], "--mem 'lots'"),
                        (["--nodes", "2", "--cluster-mode", "one-box"], "--cluster-mode 'one-box' is not one of"),
                        (["--cluster-mode", "multi-node"], "pass --nodes 2 or more")]:
        assert words in one_error(inv(user, "session.create", "--dry-run", *args))
    assert "is not a Backend.AI session name" in one_error(inv(user, "session.status", 'x" | name != "'))
