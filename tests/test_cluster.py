"""`--nodes all` in a cluster session whose hosts do not share a project tree: every other host
checked over the cluster's SSH, brought up to main1's project and venv, or named with what it lacks.

Each "host" is a real sshd on 127.0.0.1 in a mount namespace of its own (tests/support/sshd.py), so it sees
its own tree at the project's path: sub1 starts empty, sub2 holds an older copy (other requirements,
a stale module, a venv without torch, a user's own files), sub4 lacks main1's Python and the data,
sub3 has no server at all, same1 is main1's server under another name (a tree shared as a vfolder). The project main1 runs is a copy of this one with a
venv of its own, made from the base interpreter; a .pth line in it adds this venv's site-packages,
as `--system-site-packages` adds an image's (Backend.AI images ship torch). Only what cannot exist
here is written as files: Backend.AI's /home/config (port-mapping.json) for host networking.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import ROOT
from mlperf import host
from mlperf.cluster import env_words, forwarded_env, host_network_problem, prepare_hosts
from mlperf.errors import UserError
from mlperf.project import runtime_files
from mlperf.remote import run_parallel
from tests.support.sshd import cluster_ssh_config, free_port, own_trees_supported, start_sshd


@dataclass
class Site:
    project: Path           # main1's project
    python: str             # its venv's python
    image_python: str       # a Python outside any venv that sub4 does not have
    trees: dict             # host -> the folder that is the project's path there
    ssh_config: Path


def make_project(proj: Path) -> str:
    """A copy of the project's runtime files with a venv of its own; returns the venv's python."""
    for relative in runtime_files(ROOT):
        (proj / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / relative, proj / relative)
    subprocess.run([sys._base_executable, "-m", "venv", "--without-pip", str(proj / ".venv")], check=True)
    python = proj / ".venv" / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    Path(purelib, "_image_site.pth").write_text(
        f"import site; site.addsitedir({sysconfig.get_paths()['purelib']!r})\n")
    return str(python)


@pytest.fixture(scope="module")
def site(tmp_path_factory, tiny_shapes):
    reason = own_trees_supported()
    if reason:
        pytest.skip(f"each host needs a file tree of its own: {reason}")
    tmp = tmp_path_factory.mktemp("site")
    proj = tmp / "proj"
    python = make_project(proj)
    image = tmp / "image" / "bin"
    image.mkdir(parents=True)
    (image / "python3").symlink_to(os.path.realpath(sys._base_executable))
    trees = {name: tmp / f"{name}-tree" for name in ("sub1", "sub2", "sub4")}
    for folder in [*trees.values(), tmp / "nothing"]:
        folder.mkdir()
    shutil.copytree(proj, trees["sub2"], symlinks=True, dirs_exist_ok=True)   # an older copy: see below
    (trees["sub2"] / "requirements.txt").write_text("invoke>=2.2,<3\n")
    (trees["sub2"] / "mlperf" / "stale_module.py").write_text("raise ImportError('left over')\n")
    (trees["sub2"] / "notes.txt").write_text("mine\n")
    (trees["sub2"] / "results").mkdir()
    (trees["sub2"] / "results" / "keep.txt").write_text("a result\n")
    [pth] = (trees["sub2"] / ".venv").rglob("_image_site.pth")
    pth.unlink()                                       # its venv cannot import torch
    key = tmp / "id_cluster"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    hidden = {tmp / "image": tmp / "nothing", tiny_shapes["data_dir"]: tmp / "nothing"}
    servers = {"main1": start_sshd(tmp / "sshd-main1", client_key=key),
               **{name: start_sshd(tmp / f"sshd-{name}", client_key=key,
                                   own_tree={proj: tree, **(hidden if name == "sub4" else {})})
                  for name, tree in trees.items()}}
    ports = {name: server.port for name, server in servers.items()}
    ports.update(same1=ports["main1"], sub3=free_port())  # same1: main1's tree (a shared vfolder); sub3: down
    config = cluster_ssh_config(tmp / "ssh_config", ports, key, tmp / "known_hosts")
    yield Site(proj, python, str(image / "python3"), trees, config)
    for server in servers.values():
        server.stop()


def cluster_of(hosts: str) -> host.Cluster:
    return host.cluster_from_env({"BACKENDAI_CLUSTER_HOSTS": hosts, "BACKENDAI_CLUSTER_HOST": "main1"})


def prepare(site: Site, hosts: str, *, nproc: int = 1, trainer=("--device=cpu",), python=None):
    env = {**os.environ, "PYTHONPATH": str(site.project)}
    prepare_hosts(cluster_of(hosts), nproc, list(trainer), env, str(site.ssh_config), root=site.project,
                  python=python or site.python)


def run_train(site: Site, tiny_shapes, hosts: str, log: Path) -> subprocess.CompletedProcess:
    """`invoke train --nodes all` on main1, from main1's project, as a user types it there."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "BACKENDAI_CLUSTER_HOSTS": hosts, "BACKENDAI_CLUSTER_HOST": "main1",
           "BACKENDAI_CLUSTER_SIZE": str(len(hosts.split(","))), "MLPERF_MASTER_ADDR": "127.0.0.1",
           "MLPERF_MASTER_PORT": str(free_port()), "MLPERF_SSH_CONFIG": str(site.ssh_config)}
    return subprocess.run([site.python, "-m", "invoke", "train", *tiny_shapes["args"], "--device", "cpu", "--gpus",
                           "1", "--batch-size", "4", "--max-epochs", "1", "--seed", "5", "--nodes", "all",
                           "--log", str(log)], cwd=site.project, env=env, capture_output=True, text=True,
                          timeout=600)


