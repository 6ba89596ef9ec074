"""The trainer on the CPU: real `invoke train` runs on a 4-image shapes set (one process, two gloo
processes through torchrun, a run killed mid-epoch and resumed), the grouped batch sampler, and the
same-function check of our model against torchvision's stock Mask R-CNN.

Training on 2 CPU cores is slow (seconds per 4-image step): every run here is one or two epochs of
one step, and the assertions on a run share it.
"""
from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from conftest import ROOT, mllog, run_invoke
from mlperf.results.logs import check_compliance
from object_detection.data import GroupedBatchSampler

RULESET = "3.1.0"
SEED = "1"
NO_CLUSTER = {"BACKENDAI_CLUSTER_HOSTS": "", "BACKENDAI_CLUSTER_HOST": "", "BACKENDAI_CLUSTER_SIZE": ""}
LOSS_LINE = re.compile(r"^epoch (\d+) iter (\d+) (loss=.*) lr=(\S+)", re.M)


def values(events: list[dict], key: str) -> list:
    return [e["value"] for e in events if e["key"] == key]


def epochs_of(events: list[dict], key: str) -> list[int]:
    return [e["metadata"]["epoch_num"] for e in events if e["key"] == key]


def loss_lines(stdout: str) -> list[dict[str, float]]:
    """Every printed loss line as {name: value} (total loss, each part, lr)."""
    parsed = []
    for match in LOSS_LINE.finditer(stdout):
        parts = dict(item.split("=") for item in match.group(3).split())
        parsed.append({name: float(value) for name, value in parts.items()} | {"lr": float(match.group(4))})
    return parsed


def assert_complete_run(events: list[dict], epochs: int) -> None:
    """One run, each epoch once and evaluated, as the compliance checker and the scorer expect."""
    keys = Counter(e["key"] for e in events)
    assert keys["run_start"] == 1 and keys["run_stop"] == 1 and keys["init_start"] == 1
    expected = list(range(1, epochs + 1))
    assert epochs_of(events, "epoch_start") == expected
    assert epochs_of(events, "epoch_stop") == expected
    assert epochs_of(events, "eval_accuracy") == expected
    for accuracy in values(events, "eval_accuracy"):
        assert set(accuracy) == {"BBOX", "SEGM"}
        assert all(0.0 <= accuracy[k] <= 1.0 for k in accuracy)
    stop = next(e for e in events if e["key"] == "run_stop")
    assert stop["metadata"]["status"] in ("success", "aborted")
    assert values(events, "submission_division") == ["open"]


def assert_passes_checker(log: Path) -> None:
    ok, messages = check_compliance(log, RULESET)
    assert ok, messages


def train(tiny_shapes, log: Path, *extra: str) -> subprocess.CompletedProcess:
    return run_invoke(["train", *tiny_shapes["args"], "--log", str(log), "--seed", SEED, *extra],
                      env=NO_CLUSTER, timeout=600)


# -- one process ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def single_run(tiny_shapes, tmp_path_factory):
    log = tmp_path_factory.mktemp("single") / "result_0.txt"
    proc = train(tiny_shapes, log, "--max-epochs", "1", "--device", "cpu")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, log


@pytest.mark.slow
def test_one_process_run_logs_a_compliant_open_division_result(single_run):
    proc, log = single_run
    events = mllog(log)
    assert_passes_checker(log)
    assert_complete_run(events, epochs=1)
    assert values(events, "seed") == [int(SEED)]
    assert values(events, "global_batch_size") == [8]
    assert values(events, "train_samples") == [8] and values(events, "eval_samples") == [2]
    assert values(events, "model") == ["r18-fpn-slim"]  # the CPU demo's small model, said in the log
    assert "run_stop: aborted" in proc.stdout  # the shapes-cpu target is out of reach in one step


@pytest.mark.slow
def test_the_console_shows_progress_and_evaluations_not_the_mlperf_records(single_run):
    proc, log = single_run
    assert ":::MLLOG" not in proc.stdout and ":::MLLOG" in log.read_text()  # --verbose shows them (below)
    assert re.search(r"^epoch 1 evaluation: BBOX \d\.\d{4} \(target 0\.\d+\), SEGM .* in \d+\.\d s", proc.stdout, re.M)


@pytest.mark.slow
def test_one_process_run_prints_finite_losses(single_run):
    proc, _ = single_run
    losses = loss_lines(proc.stdout)
    assert losses, proc.stdout  # the epoch's last iteration always prints
    assert {"loss", "loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness",
            "loss_rpn_box_reg"} <= set(losses[0])
    assert all(math.isfinite(v) for line in losses for v in line.values())


# -- two processes (torchrun, gloo) ---------------------------------------------------------------

