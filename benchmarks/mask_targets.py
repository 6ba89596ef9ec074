"""What the mask branch's targets cost a training step: the reference's polygons rasterised for the whole
batch at once (object_detection.mask_targets, what the closed profile runs), the same in one Triton
kernel (fast.rasterise, `--speed fast-with:mask_targets_kernel`; the RoIs whose targets differ from the
tensor operations' are counted: 0 is bit for bit), the same drawn image by image (the first version,
which cost the epoch 15-18% on an H100), and torchvision's RoIAlign of
full-image masks (the open profiles, and the closed profile before), on one batch of COCO's shape:
12 images of 800x1088, 7 instances each (COCO's mean), 1-2 polygons of 12-40 points, 40 positive RoIs
an image around them. Times are per step, synchronised, the median of `--repeat`.

    python -m benchmarks.mask_targets [--device cuda] [--repeat 20] [--output FILE]
"""
from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torchvision.models.detection.roi_heads import project_masks_on_boxes

from benchmarks import save_result
from object_detection import mask_targets as MT
from object_detection.fast.rasterise import crop_and_rasterise, usable

RESULTS = Path(__file__).resolve().parent / "results"
IMAGES, INSTANCES, ROIS, HEIGHT, WIDTH = 12, 7, 40, 800, 1088


def batch(device: torch.device, seed: int = 0):
    """Targets (polygon edges and full masks of the same shapes), RoIs and their matches per image."""
    from pycocotools import mask as mask_utils

    rng = np.random.default_rng(seed)
    targets, rois, matched = [], [], []
    for _ in range(IMAGES):
        polygons, boxes = [], []
        for _ in range(INSTANCES):
            cx, cy, r = rng.uniform(100, WIDTH - 100), rng.uniform(100, HEIGHT - 100), rng.uniform(10, 90)
            parts = []
            for _ in range(rng.integers(1, 3)):
                k = rng.integers(12, 41)
                angles = np.sort(rng.uniform(0, 2 * np.pi, k))
                radii = r * rng.uniform(0.5, 1.0, k)
                parts.append(np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], 1).ravel().tolist())
            polygons.append(parts)
            boxes.append([cx - r, cy - r, cx + r, cy + r])
        edges, owner = MT.polygon_edges(polygons)
        masks = np.stack([mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(p, HEIGHT, WIDTH)))
                          for p in polygons])
        which = torch.from_numpy(rng.integers(0, INSTANCES, ROIS))
        jitter = torch.from_numpy(rng.uniform(-8, 8, (ROIS, 4))).float()
        rois.append((torch.tensor(boxes)[which] + jitter).to(device))
        matched.append(which.to(device))
        targets.append({"polygon_edges": edges.to(device), "polygon_owner": owner.to(device),
                        "polygons": max(len(p) for p in polygons), "masks": torch.from_numpy(masks).to(device)})
    return targets, rois, matched


def timed(fn, device: torch.device, repeat: int) -> float:
    """Median milliseconds of fn() over `repeat` synchronised calls, after two warm-up calls."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeat):
        sync()
        started = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - started) * 1000)
    return round(statistics.median(times), 3)


def kernel_differences(targets, rois, matched, shapes) -> tuple[int, int]:
    """(RoIs whose targets fast.rasterise's kernel draws differently from the tensor operations', RoIs):
    0 is bit for bit; -1 where the two do not even give the same shape. The GPU's check here and the
    interpreter's in the tests (tests/support/rasterise_checks.py)."""
    ours = torch.cat(MT.polygon_targets(targets, rois, matched, shapes, draw=crop_and_rasterise))
    theirs = torch.cat(MT.polygon_targets(targets, rois, matched, shapes))
    differing = int((ours != theirs).flatten(1).any(1).sum()) if ours.shape == theirs.shape else -1
    return differing, len(theirs)


def one_kernel(targets, rois, matched, shapes, device: torch.device, repeat: int) -> dict:
    """The kernel's time and how many RoIs' targets differ from the tensor operations' (where it runs)."""
    if not usable(targets[0]["polygon_edges"], MT.GRID):
        return {"polygons_one_kernel": "not run (needs Triton on a GPU)"}
    differing, count = kernel_differences(targets, rois, matched, shapes)
    return {"polygons_one_kernel_ms": timed(lambda: MT.polygon_targets(targets, rois, matched, shapes,
                                                                       draw=crop_and_rasterise), device, repeat),
            "polygons_one_kernel_differing_rois": differing, "rois": count}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--output", type=Path, default=RESULTS / f"mask_targets-{datetime.date.today().isoformat()}.json")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    targets, rois, matched = batch(device)
    shapes = [(HEIGHT, WIDTH)] * IMAGES
    result = {
        "benchmark": "mask_targets", "date": datetime.date.today().isoformat(), "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "", "images": IMAGES,
        "rois_per_image": ROIS,
        "polygons_batch_ms": timed(lambda: MT.polygon_targets(targets, rois, matched, shapes), device, args.repeat),
        **one_kernel(targets, rois, matched, shapes, device, args.repeat),
        "polygons_per_image_ms": timed(lambda: [MT.polygon_targets([t], [r], [m], [s])
                                               for t, r, m, s in zip(targets, rois, matched, shapes)],
                                       device, args.repeat),
        "roi_align_full_masks_ms": timed(lambda: [project_masks_on_boxes(t["masks"], r, m, MT.GRID)
                                                  for t, r, m in zip(targets, rois, matched)], device, args.repeat),
    }
    print(json.dumps(result))
    save_result(result, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
