"""The speed levers of the loop around the model (fast.Options: persistent_workers, prefetch,
freeze_setup) leave a run as it was: the same batches, the same losses, the same scores. Each can be
turned off alone with `--speed fast-without:LEVER` (how BENCHMARKS.md measures them)."""
from __future__ import annotations

import dataclasses
import gc
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, mllog
from object_detection import engine, fast, train

LOOP_LEVERS = "persistent_workers,prefetch,freeze_setup"
READ_LOSSES = engine.read_losses


def run_reading_every_loss(tiny_shapes, tmp_path, monkeypatch, speed: str) -> tuple[list, list]:
    """Two epochs of the tiny set with two loader workers: every step's loss readings, and the scores."""
    readings = []

    def reading(*args, **kwargs):
        numbers, healthy = READ_LOSSES(*args, **kwargs)
        readings.append(numbers)
        return numbers, healthy

    monkeypatch.setattr(engine, "read_losses", reading)
    log = tmp_path / f"{speed.replace(':', '-').replace(',', '-')}.txt"
    try:
        code = train.main([f"--data-root={tiny_shapes['data_dir'] / 'tiny'}", "--dataset=tiny",
                           "--profile=shapes-cpu", "--per-gpu-batch=2", "--workers=2", f"--result-log={log}",
                           "--device=cpu", "--num-classes=4", "--max-epochs=2", "--print-freq=1", "--seed=1",
                           f"--speed={speed}"])
    finally:
        gc.unfreeze()  # freeze_setup's, in this test process
    assert code == 0
    return readings, [e["value"] for e in mllog(log) if e["key"] == "eval_accuracy"]


@pytest.mark.slow
def test_the_loop_levers_leave_the_run_as_it_was(tiny_shapes, tmp_path, monkeypatch):
    assert fast.Options.for_device("cpu").persistent_workers and fast.Options.for_device("cpu").freeze_setup
    with_levers = run_reading_every_loss(tiny_shapes, tmp_path, monkeypatch, "fast")
    without = run_reading_every_loss(tiny_shapes, tmp_path, monkeypatch, f"fast-without:{LOOP_LEVERS}")
    assert len(with_levers[0]) > 2 and len(with_levers[1]) == 2  # a reading every step; two evaluations
    assert with_levers == without


def test_the_stock_speed_turns_the_loop_levers_off_too():
    stock = fast.options_for("stock", "cuda")
    assert not (stock.persistent_workers or stock.prefetch or stock.freeze_setup)
    alone = fast.options_for("fast-without:prefetch", "cuda")
    assert not alone.prefetch and alone.persistent_workers and alone.channels_last
    graphed = fast.options_for("fast-with:cuda_graphs,padded_heads", "cuda")  # levers off until they pay
    assert graphed == dataclasses.replace(fast.Options.for_device("cuda"), cuda_graphs=True, padded_heads=True)
    from object_detection.evaluate import StockEvaluation
    from object_detection.fast.scoring import FastEvaluation

    required = ["--data-root=/nowhere", "--result-log=/nowhere/log.txt"]
    assert isinstance(train.evaluation_speed(train.parse_args(required)), FastEvaluation)
    for speed in ("stock", "fast-without:evaluation"):  # evaluation's pieces are a lever like the others
        assert isinstance(train.evaluation_speed(train.parse_args([*required, f"--speed={speed}"])), StockEvaluation)


def test_the_trainer_refuses_cuda_graphs_on_several_processes_in_one_line(tmp_path):
    """Graphs beside DDP's gradient hooks are not measured: the trainer says so before it starts
    (WORLD_SIZE as torchrun sets it; the refusal comes before any GPU or process group is touched)."""
    done = subprocess.run([sys.executable, "-m", "object_detection.train", f"--data-root={tmp_path}",
                           f"--result-log={tmp_path / 'result_0.txt'}", "--device=cuda",
                           "--speed=fast-with:cuda_graphs"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"})
    assert done.returncode == 1, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "cuda_graphs" in lines[0], done.stderr
    assert not (tmp_path / "result_0.txt").exists()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="the side stream needs a GPU (run on the device machine)"))])
def test_prefetched_batches_are_the_loader_s_batches(device):
    """engine.on_device with prefetch: every batch arrives whole and in order, as to_device gives it,
    though it was copied on a side stream while the consumer worked on the one before."""
    torch.manual_seed(0)
    batches = [([torch.randint(0, 256, (3, 64 + 8 * i, 80), dtype=torch.uint8) for _ in range(2)],
                [{"boxes": (torch.rand(3, 4) * 25).cumsum(1), "masks": torch.randint(0, 2, (3, 64 + 8 * i, 80), dtype=torch.uint8),
                  "image_id": 10 * i + k} for k in range(2)]) for i in range(6)]
    where = torch.device(device)
    plain = [engine.to_device(images, targets, where) for images, targets in batches]
    fetched = []
    for images, targets in engine.on_device(iter(batches), where, prefetch=True):
        if device == "cuda":
            torch.cuda._sleep(2_000_000)  # a step that is still computing while the next batch copies
        fetched.append(([i.clone() for i in images], [{k: v.clone() if torch.is_tensor(v) else v
                                                       for k, v in t.items()} for t in targets]))
        del images, targets   # freed after use: the allocator may not hand the memory out early
    assert len(fetched) == len(plain)
    for (images, targets), (want_images, want_targets) in zip(fetched, plain):
        assert all(torch.equal(a, b) for a, b in zip(images, want_images))
        for got, want in zip(targets, want_targets):
            assert got.keys() == want.keys() and got["image_id"] == want["image_id"]
            assert torch.equal(got["boxes"], want["boxes"]) and torch.equal(got["masks"], want["masks"])


def test_a_batch_with_a_box_without_area_stops_before_it_reaches_the_device():
    """The padded heads do not check boxes on the device (that would wait for it): to_device checks the
    host's copy, with torchvision's message."""
    images = [torch.zeros(3, 32, 32, dtype=torch.uint8)]
    targets = [{"boxes": torch.tensor([[1.0, 1.0, 9.0, 9.0], [5.0, 5.0, 5.0, 12.0]]), "labels": torch.tensor([1, 2])}]
    with pytest.raises(ValueError, match=r"positive height and width. Found invalid box \[5.0, 5.0, 5.0, 12.0\]"):
        engine.to_device(images, targets, torch.device("cpu"))
