"""Where an epoch's time goes, beside the step benchmark: the trainer's own loader and model on the
COCO-shaped set of benchmarks/epoch_level (made first by that benchmark, or here).

    python -m benchmarks.epoch_parts [--steps 120] [--batch 12] [--workers 8,14] [--data-dir /tmp/mlperf-epoch-level]

One process, one GPU, the objects object_detection.train builds (data_loaders, trainer_for):
- loader: batches from the training loader moved to the GPU, nothing else (the host pipeline alone);
- cached: training steps on batches already on the GPU (what train_throughput measures, real data);
- loader+train: training steps fed by the loader, as an epoch runs;
- the same with Python's garbage collector off;
the loader parts once per --workers count.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import sys
import time
from pathlib import Path

import torch

from benchmarks import save_result
from benchmarks.epoch_level import BACKBONE, RESULTS, prepare
from object_detection import train as T
from object_detection.engine import set_lr, to_device, train_step
from object_detection.recipe import PROFILES


def rate(images: int, started: float) -> float:
    torch.cuda.synchronize()
    return round(images / (time.perf_counter() - started), 1)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--batch", type=int, default=12)
    p.add_argument("--workers", default="8", help="comma-separated loader worker counts")
    p.add_argument("--train-images", type=int, default=6000)
    p.add_argument("--data-dir", type=Path, default=Path("/tmp/mlperf-epoch-level"))
    p.add_argument("--output", type=Path, default=RESULTS / f"epoch_parts-{datetime.date.today().isoformat()}.json")
    a = p.parse_args(argv)
    prepare(a.data_dir, a.train_images, 5000)
    root = a.data_dir / "coco-shaped"
    args = T.parse_args([f"--data-root={root}", "--profile=coco", f"--per-gpu-batch={a.batch}", "--num-classes=81",
                         f"--backbone={root / 'downloads' / BACKBONE}", f"--result-log={a.data_dir / 'parts.txt'}"])
    run = T.Run(None)
    profile = PROFILES["coco"]
    schedule = profile.schedule_for(a.batch)
    trainer = T.trainer_for(args, run, profile, schedule)
    out = {"per_gpu_batch": a.batch, "steps": a.steps}
    for workers in [int(w) for w in a.workers.split(",")]:
        args.workers = workers
        _, _, sampler, loader, _ = T.data_loaders(args, run, master_seed=1)
        measure(trainer, schedule, loader, sampler, min(a.steps, len(loader)), run.device, out, f"w{workers}_")
    out["date"] = datetime.date.today().isoformat()
    out["device"] = torch.cuda.get_device_name()
    print(json.dumps(out, indent=1))
    save_result(out, a.output)
    return 0


def measure(trainer, schedule, loader, sampler, steps: int, device, out: dict, prefix: str) -> None:
    """The four rates of the docstring into `out` (the cached ones only the first time)."""
    def batches():
        sampler.set_epoch(len(out))  # a fresh order (and fresh workers) for each measurement
        for i, (images, targets) in enumerate(loader):
            if i == steps:
                return
            yield to_device(images, targets, device)

    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in batches():
        torch.cuda.synchronize()
    out[prefix + "loader_img_s"] = rate(steps * loader.batch_sampler.batch_size, started)
    cached = [b for _, b in zip(range(20), batches())]
    out["mask_mb_per_batch"] = round(sum(t["masks"].numel() for t in cached[0][1]) / 2**20, 1)

    def train(feed, label):
        train_step(trainer.model, trainer.optimizer, trainer.scaler, *cached[0], trainer.autocast)
        started, n = time.perf_counter(), 0
        for i, (images, targets) in zip(range(steps), feed):
            set_lr(trainer.optimizer, schedule, i)
            loss, _ = train_step(trainer.model, trainer.optimizer, trainer.scaler, images, targets, trainer.autocast)
            n += len(images)
        out[label] = rate(n, started)
        print(json.dumps({label: out[label]}), flush=True)

    if "cached_img_s" not in out:
        train((cached[i % len(cached)] for i in range(steps)), "cached_img_s")
    train(batches(), prefix + "loader_train_img_s")
    gc.disable()
    train(batches(), prefix + "loader_train_nogc_img_s")
    gc.enable()


if __name__ == "__main__":
    sys.exit(main())
