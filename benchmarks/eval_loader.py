"""The other two parts of an epoch: the data loader on real JPEG files, and evaluation.

    python -m benchmarks.eval_loader --workers 1,2,4,8 --eval-images 256

Loader: shapes JPEGs at COCO size (640 px), decoded, flipped and turned into targets by
object_detection.data, img/s for each worker count. Evaluation: inference img/s of the MLPerf
model (and of the shapes runs' GroupNorm model) with 100 detections per image (score threshold 0,
the worst case) and at the reference's threshold 0.05, masks thresholded and RLE-encoded on the GPU as the trainer does; then the COCO
scoring time (bbox + segm) for 5000 images, in one process and in worker processes.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from object_detection import data as D
from object_detection.coco_results import CocoResults
from object_detection.engine import images_to_device
from object_detection.evaluate import IOU_TYPES, CocoEvaluator, score_with
from object_detection.fast.scoring import FastEvaluation, default_workers
from benchmarks import save_result
from benchmarks.profile_eval import eval_model
from mlperf.datasets.shapes import make_shapes


def loader_rates(root: Path, workers: list[int], batch: int) -> list[dict]:
    ds = D.CocoDetection(root / "train2017", root / "annotations/instances_train2017.json", train=True)
    out = []
    for w in workers:
        loader = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, num_workers=w,
                                             collate_fn=D.collate, pin_memory=torch.cuda.is_available())
        it = iter(loader)
        next(it)  # workers started
        t0, n = time.perf_counter(), 0
        for images, _ in it:
            n += len(images)
        rate = n / (time.perf_counter() - t0)
        out.append({"workers": w, "img_per_s": round(rate, 1), "img_per_s_per_worker": round(rate / w, 1)})
        print(json.dumps(out[-1]), flush=True)
    return out


@torch.no_grad()
def inference_rate(device, images: int, batch: int, group_norm: bool = False, score_thresh: float = 0.0) -> dict:
    """Images per second through the model and CocoEvaluator.update, as the trainer's evaluate() runs them."""
    model = eval_model(device, group_norm, score_thresh)
    g = torch.Generator().manual_seed(0)
    batches = [[torch.randint(0, 256, (3, 480, 640), dtype=torch.uint8, generator=g) for _ in range(batch)]
               for _ in range(images // batch)]
    evaluator = CocoEvaluator(None, list(range(82)), speed=FastEvaluation())
    for i, imgs in enumerate(batches):
        if i == 2:
            evaluator.gather()
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0, n, dets = time.perf_counter(), 0, len(evaluator.results)
        imgs = images_to_device(imgs, device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            outputs = model(imgs)
        evaluator.update(outputs, list(range(i * batch, (i + 1) * batch)))
        if i >= 2:
            n += len(imgs)
    evaluator.gather()
    elapsed = time.perf_counter() - t0
    return {"batch": batch, "score_thresh": score_thresh, "images": n, "img_per_s": round(n / elapsed, 1),
            "detections_per_image": round((len(evaluator.results) - dets) / n, 1)}


def scoring_time(n_images: int = 5000, dets_per_image: int = 100) -> dict:
    """COCO bbox + segm scoring (fast.scoring.FastEvaluation, faster-coco-eval where installed) of a
    COCO-sized synthetic ground truth and detection set: one process against worker processes."""
    from pycocotools import mask as M
    from pycocotools.coco import COCO

    rng = np.random.default_rng(0)
    images, anns, results = [], [], []
    for i in range(1, n_images + 1):
        images.append({"id": i, "width": 640, "height": 480, "file_name": f"{i}.jpg"})
        for _ in range(7):
            x, y, w, h = rng.uniform(0, 400), rng.uniform(0, 300), rng.uniform(20, 200), rng.uniform(20, 160)
            rle = M.frPyObjects([[x, y, x + w, y, x + w, y + h, x, y + h]], 480, 640)[0]
            rle["counts"] = rle["counts"].decode()
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": int(rng.integers(1, 81)), "bbox": [x, y, w, h],
                         "area": w * h, "iscrowd": 0, "segmentation": rle})
        for _ in range(dets_per_image):
            x, y, w, h = rng.uniform(0, 400), rng.uniform(0, 300), rng.uniform(20, 200), rng.uniform(20, 160)
            rle = M.frPyObjects([[x, y, x + w, y, x + w, y + h, x, y + h]], 480, 640)[0]
            rle["counts"] = rle["counts"].decode()
            results.append({"image_id": i, "category_id": int(rng.integers(1, 81)), "bbox": [x, y, w, h],
                            "score": float(rng.random()), "segmentation": rle})
    gt = COCO()
    gt.dataset = {"images": images, "annotations": anns,
                  "categories": [{"id": c, "name": str(c)} for c in range(1, 81)]}
    gt.createIndex()
    results = CocoResults.from_dicts(results)  # the trainer's evaluator holds columns
    timings, stats = {}, {}
    handler = logging.StreamHandler()  # the workers' seconds (a debug line of ScoringPool.score)
    handler.addFilter(lambda record: record.getMessage().startswith("scored"))
    logger = logging.getLogger("object_detection.fast.scoring")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    # One process, per IoU type and both; then workers: their start (the trainer starts them before
    # the first epoch, FastEvaluation.start), and scoring twice with them running.
    one, pooled = FastEvaluation(workers=1), FastEvaluation()
    steps = [("bbox_1_process", ["bbox"], one), ("segm_1_process", ["segm"], one), ("1_process", IOU_TYPES, one),
             ("workers_start", None, pooled), ("workers", IOU_TYPES, pooled), ("workers_again", IOU_TYPES, pooled)]
    for name, iou_types, evaluation in steps:
        t0 = time.perf_counter()
        if iou_types is None:
            for started in evaluation.start(gt):
                started.result()
        else:
            stats[name] = score_with(evaluation, gt, results, iou_types)
        timings[name] = round(time.perf_counter() - t0, 2)
        print(name, timings[name], "s", flush=True)
    pooled.close()
    assert stats["1_process"] == stats["workers"] == stats["workers_again"]
    return {"images": n_images, "detections": len(results), "seconds": timings,
            "workers": default_workers(),
            "ap": {k: round(v[0], 4) for k, v in stats["1_process"].items()}}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", default="1,2,4,8")
    p.add_argument("--loader-images", type=int, default=512)
    p.add_argument("--eval-images", type=int, default=256)
    p.add_argument("--eval-batches", default="8,16,32", help="images per evaluation batch, one run each")
    p.add_argument("--score-threshes", default="0,0.05",
                   help="detection score thresholds, one run each (0: 100 detections per image, the worst case)")
    p.add_argument("--skip-scoring", action="store_true")
    p.add_argument("--scoring-images", type=int, default=5000)
    p.add_argument("--output", type=Path, default=Path(__file__).resolve().parent / "results" / "eval_loader.json")
    args = p.parse_args()
    longest = max([8] + [int(b) for b in args.eval_batches.split(",")])
    if args.eval_images < 3 * longest:  # two batches warm up, at least one is timed
        p.error(f"--eval-images {args.eval_images} is too few for batches of {longest}: give at least {3 * longest}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    root = Path("/tmp/bench_shapes640/shapes")
    make_shapes(root, train_images=args.loader_images, val_images=8, image_size=640, seed=0)
    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "cpus": os.cpu_count()}
    result["loader"] = loader_rates(root, [int(w) for w in args.workers.split(",")], batch=16)
    result["inference"] = []
    for score_thresh in [float(t) for t in args.score_threshes.split(",")]:  # the COCO (MLPerf) model
        for batch in [int(b) for b in args.eval_batches.split(",")]:
            result["inference"].append(inference_rate(device, args.eval_images, batch, score_thresh=score_thresh))
            print(json.dumps(result["inference"][-1]), flush=True)
    result["inference_groupnorm"] = inference_rate(device, args.eval_images, batch=8, group_norm=True)
    print("GroupNorm model (shapes runs):", json.dumps(result["inference_groupnorm"]), flush=True)
    if not args.skip_scoring:
        result["scoring"] = scoring_time(args.scoring_images)
        print(json.dumps(result["scoring"]), flush=True)
    save_result(result, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