@pytest.mark.slow
def test_two_gloo_processes_train_and_gather_one_evaluation(tiny_shapes, tmp_path):
    log = tmp_path / "result_0.txt"
    # --batch-size 4: 2 images a process, so the 8 training images make two global steps
    proc = train(tiny_shapes, log, "--max-epochs", "1", "--device", "cpu", "--gpus", "2", "--batch-size", "4",
                 "--verbose")  # the MLPerf records on the console too: only rank 0's
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    config = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith('{"config"')]
    assert len(config) == 1 and config[0]["world_size"] == 2, proc.stdout  # rank 0 prints it, once
    events = mllog(log)
    assert_passes_checker(log)
    assert_complete_run(events, epochs=1)
    assert values(events, "global_batch_size") == [4]  # 2 processes x 2 images
    assert values(events, "eval_samples") == [2]  # each rank evaluated one image; rank 0 scored both
    assert values(events, "submission_platform") == ["2xCPU"]
    assert [p.name for p in tmp_path.iterdir()] == ["result_0.txt"]  # one log; no checkpoint after the last epoch
    assert proc.stdout.count('"key": "run_start"') == 1  # only rank 0 logs
    # That the gathered score is the single-process score is tests/test_evaluate.py's two-rank test.
    assert loss_lines(proc.stdout)


# -- killed mid-epoch, then resumed ---------------------------------------------------------------

def wait_for_epoch_start(process: subprocess.Popen, log: Path, epoch: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"training ended (exit {process.returncode}) before epoch {epoch} started")
        if log.exists() and epoch in epochs_of(mllog(log), "epoch_start"):
            return
        time.sleep(0.2)
    raise AssertionError(f"epoch {epoch} did not start within {timeout} s")


def processes_naming(text: str) -> list[int]:
    """Live processes whose command line contains `text` (invoke, torchrun, trainers, loader workers)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and text in (entry / "cmdline").read_bytes().decode(errors="replace"):
                if (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                    found.append(int(entry.name))
        except OSError:
            continue
    return found


def start_training(tiny_shapes, log: Path, max_epochs: int, out) -> subprocess.Popen:
    """`invoke train` on the CPU in a session of its own (so a test can kill it, or its whole group)."""
    args = [sys.executable, "-m", "invoke", "train", *tiny_shapes["args"], "--log", str(log), "--seed", SEED,
            "--max-epochs", str(max_epochs), "--device", "cpu"]
    return subprocess.Popen(args, cwd=ROOT, env={**os.environ, **NO_CLUSTER, "PYTHONUNBUFFERED": "1"}, stdout=out,
                            stderr=subprocess.STDOUT, start_new_session=True)


@pytest.mark.slow(seconds=25)
def test_a_run_killed_mid_epoch_resumes_to_one_complete_log(tiny_shapes, tmp_path):
    log = tmp_path / "result_0.txt"
    with open(tmp_path / "killed.out", "w") as out:
        process = start_training(tiny_shapes, log, 2, out)
        try:
            wait_for_epoch_start(process, log, epoch=2, timeout=500)
        finally:
            os.killpg(process.pid, signal.SIGKILL)  # invoke, torchrun, the trainer and its loader worker
            process.wait()
    # torchrun puts each trainer in a session of its own: they must die with it, not write on
    deadline = time.monotonic() + 10
    while processes_naming(str(log)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not processes_naming(str(log))
    assert Path(f"{log}.ckpt").is_file()  # written after epoch 1, before epoch 2 started
    assert epochs_of(mllog(log), "eval_accuracy") == [1]  # the killed run's partial log

    proc = train(tiny_shapes, log, "--max-epochs", "2", "--device", "cpu", "--resume")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "resuming after epoch 1" in proc.stdout
    events = mllog(log)
    assert_complete_run(events, epochs=2)  # epoch 2 once: the killed start was cut off the log
    assert_passes_checker(log)
    losses = loss_lines(proc.stdout)
    assert losses and all(math.isfinite(v) for line in losses for v in line.values())
    assert not Path(f"{log}.ckpt").exists()  # a finished run keeps no checkpoint


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killing_the_launcher_alone_takes_torchrun_and_the_trainers_down(tiny_shapes, tmp_path, sig):
    """Not the process group: only `invoke train` itself, as a job manager or a careless kill does."""
    log = tmp_path / "result_0.txt"
    with open(tmp_path / "out", "w") as out:
        process = start_training(tiny_shapes, log, 3, out)
        try:
            wait_for_epoch_start(process, log, epoch=1, timeout=300)
            assert len(processes_naming(str(log))) >= 2  # torchrun and the trainer, at least
            os.kill(process.pid, sig)
            process.wait(timeout=30)
            deadline = time.monotonic() + 30
            while processes_naming(str(log)) and time.monotonic() < deadline:
                time.sleep(0.2)
            left = processes_naming(str(log))
        finally:
            os.killpg(process.pid, signal.SIGKILL) if process.poll() is None else None
            for pid in processes_naming(str(log)):
                os.kill(pid, signal.SIGKILL)
    assert not left, left


# -- the grouped batch sampler --------------------------------------------------------------------

GROUPS = [0, 1, 1, 0, 0, 0, 1, 0, 1, 0] * 5 + [1, 0, 0]  # 53 images, landscape (0) and portrait (1)


def epoch_batches(epoch: int, world_size: int = 2, batch: int = 4, seed: int = 7) -> list[list[list[int]]]:
    """Each rank's batches of one epoch."""
    ranks = []
    for rank in range(world_size):
        sampler = GroupedBatchSampler(GROUPS, batch, rank=rank, world_size=world_size, seed=seed)
        sampler.set_epoch(epoch)
        ranks.append(list(sampler))
    return ranks