@pytest.mark.slow
def test_a_host_that_starts_empty_gets_the_project_and_venv_and_trains(site, tiny_shapes, tmp_path):
    proc = run_train(site, tiny_shapes, "main1,sub1", tmp_path / "result_0.txt")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert f"[sub1] the project is not there: copying project {site.project} from main1" in out
    assert f"[sub1] no venv at {site.project / '.venv'}: copying venv" in out
    assert "cluster: sub1 ready" in out and "1 host(s) brought up to date from main1" in out
    assert '[main1] {"config": "shapes-cpu"' in out and '"world_size": 2' in out
    tree = site.trees["sub1"]
    assert (tree / "requirements.txt").read_bytes() == (site.project / "requirements.txt").read_bytes()
    assert (tree / "mlperf" / "cluster.py").is_file() and (tree / ".venv" / "bin" / "python").exists()
    assert not (tree / "data").exists()   # data is never copied


@pytest.mark.slow
def test_a_host_with_other_requirements_is_brought_up_to_date_keeping_its_own_files(site, capsys):
    prepare(site, "main1,sub2")
    out = capsys.readouterr().out
    assert "[sub2] its requirements.txt differs from main1's: copying project" in out
    assert "[sub2] its venv has torch missing, main1's 2." in out and "cluster: sub2 ready" in out
    tree = site.trees["sub2"]
    assert (tree / "requirements.txt").read_bytes() == (site.project / "requirements.txt").read_bytes()
    assert not (tree / "mlperf" / "stale_module.py").exists()   # a stale module would still import
    assert (tree / "notes.txt").read_text() == "mine\n" and (tree / "results" / "keep.txt").is_file()
    prepare(site, "main1,sub2")   # now nothing to copy
    out = capsys.readouterr().out
    assert "copying" not in out and "cluster: sub2 ready" in out and "brought up to date" not in out


def test_hosts_that_cannot_take_part_get_one_line_each_and_nothing_is_copied(site, tiny_shapes):
    data = tiny_shapes["data_dir"] / "tiny"
    trainer = (f"--data-root={data}", "--train-annotations=annotations/instances_train2017.json", "--device=cpu")
    with pytest.raises(UserError) as caught:
        prepare(site, "main1,sub3,sub4", python=site.image_python, trainer=trainer)
    first, *lines = str(caught.value).splitlines()
    assert first == "--nodes all: 2 of 2 other host(s) cannot take part, nothing was started:"
    [sub3] = [line for line in lines if line.startswith("  sub3: ")]
    assert "cannot connect over the cluster's SSH" in sub3 and f"MLPERF_SSH_CONFIG={site.ssh_config}" in sub3
    [sub4] = [line for line in lines if line.startswith("  sub4: ")]
    assert (f"{data}, {data}/annotations/instances_train2017.json not found there: datasets are never copied; "
            "put --data-dir on a vfolder") in sub4
    assert f"no Python {sys.version.split()[0]} at {site.image_python} there" in sub4
    assert len(lines) == 2 and list(site.trees["sub4"].iterdir()) == []


@pytest.mark.slow
def test_a_login_the_sshd_refuses_says_why_a_root_session_cannot_log_in(site, tmp_path):
    """The sshd answers but takes no key of ours: as root (a Backend.AI session with kernel uid 0, whose
    own sshd refuses root: dropbear -w in 23.09), the line says so; as any other user it does not."""
    stranger = tmp_path / "id_stranger"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(stranger)], check=True)
    text = site.ssh_config.read_text()
    port = int(text.split("Host main1\n", 1)[1].split("Port ", 1)[1].split()[0])
    config = cluster_ssh_config(tmp_path / "ssh_config", {"main1": port, "sub1": port}, stranger,
                                tmp_path / "known_hosts")
    with pytest.raises(UserError) as caught:
        prepare_hosts(cluster_of("main1,sub1"), 1, ["--device=cpu"], dict(os.environ), str(config),
                      root=site.project, python=site.python)
    [sub1] = [line for line in str(caught.value).splitlines() if line.startswith("  sub1: ")]
    assert "cannot connect over the cluster's SSH" in sub1
    assert ("this session runs as root, and Backend.AI's own sshd on port 2200 refuses root logins" in sub1) \
        == (os.geteuid() == 0), sub1


