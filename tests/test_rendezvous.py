"""Where the training processes meet (issue 24, fix 2): never a name the container cannot resolve.

A Backend.AI container on host networking does not resolve its own name (`main1`); torchrun's
c10d then retries that name without end. Here the host's name is made unresolvable for real, in
a UTS namespace of its own (`unshare --uts`, root only: CI runs as root)."""
from __future__ import annotations

import os
import shutil
import subprocess
import time

import pytest

from conftest import one_error_line, run_invoke
from mlperf import launch

PROBE = """\
import os, torch, torch.distributed as dist
dist.init_process_group("gloo")
total = torch.ones(1)
dist.all_reduce(total)
with open(f"rank{dist.get_rank()}.txt", "w") as out:  # a file each: two processes' prints interleave
    out.write(f"rank {dist.get_rank()} sum {total.item():.0f} master {os.environ['MASTER_ADDR']}")
dist.destroy_process_group()
"""

needs_uts = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None,
                               reason="a host name of its own needs root and unshare (util-linux)")


@pytest.mark.slow
@needs_uts
def test_a_single_host_run_meets_on_the_loopback_when_its_name_does_not_resolve(tmp_path):
    """The launcher's own torchrun command, two gloo workers, under a host name no resolver knows:
    they meet on 127.0.0.1 and finish (standalone alone hangs here until killed)."""
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    command = launch.torchrun_args(2, None) + [str(probe)]
    assert "--local-addr=127.0.0.1" in command
    script = "hostname mlperf-unresolvable-main1 && exec \"$@\""
    proc = subprocess.run(["unshare", "--uts", "sh", "-c", script, "sh", *command], capture_output=True,
                          text=True, timeout=240, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert [(tmp_path / f"rank{rank}.txt").read_text() for rank in (0, 1)] == [
        "rank 0 sum 2 master 127.0.0.1", "rank 1 sum 2 master 127.0.0.1"]


@pytest.mark.slow
def test_a_cluster_run_gives_up_on_a_master_that_does_not_resolve(tiny_shapes, tmp_path):
    """`invoke train` on sub1 of a cluster whose master name resolves nowhere: after the bounded
    wait (MLPERF_MASTER_WAIT, shortened here), one error line naming the host; torchrun never starts."""
    env = {"BACKENDAI_CLUSTER_HOSTS": "mlperf-unresolvable-main1,sub1", "BACKENDAI_CLUSTER_HOST": "sub1",
           "BACKENDAI_CLUSTER_SIZE": "2", "MLPERF_MASTER_WAIT": "3"}
    started = time.monotonic()
    proc = run_invoke(["train", *tiny_shapes["args"], "--device", "cpu", "--gpus", "1", "--batch-size", "4",
                       "--max-epochs", "1", "--log", str(tmp_path / "result_0.txt")], env=env, timeout=120)
    one_error_line(proc, "master host 'mlperf-unresolvable-main1' does not resolve", "waited 3 s",
                   "MLPERF_MASTER_ADDR")
    assert time.monotonic() - started < 60
    assert "torch.distributed" not in proc.stdout + proc.stderr
    assert not (tmp_path / "result_0.txt").exists()


def test_the_wait_ends_as_soon_as_the_name_resolves():
    started = time.monotonic()
    launch.wait_for_master("127.0.0.1", wait=30)
    launch.wait_for_master("localhost", wait=30)
    assert time.monotonic() - started < 5


def test_a_bad_wait_is_one_error_line(tiny_shapes, tmp_path):
    env = {"BACKENDAI_CLUSTER_HOSTS": "main1,sub1", "BACKENDAI_CLUSTER_HOST": "sub1",
           "BACKENDAI_CLUSTER_SIZE": "2", "MLPERF_MASTER_WAIT": "soon"}
    proc = run_invoke(["train", *tiny_shapes["args"], "--device", "cpu", "--gpus", "1", "--batch-size", "4",
                       "--log", str(tmp_path / "result_0.txt")], env=env, timeout=120)
    one_error_line(proc, "MLPERF_MASTER_WAIT='soon' is not a number of seconds")
