"""Where an epoch's time goes, beside the step benchmark: the trainer's own loader and model on the
COCO-shaped set of benchmarks/epoch_level (made first by that benchmark, or here).

    python -m benchmarks.epoch_parts [--steps 120] [--batch 12] [--workers 8,14] [--train-images 6000]
        [--val-images 5000] [--speed fast] [--data-dir /tmp/mlperf-epoch-level]

One process, one GPU, the objects object_detection.train builds (data_loaders, trainer_for):
- loader: batches from the training loader moved to the GPU, nothing else (the host pipeline alone);
- cached: training steps on batches already on the GPU (what train_throughput measures, real data);
- beside it, train_throughput's figure taken apart (step_benchmark_beside): its synthetic batches
  through the trainer's model, its own model on them, its timing of the trainer's model;
- loader+train: training steps fed by the loader, as an epoch runs;
- the same with Python's garbage collector off;
- trained: the cached batches again after the model has trained 4 x --steps loader batches (a step's work
  grows as the model learns: more positives, more mask RoIs);
the loader parts once per --workers count. Every part of the trainer's model starts from the same weights
and optimizer state (but `trained`), so that the parts time the same work. Each training row also records what its steps did
(`ROW_work`: train_throughput.StepWork's mask RoIs per image and whether every loss was finite).
"""
from __future__ import annotations

import argparse
import copy
import datetime
import gc
import json
import sys
import time
from functools import partial
from pathlib import Path

import torch

from benchmarks import save_result
from benchmarks.epoch_level import BACKBONE, RESULTS, prepare
from benchmarks.train_throughput import StepWork
from object_detection import train as T
from object_detection.engine import on_device, set_lr, to_device, train_step, warm_up
from object_detection.recipe import PROFILES


def rate(images: int, started: float) -> float:
    torch.cuda.synchronize()
    return round(images / (time.perf_counter() - started), 1)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--batch", type=int, default=12)
    p.add_argument("--workers", default="8", help="comma-separated loader worker counts")
    p.add_argument("--speed", default="fast", help="the trainer's --speed, e.g. fast-with:nms_scan")
    p.add_argument("--train-images", type=int, default=6000)
    p.add_argument("--val-images", type=int, default=5000, help="the set's (epoch_level's set of the same counts)")
    p.add_argument("--data-dir", type=Path, default=Path("/tmp/mlperf-epoch-level"))
    p.add_argument("--output", type=Path, default=RESULTS / f"epoch_parts-{datetime.date.today().isoformat()}.json")
    a = p.parse_args(argv)
    prepare(a.data_dir, a.train_images, a.val_images)
    root = a.data_dir / "coco-shaped"
    args = T.parse_args([f"--data-root={root}", "--profile=coco", f"--per-gpu-batch={a.batch}", "--num-classes=81",
                         f"--backbone={root / 'downloads' / BACKBONE}", f"--result-log={a.data_dir / 'parts.txt'}", f"--speed={a.speed}"])
    run = T.Run(None, args.speed)
    profile = PROFILES["coco"]
    schedule = profile.schedule_for(a.batch)
    trainer = T.trainer_for(args, run, profile, schedule)
    out = {"per_gpu_batch": a.batch, "steps": a.steps, "speed": a.speed}
    start = trained_state(trainer)
    for workers in [int(w) for w in a.workers.split(",")]:
        args.workers = workers
        _, _, sampler, loader, _ = T.data_loaders(args, run, master_seed=1)
        measure(trainer, schedule, loader, sampler, min(a.steps, len(loader)), run.device, out, f"w{workers}_",
                args.backbone, partial(warm_up, batch=a.batch, eval_batch=args.eval_batch,
                                       size=(profile.min_size, profile.max_size), device=run.device), start)
    out["date"] = datetime.date.today().isoformat()
    out["device"] = torch.cuda.get_device_name()
    print(json.dumps(out, indent=1))
    save_result(out, a.output)
    return 0


