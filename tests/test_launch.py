"""The launcher's decisions before any training process starts: torchrun arguments in a Backend.AI
cluster, pre-flight errors as one line through `invoke train`, the recipe table and the configs.

Backend.AI's cluster variables are given as a dict (no cluster session exists here); everything else
runs for real, through the entry point a user types.
"""
from __future__ import annotations

import json
import sys
from dataclasses import replace

import pytest

from conftest import mllog, one_error_line as assert_one_error_line, run_invoke
from mlperf import host, launch, preflight
from mlperf.errors import UserError
from object_detection.recipe import schedule_for

# A host's own BACKENDAI_CLUSTER_* must not leak into what the tests expect of a single host.
NO_CLUSTER = {"BACKENDAI_CLUSTER_HOSTS": "", "BACKENDAI_CLUSTER_HOST": "", "BACKENDAI_CLUSTER_SIZE": ""}


# -- Backend.AI cluster -> torchrun ---------------------------------------------------------------

CLUSTER = {"BACKENDAI_CLUSTER_HOSTS": "main1,sub1,sub2", "BACKENDAI_CLUSTER_HOST": "sub1",
           "BACKENDAI_CLUSTER_SIZE": "3", "BACKENDAI_CLUSTER_ROLE": "sub"}


def test_cluster_variables_give_node_rank_master_and_node_count():
    cluster = host.cluster_from_env(CLUSTER)
    assert cluster.hosts == ("main1", "sub1", "sub2")
    assert (cluster.node_rank, cluster.nnodes, cluster.master_addr) == (1, 3, "main1")
    assert cluster.master_port == host.DEFAULT_MASTER_PORT
    assert launch.torchrun_args(8, cluster) == [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=8", "--nnodes=3", "--node-rank=1",
        "--master-addr=main1", f"--master-port={host.DEFAULT_MASTER_PORT}"]
    # --nodes all starts every host's torchrun from main1, each with its own rank
    assert "--node-rank=2" in launch.torchrun_args(8, cluster, node_rank=2)


def test_hosts_are_ranked_main_first_whatever_order_the_manager_lists_them_in():
    """23.09 lists the session's kernels in database order: the local stack's two-container sessions
    got BACKENDAI_CLUSTER_HOSTS=sub1,main1 about half the time. main1 stays rank 0 and the master."""
    for listed in ("sub1,main1", "main1,sub1"):
        cluster = host.cluster_from_env({"BACKENDAI_CLUSTER_HOSTS": listed, "BACKENDAI_CLUSTER_HOST": "main1",
                                         "BACKENDAI_CLUSTER_SIZE": "2"})
        assert (cluster.hosts, cluster.node_rank, cluster.master_addr) == (("main1", "sub1"), 0, "main1")
    assert host.rank_order("sub10,sub2,main1,sub1".split(",")) == ("main1", "sub1", "sub2", "sub10")
    cluster = host.cluster_from_env({**CLUSTER, "BACKENDAI_CLUSTER_HOSTS": "sub2,sub1,main1"})
    assert (cluster.node_rank, cluster.master_addr) == (1, "main1")


def test_master_address_and_port_can_be_overridden():
    cluster = host.cluster_from_env({**CLUSTER, "MLPERF_MASTER_ADDR": "10.0.0.5", "MLPERF_MASTER_PORT": "29600"})
    assert (cluster.master_addr, cluster.master_port) == ("10.0.0.5", 29600)
    assert "--master-addr=10.0.0.5" in launch.torchrun_args(1, cluster)


def test_cluster_variables_that_contradict_each_other_are_user_errors():
    with pytest.raises(UserError, match="not in BACKENDAI_CLUSTER_HOSTS"):
        host.cluster_from_env({**CLUSTER, "BACKENDAI_CLUSTER_HOST": "elsewhere"})
    with pytest.raises(UserError, match="BACKENDAI_CLUSTER_SIZE=4"):
        host.cluster_from_env({**CLUSTER, "BACKENDAI_CLUSTER_SIZE": "4"})


@pytest.mark.parametrize("env", [{}, {"BACKENDAI_CLUSTER_HOSTS": "main1", "BACKENDAI_CLUSTER_HOST": "main1",
                                      "BACKENDAI_CLUSTER_SIZE": "1"}])
def test_a_single_host_runs_standalone(env):
    assert host.cluster_from_env(env) is None
    assert launch.torchrun_args(2, None) == [sys.executable, "-m", "torch.distributed.run",
                                             "--nproc-per-node=2", "--standalone", "--local-addr=127.0.0.1"]


