"""How many operators the host issues in a training step, by stage and by code site, and how many
of them each extra image adds: on a step bound by the host's launches (BENCHMARKS.md, stage 3) the
operator count is what to cut. Views launch nothing and are left out (benchmarks.op_count).

Counts one forward and backward of the closed profile's model (the reference recipe with its polygon
mask targets, the speed code as the trainer runs it) at two batch sizes with a dispatch-mode counter; the difference over the
images is the per-image share, listed by the innermost object_detection or torchvision frame. The
counts do not depend on the device, except NMS: on a CPU fast.nms runs torchvision's NMS group by
group, on a GPU one batched fixed point, so its frames are counted apart (`nms`); and the CPU's
convolution backward accumulates weight gradients sample by sample (`add_`: backward's per-image
share here, none on a GPU). Small images keep it quick; sizes change no count.

    python -m benchmarks.host_ops [--batches 2,4] [--sites 25] [--output FILE]
"""
from __future__ import annotations

import argparse
import collections
import datetime
import json
import sys
import traceback
from pathlib import Path

import torch
from benchmarks import random_msra_backbone, save_result
from benchmarks.op_count import CountOps
from mlperf import PROJECT_ROOT
from benchmarks.train_throughput import synthetic_batch, with_polygons
from object_detection import fast
from object_detection.model import build_model
from object_detection.recipe import RECIPES

RESULTS = Path(__file__).resolve().parent / "results"
STAGES = ("transform", "backbone", "rpn", "roi_heads")


class OperatorCounter(CountOps):
    """The counted operators by stage and by code site (innermost object_detection/torchvision frame)."""

    def __init__(self):
        super().__init__()
        self.stage = "other"
        self.by_stage: collections.Counter = collections.Counter()
        self.by_site: collections.Counter = collections.Counter()
        self.by_file: collections.Counter = collections.Counter()   # (stage, file): where a stage's operators come from

    def record(self, func) -> None:
        frames = [f for f in traceback.extract_stack()[:-2]
                  if "object_detection" in f.filename or "torchvision" in f.filename]
        nms = any("fast/nms.py" in f.filename for f in frames)
        self.by_stage["nms" if nms else self.stage] += 1
        if frames and not nms:
            site = frames[-1]
            where = site.filename.removeprefix(f"{PROJECT_ROOT}/").split("site-packages/")[-1]
            self.by_site[f"{where}:{site.lineno} {site.name}"] += 1
            self.by_file[f"{self.stage} {where}"] += 1


def count_step(model, batch: int, seed: int = 1) -> OperatorCounter:
    """The second of two steps on one batch: what the model keeps after its first step (anchors,
    the frozen norms' constants, RoIAlign's scales) is not made again in a run's later steps."""
    images, targets = synthetic_batch(batch, "cpu", seed=seed)
    images, targets = [image.float() / 255 for image in images], with_polygons(targets)
    sum(model(images, targets).values()).backward()
    counter = OperatorCounter()
    originals = {}
    for name in STAGES:
        module = getattr(model, name)
        originals[name] = module.forward

        def staged(*args, _name=name, _forward=module.forward, **kwargs):
            outer, counter.stage = counter.stage, _name
            try:
                return _forward(*args, **kwargs)
            finally:
                counter.stage = outer
        module.forward = staged
    try:
        with counter:
            losses = model(images, targets)
            counter.stage = "backward"
            sum(losses.values()).backward()
    finally:
        for name, forward in originals.items():
            getattr(model, name).forward = forward
    return counter


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", default="2,4", help="two batch sizes, the second larger")
    p.add_argument("--sites", type=int, default=25, help="how many per-image code sites to list")
    p.add_argument("--output", type=Path, default=RESULTS / f"host_ops-{datetime.date.today().isoformat()}.json")
    args = p.parse_args(argv)
    small, large = (int(b) for b in args.batches.split(","))
    torch.manual_seed(0)
    model = build_model(81, backbone_weights=random_msra_backbone(), min_size=320, max_size=512,
                        speed=fast.Options.for_device("cpu"), recipe=RECIPES["reference"]).train()
    counts = {n: count_step(model, n) for n in (small, large)}
    images = large - small
    stages = sorted(set(counts[small].by_stage) | set(counts[large].by_stage))
    per_site = {site: (counts[large].by_site[site] - counts[small].by_site[site]) / images
                for site in counts[large].by_site}
    result = {
        "benchmark": "host_ops", "date": datetime.date.today().isoformat(), "torch": torch.__version__,
        "command": "python -m benchmarks.host_ops " + " ".join(sys.argv[1:] if argv is None else argv),
        "per_stage": {s: {"batch_" + str(small): counts[small].by_stage[s], "batch_" + str(large): counts[large].by_stage[s],
                          "per_image": (counts[large].by_stage[s] - counts[small].by_stage[s]) / images} for s in stages},
        "fixed_outside_nms": sum(counts[small].by_stage[s] for s in stages if s != "nms")
        - small * sum((counts[large].by_stage[s] - counts[small].by_stage[s]) / images for s in stages if s != "nms"),
        f"heads_by_file_at_{large}": {k: n for k, n in counts[large].by_file.most_common()
                                      if k.split()[0] in ("rpn", "roi_heads")},
        "per_image_sites": dict(sorted(((k, v) for k, v in per_site.items() if v > 0), key=lambda kv: -kv[1])[:args.sites]),
    }
    for stage, row in result["per_stage"].items():
        print(f"{stage:<10} {row['batch_' + str(small)]:6d} at {small}, {row['batch_' + str(large)]:6d} at {large}: "
              f"{row['per_image']:6.1f} per image")
    print(f"fixed per step outside NMS: {result['fixed_outside_nms']:.0f}; per image, by site:")
    for site, n in result["per_image_sites"].items():
        print(f"  {n:6.1f}  {site}")
    print(f"the heads' operators at {large} images (RPN and RoI heads, outside NMS), by file:")
    for where, n in result[f"heads_by_file_at_{large}"].items():
        print(f"  {n:6d}  {where}")
    save_result(result, args.output)
    print(json.dumps({k: result[k] for k in ("benchmark", "date", "fixed_outside_nms")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
