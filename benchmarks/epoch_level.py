"""Epoch-level speed at COCO's image shapes, through the steps a user runs.

`invoke fetch`, `verify` and `train` on a synthetic set drawn with COCO 2017's image shapes and 80
category ids (mlperf/datasets/shapes.py, layout "coco": JPEGs on disk, 1-20 instances each), with
MLPerf's recipe (`profile: coco`: the frozen ImageNet backbone's path, 1000 proposals per image,
800/1333 resize). So the real loader, the grouped sampler, warm-up, logging and evaluation at the
5000 validation images are in the figure, which the step benchmark (train_throughput) leaves out.
The backbone is random weights in Detectron's R-50.pkl layout (the closed profile's reference recipe
reads that file) with BatchNorm statistics measured on the set's own images (benchmarks.random_backbone:
with torchvision's initial statistics the bf16 run diverges within 20 steps, with statistics of random
pixels within 100; BENCHMARKS.md): speed does not depend on their values, but a run that diverges
stops.

    python -m benchmarks.epoch_level [--train-images 6000] [--val-images 5000] [--epochs 2]
        [--batch 12] [--speed fast] [--data-dir /tmp/mlperf-epoch-level] [--output FILE]

Reports, per epoch, images per second between epoch_start and epoch_stop of the MLPerf log, and the
evaluation's seconds: exposed (eval_start to eval_stop: training waits for all of it), of which
inference and scoring (the trainer's console line).
"""
from __future__ import annotations

import argparse
import datetime
import json
import re
import subprocess
import sys
from pathlib import Path

from benchmarks import random_msra_backbone, save_result
from mlperf import PROJECT_ROOT
from mlperf.results.logs import records

RESULTS = Path(__file__).resolve().parent / "results"
BACKBONE = "R-50-random-calibrated-on-set.pkl"
MANIFEST = """\
name: coco-shaped
description: synthetic shapes at COCO 2017's image shapes and category ids, for speed measurements
generator: shapes
generator_options: {{train_images: {train}, val_images: {val}, image_size: 640, seed: 0, layout: coco}}
categories: 80
profile: coco
backbone: {backbone}
splits:
  train: {{images: train2017, annotations: annotations/instances_train2017.json, count: {train}}}
  val: {{images: val2017, annotations: annotations/instances_val2017.json, count: {val}}}
files: []
"""


def invoke(*args: str, capture: bool = False) -> str:
    """`python -m invoke ...` from the project root; its output is shown, and returned if `capture`."""
    proc = subprocess.run([sys.executable, "-m", "invoke", *args], cwd=PROJECT_ROOT, text=True,
                          stdout=subprocess.PIPE if capture else None, stderr=subprocess.STDOUT if capture else None)
    if capture:
        sys.stdout.write(proc.stdout[-6000:])
    if proc.returncode != 0:
        raise SystemExit(f"invoke {args[0]} exited {proc.returncode}")
    return proc.stdout if capture else ""


def prepare(data_dir: Path, train: int, val: int) -> Path:
    """The manifest, the drawn set (fetch makes it once) and the backbone file; returns the manifest."""
    data_dir.mkdir(parents=True, exist_ok=True)
    manifest = data_dir / f"coco-shaped-{train}-{val}.yaml"
    manifest.write_text(MANIFEST.format(train=train, val=val, backbone=BACKBONE))
    invoke("fetch", "--manifest", str(manifest), "--data-dir", str(data_dir))
    weights = data_dir / "coco-shaped" / "downloads" / BACKBONE
    weights.parent.mkdir(parents=True, exist_ok=True)
    random_msra_backbone(weights, images=data_dir / "coco-shaped" / "train2017")
    invoke("verify", "--manifest", str(manifest), "--data-dir", str(data_dir))
    return manifest


def summarise(log: Path, console: str, train: int) -> dict:
    """Per-epoch img/s and evaluation seconds from the MLPerf log and the trainer's console."""
    recs = [rec for _, rec in records(log.read_text())]
    at = {}
    for r in recs:
        epoch = (r.get("metadata") or {}).get("epoch_num")
        at[(r["key"], epoch)] = r["time_ms"]
    first = {r["key"]: r["time_ms"] for r in reversed(recs)}
    first["submission_platform_value"] = next((r["value"] for r in recs if r["key"] == "submission_platform"), "")
    splits = [tuple(map(float, m)) for m in re.findall(r"evaluation: .* in ([\d.]+) s \(inference ([\d.]+) s, "
                                                       r"scoring ([\d.]+) s\)", console)]
    epochs = []
    for n in range(1, 1 + sum(1 for r in recs if r["key"] == "epoch_stop")):
        seconds = (at[("epoch_stop", n)] - at[("epoch_start", n)]) / 1000
        row = {"epoch": n, "train_s": round(seconds, 2), "img_s": round(train / seconds, 1),
               "eval_exposed_s": round((at[("eval_stop", n)] - at[("eval_start", n)]) / 1000, 2)}
        if n <= len(splits):
            row.update(eval_inference_s=splits[n - 1][1], eval_scoring_s=splits[n - 1][2])
        epochs.append(row)
    return {"platform": first.get("submission_platform_value", ""),
            "init_s": round((first["init_stop"] - first["init_start"]) / 1000, 1), "epochs": epochs}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train-images", type=int, default=6000)
    p.add_argument("--val-images", type=int, default=5000)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch", type=int, default=12, help="images per GPU (one GPU)")
    p.add_argument("--device", default="cuda", help="cpu: a check of this script on a machine without GPU")
    p.add_argument("--speed", default="fast", help="the trainer's --speed, e.g. fast-without:prefetch to measure a lever")
    p.add_argument("--data-dir", type=Path, default=Path("/tmp/mlperf-epoch-level"))
    p.add_argument("--output", type=Path,
                   default=RESULTS / f"epoch_level-{datetime.date.today().isoformat()}.json")
    args = p.parse_args(argv)
    manifest = prepare(args.data_dir, args.train_images, args.val_images)
    log = args.data_dir / "result_0.txt"
    log.unlink(missing_ok=True)
    where = ["--config", "1xgpu-16"] if args.device == "cuda" else ["--device", "cpu"]
    console = invoke("train", "--manifest", str(manifest), "--data-dir", str(args.data_dir), "--gpus", "1", *where,
                     "--batch-size", str(args.batch), "--max-epochs", str(args.epochs), "--seed", "1",
                     "--log", str(log), "--speed", args.speed, capture=True)
    result = {"benchmark": "epoch_level", "date": datetime.date.today().isoformat(), "per_gpu_batch": args.batch,
              "speed": args.speed,
              "train_images": args.train_images, "val_images": args.val_images,
              **summarise(log, console, args.train_images)}
    print(json.dumps(result, indent=1))
    save_result(result, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
