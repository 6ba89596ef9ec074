"""What a full garbage collection costs the trainer's main process with COCO train2017's annotations
loaded, with and without `gc.freeze()` after set-up (fast.Options.freeze_setup).

The trainer turns the automatic collector off while it trains and runs one full collection every
engine.GC_EVERY steps; each walks every container the process holds, and the training set's COCO
index is millions of them (a dict per annotation, a list per box and polygon). The annotations here
are drawn at train2017's counts (117,266 images, 860,001 annotations, polygons of its typical size)
and indexed by pycocotools as the trainer does. A CPU benchmark: no GPU is involved.

    python -m benchmarks.gc_pause [--scale 1.0] [--output FILE]
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import random
import sys
import time
from pathlib import Path

from benchmarks import save_result
from object_detection.data import load_coco

RESULTS = Path(__file__).resolve().parent / "results"
IMAGES, ANNOTATIONS = 117_266, 860_001   # COCO train2017


def coco_sized(folder: Path, scale: float) -> Path:
    """An instances file with train2017's counts times `scale`: 1-2 polygons of 8-40 points each."""
    rng = random.Random(0)
    images = [{"id": i, "file_name": f"{i:012d}.jpg", "width": 640, "height": 480} for i in range(1, int(IMAGES * scale) + 1)]
    anns = []
    for a in range(1, int(ANNOTATIONS * scale) + 1):
        polygons = [[round(rng.uniform(0, 480), 2) for _ in range(2 * rng.randint(8, 40))]
                    for _ in range(rng.choice((1, 1, 1, 2)))]
        anns.append({"id": a, "image_id": rng.randint(1, len(images)), "category_id": 1, "iscrowd": 0,
                     "bbox": [10.0, 20.0, 30.0, 40.0], "area": 1200.0, "segmentation": polygons})
    path = folder / "instances.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": [{"id": 1, "name": "x"}]}))
    return path


def full_collections(times: int = 3) -> list[float]:
    seconds = []
    for _ in range(times):
        started = time.perf_counter()
        gc.collect()
        seconds.append(round(time.perf_counter() - started, 4))
    return seconds


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scale", type=float, default=1.0, help="fraction of train2017's counts")
    p.add_argument("--folder", type=Path, default=Path("/tmp/mlperf-gc-pause"))
    p.add_argument("--output", type=Path, default=RESULTS / f"gc_pause-{datetime.date.today().isoformat()}.json")
    args = p.parse_args(argv)
    args.folder.mkdir(parents=True, exist_ok=True)
    gc.disable()  # as the trainer trains
    coco = load_coco(coco_sized(args.folder, args.scale))
    tracked = len(gc.get_objects())
    before = full_collections()
    gc.freeze()
    after = full_collections()
    gc.unfreeze()
    result = {"benchmark": "gc_pause", "date": datetime.date.today().isoformat(), "scale": args.scale,
              "annotations": len(coco.anns), "tracked_objects": tracked,
              "full_collection_s": before, "after_freeze_s": after}
    print(json.dumps(result))
    save_result(result, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