def measure(trainer, schedule, loader, sampler, steps: int, device, out: dict, prefix: str, backbone: Path,
            warm, start: tuple[dict, dict]) -> None:
    """The rates of the docstring into `out` (the cached ones only the first time); each part of the
    trainer's model starts from `start` (trained_state), so that the parts time the same work."""
    def batches():
        sampler.set_epoch(len(out))  # a fresh order for each measurement
        for i, batch in enumerate(on_device(loader, device, trainer.prefetch)):  # as the epoch moves them
            if i == steps:
                return
            yield batch

    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in batches():
        torch.cuda.synchronize()
    out[prefix + "loader_img_s"] = rate(steps * loader.batch_sampler.batch_size, started)
    cached = [b for _, b in zip(range(20), batches())]
    out["target_mb_per_batch"] = round(sum(v.numel() * v.element_size() for t in cached[0][1]
                                           for v in t.values() if torch.is_tensor(v)) / 2**20, 2)

    def train(feed, label, model=trainer.model, optimizer=trainer.optimizer, autocast=trainer.autocast,
              scheduled=True, state=start):
        if model is trainer.model and state is not None:  # the same weights for every part: a step's work
            restore(trainer, state)                         # grows as the model learns
        train_step(model, optimizer, trainer.scaler, *cached[0], autocast)
        work = StepWork(model)
        started, n = time.perf_counter(), 0
        for i, (images, targets) in zip(range(steps), feed):
            if scheduled:  # the run's learning rate (its warm-up), else the optimizer's own
                set_lr(optimizer, schedule, i)
            loss, _ = train_step(model, optimizer, trainer.scaler, images, targets, autocast)
            work.add(loss)
            n += len(images)
        out[label] = rate(n, started)
        out[label + "_work"] = work.report(len(images))
        print(json.dumps({label: out[label], "work": out[label + "_work"]}), flush=True)

    if "cached_img_s" not in out:
        train((cached[i % len(cached)] for i in range(steps)), "cached_img_s")
        step_benchmark_beside(trainer, train, loader.batch_sampler.batch_size, steps, device, out, backbone, warm)
    train(batches(), prefix + "loader_train_img_s")
    gc.disable()
    train(batches(), prefix + "loader_train_nogc_img_s")
    gc.enable()
    if "trained_cached_img_s" not in out:  # the cached batches again, after the model has learnt a while
        restore(trainer, start)
        for i, (images, targets) in enumerate(batch for _ in range(TRAINED_CYCLES) for batch in batches()):
            set_lr(trainer.optimizer, schedule, i)
            train_step(trainer.model, trainer.optimizer, trainer.scaler, images, targets, trainer.autocast)
        train((cached[i % len(cached)] for i in range(steps)), "trained_cached_img_s", state=None)  # as trained


TRAINED_CYCLES = 4  # loader cycles of --steps the model trains before trained_cached


def trained_state(trainer) -> tuple[dict, dict]:
    """Copies of the trainer's model and optimizer state, on their devices."""
    model = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    return model, copy.deepcopy(trainer.optimizer.state_dict())


def restore(trainer, state: tuple[dict, dict]) -> None:
    model, optimizer = state
    trainer.model.load_state_dict(model)
    trainer.optimizer.load_state_dict(copy.deepcopy(optimizer))


def step_benchmark_beside(trainer, train, batch: int, steps: int, device, out: dict, backbone: Path,
                          warm) -> None:
    """What separates train_throughput's figure from this set's step, one difference at a time:
    its synthetic COCO-shaped batches (full-image masks, not polygons) through the trainer's model;
    its own model (`ref-bf16-rpncl-fused-roialign`, built the benchmark's way: the same fast.Options
    and recipe, backbone weights calibrated on random pixels) on those batches, at the run's learning
    rate and then at its own; the same build with the trainer's weight file (calibrated on the set's
    images), then after the trainer's warm-up pass; and the benchmark's timing (a synchronisation
    per step, the batch's copy inside it) of the trainer's model."""
    from benchmarks.train_throughput import make_variant, pinned, synthetic_batch, time_steps

    on_host = [pinned(synthetic_batch(batch, "cpu", seed=seed)) for seed in range(4)]
    drawn = [to_device(*b, device) for b in on_host]

    def cycle():
        return (drawn[i % len(drawn)] for i in range(steps))

    train(cycle(), "synthetic_cached_img_s")
    model, optimizer, dtype, _ = make_variant("ref-bf16-rpncl-fused-roialign", device, None)
    autocast = lambda: torch.autocast("cuda", dtype=dtype)  # noqa: E731
    train(cycle(), "benchmark_model_synthetic_cached_img_s", model, optimizer, autocast)
    # then at the benchmark's own learning rate (0.01 from the first step): the weights move, and
    # with them the proposals and the heads' positives
    train(cycle(), "benchmark_model_own_lr_synthetic_cached_img_s", model, optimizer, autocast, scheduled=False)
    torch.manual_seed(0)
    model, optimizer, _, _ = make_variant("ref-bf16-rpncl-fused-roialign", device, None, reference_weights=backbone)
    train(cycle(), "benchmark_model_trainer_weights_synthetic_cached_img_s", model, optimizer, autocast)
    warm(model, autocast)  # the trainer's warm-up pass (trainer_for's)
    train(cycle(), "benchmark_model_trainer_weights_warmed_synthetic_cached_img_s", model, optimizer, autocast)
    del model, optimizer
    timed = time_steps(trainer.model, trainer.optimizer, on_host, device, dtype, trainer.scaler, steps, 3)
    out["benchmark_timing_synthetic_img_s"] = timed["img_per_s"]
    print(json.dumps({"benchmark_timing_synthetic_img_s": timed["img_per_s"]}), flush=True)


if __name__ == "__main__":
    sys.exit(main())