@pytest.mark.slow
def test_a_host_with_fewer_gpus_or_cores_than_processes_is_refused(site):
    with pytest.raises(UserError, match=r"same1: torch sees 0 GPU\(s\) there but the run starts 2 process"):
        prepare(site, "main1,same1", nproc=2, trainer=("--device=cuda",))
    with pytest.raises(UserError, match=r"same1: \d+ CPU core\(s\) there but the run starts 4096 process"):
        prepare(site, "main1,same1", nproc=4096)


@pytest.mark.slow
def test_invoke_train_refuses_an_unreachable_host_with_one_error_line(site, tiny_shapes, tmp_path):
    proc = run_train(site, tiny_shapes, "main1,sub3", tmp_path / "result_0.txt")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr + proc.stdout, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: --nodes all: 1 of 1 other host(s) cannot take part, nothing was started:"]
    assert "\n  sub3: cannot connect over the cluster's SSH" in proc.stderr
    assert "[main1]" not in proc.stdout   # nothing started, not even on main1


# -- environment for the other hosts ------------------------------------------------------------

def test_every_nccl_mlperf_and_torch_variable_reaches_the_other_host_as_it_is(tmp_path, capsys):
    marker = tmp_path / "injected"
    hostile = f"two words 'single' \"double\" $(touch {marker}) `touch {marker}`; touch {marker} \\ \nline 2"
    env = {"MLPERF_NOTE": hostile, "NCCL_SOCKET_IFNAME": "=eth0,^lo", "NCCL_IB_HCA": "mlx5_0:1,mlx5_1:1",
           "TORCH_DISTRIBUTED_DEBUG": "DETAIL", "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True",
           "OMP_NUM_THREADS": "3", "PYTHONPATH": "/a b:/c", "PYTHONUNBUFFERED": "1",
           "SECRET_TOKEN": "stays here", "HOME": "/elsewhere", f"NCCL_X;touch {marker}": "not a name"}
    passed = forwarded_env(env)
    assert sorted(passed) == ["MLPERF_NOTE", "NCCL_IB_HCA", "NCCL_SOCKET_IFNAME", "OMP_NUM_THREADS",
                              "PYTHONPATH", "PYTHONUNBUFFERED", "PYTORCH_CUDA_ALLOC_CONF", "TORCH_DISTRIBUTED_DEBUG"]
    server = start_sshd(tmp_path / "sshd")
    try:
        show = f"import json, os; print(json.dumps({{k: os.environ.get(k) for k in {sorted(env)!r}}}))"
        code = run_parallel({"sub1": f"env {env_words(env)} {sys.executable} -c {json.dumps(show)}"},
                            ssh_config=str(server.ssh_config))
    finally:
        server.stop()
    assert code == 0
    [line] = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[sub1] {")]
    seen = json.loads(line.removeprefix("[sub1] "))
    assert {k: v for k, v in seen.items() if k in passed} == passed
    assert seen["SECRET_TOKEN"] is None and seen["HOME"] != "/elsewhere"
    assert not marker.exists()


# -- host networking (Backend.AI's /home/config written as files) -------------------------------

def test_host_networking_is_followed_where_the_port_mapping_names_the_hosts_else_refused(tmp_path):
    cluster = cluster_of("main1,sub1")
    assert host_network_problem(cluster, None, tmp_path) is None          # bridge/overlay: port 2200
    (tmp_path / "intrinsic-ports.json").write_text('{"replin": 30000, "replout": 30001, "sshd": 30002}')
    line = host_network_problem(cluster, None, tmp_path)
    assert "uses host networking" in line and "port-mapping.json" in line and "MLPERF_SSH_CONFIG=FILE" in line
    (tmp_path / "ssh").mkdir()
    mapping = tmp_path / "ssh" / "port-mapping.json"
    mapping.write_text(json.dumps({"main1": ["10.0.0.1", 30002], "sub1": ["10.0.0.2", 30102]}))  # 24.09 form
    assert host_network_problem(cluster, None, tmp_path) is None
    node = "node-0b3c1f52-6a7e-4a52-9d0e-1f2a3b4c5d6e"                    # newer releases' keys
    mapping.write_text(json.dumps({node: ["10.0.0.1", 30002], "node-x": ["10.0.0.2", 30102]}))
    line = host_network_problem(cluster, None, tmp_path)
    assert f"names {node}, node-x, not main1, sub1" in line and "MLPERF_SSH_CONFIG=FILE" in line
    assert host_network_problem(cluster, str(tmp_path / "my_ssh_config"), tmp_path) is None
    with pytest.raises(UserError, match="host networking"):
        prepare_hosts(cluster, 1, ["--device=cpu"], {}, None, config_dir=tmp_path)
    with pytest.raises(UserError, match="MLPERF_SSH_CONFIG=/no/such/file does not exist"):
        prepare_hosts(cluster, 1, ["--device=cpu"], {}, "/no/such/file", config_dir=tmp_path)
