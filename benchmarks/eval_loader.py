"""The other two parts of an epoch: the data loader on real JPEG files, and evaluation.

    python benchmarks/eval_loader.py --workers 1,2,4,8 --eval-images 256

Loader: shapes JPEGs at COCO size (640 px), decoded, flipped and turned into targets by
object_detection.data, img/s for each worker count. Evaluation: inference img/s with 100
detections per image (score threshold 0, the worst case), masks thresholded on the GPU and
RLE-encoded as the trainer does; then pycocotools scoring time (bbox + segm) for 5000 images.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from object_detection import data as D  # noqa: E402
from object_detection.evaluate import detections_to_coco, evaluate_results  # noqa: E402
from object_detection.model import build_model, use_channels_last  # noqa: E402
from object_detection.synthetic import make_shapes  # noqa: E402


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
def inference_rate(device, images: int, batch: int) -> dict:
    model = build_model(81, backbone_weights=None).to(device)
    model.roi_heads.score_thresh = 0.0  # always 100 detections per image: the slow case
    if device.type == "cuda":
        use_channels_last(model)
    model.eval()
    g = torch.Generator().manual_seed(0)
    batches = [[torch.randint(0, 256, (3, 480, 640), dtype=torch.uint8, generator=g) for _ in range(batch)]
               for _ in range(images // batch)]
    label_to_category = list(range(82))
    dets = 0
    for i, imgs in enumerate(batches):
        if i == 2:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0, n = time.perf_counter(), 0
        imgs = [im.to(device, non_blocking=True).float().div_(255) for im in imgs]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            outputs = model(imgs)
        results = [{"boxes": o["boxes"].float().cpu(), "labels": o["labels"].cpu(), "scores": o["scores"].float().cpu(),
                    "masks": (o["masks"] > 0.5).to(torch.uint8)} for o in outputs]
        coco = detections_to_coco(results, list(range(len(results))), label_to_category)
        if i >= 2:
            n += len(imgs)
            dets += len(coco)
    elapsed = time.perf_counter() - t0
    return {"images": n, "img_per_s": round(n / elapsed, 1), "detections_per_image": round(dets / n, 1)}


def scoring_time(n_images: int = 5000, dets_per_image: int = 100) -> dict:
    """pycocotools bbox + segm on a COCO-sized synthetic ground truth and detection set."""
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
    t0 = time.perf_counter()
    aps = evaluate_results(gt, results)
    return {"images": n_images, "detections": len(results), "seconds": round(time.perf_counter() - t0, 1),
            "ap": {k: round(v, 4) for k, v in aps.items()}}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", default="1,2,4,8")
    p.add_argument("--loader-images", type=int, default=512)
    p.add_argument("--eval-images", type=int, default=256)
    p.add_argument("--skip-scoring", action="store_true")
    p.add_argument("--output", type=Path, default=Path(__file__).resolve().parent / "results" / "eval_loader.json")
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    root = Path("/tmp/bench_shapes640/shapes")
    make_shapes(root, train_images=args.loader_images, val_images=8, image_size=640, seed=0)
    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "cpus": os.cpu_count()}
    result["loader"] = loader_rates(root, [int(w) for w in args.workers.split(",")], batch=16)
    result["inference"] = inference_rate(device, args.eval_images, batch=8)
    print(json.dumps(result["inference"]), flush=True)
    if not args.skip_scoring:
        result["scoring"] = scoring_time()
        print(json.dumps(result["scoring"]), flush=True)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=1))
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], args.output.name).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