def test_one_process_on_one_host_is_the_trainer_alone_as_rank_0_of_1():
    """No torchrun agent for one process (its torch import and rendezvous give it nothing); ranks the
    environment already holds (a job scheduler's) are overridden, as torchrun would."""
    assert launch.launcher_args(1, None) == [sys.executable]
    assert launch.launcher_env(1, None) == {"WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0"}
    assert launch.launcher_args(2, None) == launch.torchrun_args(2, None) and launch.launcher_env(2, None) == {}
    cluster = host.cluster_from_env(CLUSTER)  # one process a host, several hosts: torchrun's rendezvous
    assert launch.launcher_args(1, cluster) == launch.torchrun_args(1, cluster) and launch.launcher_env(1, cluster) == {}


def test_nodes_all_outside_a_cluster_is_one_error_line(tiny_shapes):
    proc = run_invoke(["train", *tiny_shapes["args"], "--nodes", "all", "--device", "cpu"], env=NO_CLUSTER)
    assert_one_error_line(proc, "--nodes all needs a Backend.AI cluster session")


# -- pre-flight errors through `invoke train` -----------------------------------------------------

def test_a_dataset_not_fetched_is_one_error_line(tiny_shapes, tmp_path):
    proc = run_invoke(["train", "--manifest", str(tiny_shapes["manifest"]), "--data-dir", str(tmp_path),
                       "--device", "cpu", "--log", str(tmp_path / "log.txt")], env=NO_CLUSTER)
    assert_one_error_line(proc, "dataset tiny not found", "invoke fetch")
    assert not (tmp_path / "log.txt").exists()


def test_a_dataset_fetched_but_not_verified_is_one_error_line(tiny_shapes, tmp_path):
    args = ["--manifest", str(tiny_shapes["manifest"]), "--data-dir", str(tmp_path)]
    run_invoke(["fetch", *args], check=True, timeout=120)
    proc = run_invoke(["train", *args, "--device", "cpu", "--log", str(tmp_path / "log.txt")], env=NO_CLUSTER)
    assert_one_error_line(proc, "is not verified", "invoke verify")


def test_gpus_asked_on_a_host_without_gpus_is_one_error_line(tiny_shapes, tmp_path):
    proc = run_invoke(["train", *tiny_shapes["args"], "--gpus", "2", "--device", "cuda",
                       "--log", str(tmp_path / "log.txt")], env=NO_CLUSTER)
    assert_one_error_line(proc, "no GPU")


def test_an_unknown_config_is_one_error_line(tiny_shapes, tmp_path):
    proc = run_invoke(["train", *tiny_shapes["args"], "--config", "dgx9000", "--device", "cpu",
                       "--log", str(tmp_path / "log.txt")], env=NO_CLUSTER)
    assert_one_error_line(proc, "unknown configuration 'dgx9000'", "--list-configs")


@pytest.mark.slow
def test_speed_stock_runs_torchvisions_model_code_end_to_end(tiny_shapes, tmp_path):
    """`invoke train --speed stock`: the one switch that leaves out object_detection.fast (the
    baseline, and a first check when a run misbehaves only with the speed code); the trainer says so
    in its run line, the dry run in its plan, and the run ends as usual."""
    log = tmp_path / "result_0.txt"
    args = ["train", *tiny_shapes["args"], "--device", "cpu", "--log", str(log), "--speed", "stock"]
    plan = json.loads(run_invoke([*args, "--dry-run"], env=NO_CLUSTER, check=True).stdout)
    assert plan["speed"] == "stock"
    done = run_invoke([*args, "--max-epochs", "1"], env=NO_CLUSTER, check=True, timeout=600)
    assert '"speed": "stock"' in done.stdout
    assert [e["key"] for e in mllog(log)].count("eval_accuracy") == 1


@pytest.mark.parametrize("speed, said", [
    ("turbo", "--speed must be fast, stock, fast-without:LEVER[,LEVER...] or fast-with:LEVER[,LEVER...], not 'turbo'"),
    ("fast-without:prefetch,warp", "--speed fast-without:prefetch,warp: no lever named warp (levers: fold_bn,"),
])
def test_an_unknown_speed_or_lever_is_one_error_line(tiny_shapes, tmp_path, speed, said):
    proc = run_invoke(["train", *tiny_shapes["args"], "--device", "cpu", "--speed", speed,
                       "--log", str(tmp_path / "log.txt")], env=NO_CLUSTER)
    assert_one_error_line(proc, said)


