"""mlperf.remote.run_parallel on loopback: two "hosts" (ssh aliases main1 and sub1 for one real sshd,
as in a Backend.AI cluster session) run torchrun as one job; a failing host stops the other."""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from mlperf.remote import run_parallel
from tests.support.sshd import free_port, start_sshd

ALL_REDUCE = """
import torch, torch.distributed as dist
dist.init_process_group("gloo")
total = torch.ones(1)
dist.all_reduce(total)
print(f"rank {dist.get_rank()} world size {dist.get_world_size()} sum {int(total.item())}", flush=True)
dist.destroy_process_group()
"""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cluster")
    server = start_sshd(tmp / "sshd")
    yield server, tmp
    server.stop()


def processes_with(marker: str) -> list[int]:
    """Pids on this machine whose command line holds `marker` (the hosts are this machine)."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) != os.getpid():
            try:
                if marker in (proc / "cmdline").read_bytes().decode(errors="replace"):
                    found.append(int(proc.name))
            except OSError:
                continue
    return found


@pytest.mark.slow
def test_two_hosts_form_one_torchrun_job(cluster, capsys):
    server, tmp = cluster
    script = tmp / "all_reduce.py"
    script.write_text(ALL_REDUCE)
    port = free_port()
    commands = {
        host: f"{sys.executable} -m torch.distributed.run --nnodes 2 --nproc-per-node 1 --node-rank {rank} "
              f"--master-addr 127.0.0.1 --master-port {port} {script}"
        for rank, host in enumerate(["main1", "sub1"])
    }
    assert run_parallel(commands, ssh_config=str(server.ssh_config)) == 0
    out = capsys.readouterr().out
    assert "[main1] rank 0 world size 2 sum 2" in out
    assert "[sub1] rank 1 world size 2 sum 2" in out


@pytest.mark.slow
def test_one_failing_host_stops_the_others(cluster, capsys):
    server, tmp = cluster
    marker = f"mlperf-test-sleeper-{os.getpid()}"
    sleeper = tmp / f"{marker}.py"
    ready = tmp / "worker-started"
    sleeper.write_text(f"import pathlib, time\nprint('sleeping', flush=True)\n"
                       f"pathlib.Path({str(ready)!r}).touch()\ntime.sleep(60)\n")
    commands = {
        # torchrun's agent, and its worker in a session of its own: both must go.
        "main1": f"{sys.executable} -m torch.distributed.run --nnodes 1 --nproc-per-node 1 "
                 f"--master-port {free_port()} {sleeper}",
        # Fails once main1's worker runs, so that there is something to stop.
        "sub1": f"i=0; while [ ! -e {ready} ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done; "
                "echo giving up; exit 3",
    }
    started = time.monotonic()
    assert run_parallel(commands, ssh_config=str(server.ssh_config)) == 3
    out = capsys.readouterr().out
    assert "[sub1] giving up" in out and "[main1] sleeping" in out
    assert "[main1] stopping (another host failed)" in out
    assert time.monotonic() - started < 90
    deadline = time.monotonic() + 10
    while processes_with(marker) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert processes_with(marker) == []


@pytest.mark.slow(seconds=30)
def test_invoke_train_nodes_all_trains_across_two_hosts(cluster, tiny_shapes, tmp_path):
    """`invoke train --nodes all` on main1 of a (loopback) Backend.AI cluster session: sub1 checked
    and found to share main1's tree (as a vfolder mounted on both would), so nothing is copied;
    torchrun on both hosts over SSH, node ranks 0 and 1, gloo, one tiny shapes training with world
    size 2. tests/test_cluster.py covers hosts with trees of their own."""
    from conftest import run_invoke
    from mlperf.results.logs import check_compliance, parse_log

    server, _ = cluster
    log = tmp_path / "result_0.txt"
    env = {"BACKENDAI_CLUSTER_HOSTS": "main1,sub1", "BACKENDAI_CLUSTER_HOST": "main1",
           "BACKENDAI_CLUSTER_SIZE": "2", "MLPERF_MASTER_ADDR": "127.0.0.1",
           "MLPERF_MASTER_PORT": str(free_port()), "MLPERF_SSH_CONFIG": str(server.ssh_config)}
    proc = run_invoke(["train", *tiny_shapes["args"], "--device", "cpu", "--gpus", "1", "--batch-size", "4",
                       "--max-epochs", "1", "--seed", "5", "--nodes", "all", "--log", str(log)],
                      env=env, timeout=600, check=True)
    # rank 1 on sub1 logs nothing itself; the world size of 2 (one process per node) is its part
    assert '[main1] {"config": "shapes-cpu"' in proc.stdout and '"world_size": 2' in proc.stdout
    assert "2 node(s) x 1 cpu process(es)" in proc.stdout
    assert "cluster: sub1 ready" in proc.stdout and "copying" not in proc.stdout
    parsed = parse_log(log)
    assert parsed.status in ("success", "aborted") and parsed.evals
    assert '"key": "global_batch_size", "value": 4' in log.read_text()
    assert check_compliance(log, "3.1.0") == (True, [])