def test_every_rank_yields_the_same_number_of_full_batches():
    for world_size, batch in [(1, 4), (2, 4), (3, 2), (4, 3)]:
        ranks = epoch_batches(1, world_size, batch)
        expected = len(GROUPS) // (batch * world_size)
        assert [len(batches) for batches in ranks] == [expected] * world_size
        assert all(len(b) == batch for batches in ranks for b in batches)


def test_batches_hold_one_aspect_group_except_the_last_leftover():
    for epoch in range(1, 6):
        for batches in epoch_batches(epoch):
            mixed = [i for i, b in enumerate(batches) if len({GROUPS[j] for j in b}) > 1]
            assert mixed in ([], [len(batches) - 1]), (epoch, batches)


def test_ranks_draw_disjoint_images_within_an_epoch():
    rank0, rank1 = epoch_batches(3)
    assert not {i for b in rank0 for i in b} & {i for b in rank1 for i in b}


def test_batches_are_the_same_for_a_seed_and_epoch_and_change_across_epochs():
    assert epoch_batches(2) == epoch_batches(2)
    assert epoch_batches(2) != epoch_batches(3)
    assert epoch_batches(2, seed=8) != epoch_batches(2)


# -- same function as torchvision's stock Mask R-CNN ----------------------------------------------

def random_backbone_weights(path: Path) -> None:
    """A torchvision ResNet-50 state dict with random weights and BatchNorm statistics that are not
    the identity, so folding the frozen BatchNorm into the convolutions changes numbers."""
    from torchvision.models import resnet50

    torch.manual_seed(123)
    state = resnet50().state_dict()
    for name, value in state.items():
        if name.endswith(("bn1.weight", "bn2.weight", "bn3.weight", "downsample.1.weight")):
            value.uniform_(0.5, 1.0)
        elif name.endswith("running_var"):
            value.uniform_(0.5, 2.0)
        elif name.endswith(("running_mean", "bn1.bias", "bn2.bias", "bn3.bias", "downsample.1.bias")):
            value.normal_(0, 0.1)
    torch.save(state, path)


def small_batch() -> tuple[list[torch.Tensor], list[dict]]:
    """Two 128x160 images with two boxes and masks each."""
    g = torch.Generator().manual_seed(5)
    images = [torch.rand(3, 128, 160, generator=g) for _ in range(2)]
    targets = []
    for offset in (0, 20):
        boxes = torch.tensor([[10.0 + offset, 12.0, 70.0 + offset, 90.0], [60.0, 30.0 + offset, 150.0, 120.0]])
        masks = torch.zeros(2, 128, 160, dtype=torch.uint8)
        for k, (x0, y0, x1, y1) in enumerate(boxes.int().tolist()):
            masks[k, y0:y1, x0:x1] = 1
        targets.append({"boxes": boxes, "labels": torch.tensor([3, 17]), "masks": masks})
    return images, targets


@pytest.mark.slow
def test_our_model_computes_the_same_losses_as_torchvision_stock(tmp_path):
    from torchvision.models import resnet50
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
    from torchvision.ops import FrozenBatchNorm2d

    from object_detection.fast.sampler import use_batched_sampler
    from object_detection.model import build_model

    weights = tmp_path / "resnet50.pth"
    random_backbone_weights(weights)
    ours = build_model(81, backbone_weights=weights, proposals_per_image=1000, min_size=128, max_size=160)
    ours = ours.to(memory_format=torch.channels_last).train()

    body = resnet50(norm_layer=FrozenBatchNorm2d)
    stock = MaskRCNN(_resnet_fpn_extractor(body, 3), num_classes=81, rpn_post_nms_top_n_train=1000,
                     min_size=128, max_size=160)
    stock.load_state_dict(ours.state_dict())  # strict: the same modules under the same names
    # Our sampler draws the same distribution of subsets in another order (tests/test_model.py):
    # both models get it here so the same seed samples the same anchors and RoIs.
    use_batched_sampler(stock)
    stock.train()

    images, targets = small_batch()
    torch.manual_seed(0)
    expected = stock(images, targets)
    torch.manual_seed(0)
    got = ours(images, targets)
    assert set(got) == set(expected)
    for name in expected:
        assert torch.isfinite(expected[name])
        assert got[name].item() == pytest.approx(expected[name].item(), rel=1e-3), name