def test_too_little_shared_memory_says_how_to_get_more_on_backend_ai(monkeypatch):
    # /dev/shm cannot be shrunk here: the free space is what Backend.AI's default (64 MB) leaves.
    monkeypatch.setattr(host, "shm_bytes", lambda path="/dev/shm": (64 * 2**20, 64 * 2**20))
    with pytest.raises(UserError) as error:
        preflight.check_shm(processes=8, workers=8, batch=12)
    message = str(error.value)
    assert "\n" not in message
    assert "/dev/shm has 64 MiB free" in message
    assert "Backend.AI" in message and "shmem=" in message
    preflight.check_shm(processes=8, workers=0, batch=12)  # no workers: nothing goes through /dev/shm
    preflight.check_shm(processes=1, workers=1, batch=4, image_scale=0.25)  # the CPU config fits in 64 MiB


# -- the recipe: RCP schedules and named configurations -------------------------------------------

@pytest.mark.parametrize("batch, lr, decay, warmup, factor", [
    (8, 0.01, (144000, 192000), 500, None),
    (64, 0.08, (18000, 24000), 800, 1e-4),
    (96, 0.12, (12000, 16000), 625, 1.92e-4),
    (16, 0.02, (60000, 80000), 500, 1 / 3),  # no RCP at 16: the reference's own recipe
])
def test_schedules_come_from_the_reference_convergence_points(batch, lr, decay, warmup, factor):
    schedule = schedule_for(batch)
    assert (schedule.batch, schedule.lr, schedule.decay_steps, schedule.warmup_steps) == (batch, lr, decay, warmup)
    if factor is not None:
        assert schedule.warmup_factor == pytest.approx(factor)


def test_a_batch_without_a_reference_point_is_scaled_linearly():
    schedule = schedule_for(40)  # no warning: launch refuses the closed batches the checker would reject
    nearest = schedule_for(48)
    assert schedule.batch == 40
    assert schedule.lr == pytest.approx(nearest.lr * 40 / 48)
    assert schedule.decay_steps == tuple(round(s * 48 / 40) for s in nearest.decay_steps)


def test_learning_rate_warms_up_then_decays_twice():
    s = replace(schedule_for(64), warmup="linear")  # Detectron's (mlperf_linear: tests/test_reference_data.py)
    assert s.lr_at(0) == pytest.approx(s.lr * s.warmup_factor)
    assert s.lr_at(s.warmup_steps // 2) == pytest.approx(s.lr * (s.warmup_factor + 1) / 2)
    assert s.lr_at(s.warmup_steps) == pytest.approx(s.lr)
    assert s.lr_at(s.decay_steps[0] - 1) == pytest.approx(s.lr)
    assert s.lr_at(s.decay_steps[0]) == pytest.approx(s.lr * 0.1)
    assert s.lr_at(s.decay_steps[1]) == pytest.approx(s.lr * 0.01)


def test_list_configs_prints_the_system_configurations():
    proc = run_invoke(["train", "--list-configs"], check=True)
    rows = {line.split()[0]: line.split() for line in proc.stdout.splitlines()[1:] if line.strip()}
    assert rows["dgx8-h100"][1:4] == ["8", "12", "96"]
    assert rows["dgx8-v100-16g"][1:4] == ["8", "6", "48"]
    assert rows["shapes-cpu"][1:4] == ["0", "8", "8"]


@pytest.mark.parametrize("gpus, message", [("99", "but this host has"), ("abc", "must be a whole number"),
                                           ("0", "must be a whole number of at least 1")])
def test_more_cpu_processes_than_cores_or_a_bad_count_is_one_error_line(tiny_shapes, tmp_path, gpus, message):
    proc = run_invoke(["train", *tiny_shapes["args"], "--gpus", gpus, "--device", "cpu",
                       "--log", str(tmp_path / "log.txt")], env=NO_CLUSTER)
    assert_one_error_line(proc, message)
    assert not (tmp_path / "log.txt").exists()


@pytest.mark.slow
def test_a_damaged_checkpoint_on_resume_is_one_line_naming_it(tiny_shapes, tmp_path):
    log = tmp_path / "result_0.txt"
    log.write_text("")
    checkpoint = tmp_path / "result_0.txt.ckpt"
    checkpoint.write_bytes(b"PK\x03\x04 cut off in the middle of a write")
    proc = run_invoke(["train", *tiny_shapes["args"], "--log", str(log), "--resume", "--device", "cpu"],
                      env=NO_CLUSTER)
    assert_one_error_line(proc, f"checkpoint {checkpoint} cannot be read", "delete it")
    assert checkpoint.read_bytes().startswith(b"PK")  # left for the user to look at
