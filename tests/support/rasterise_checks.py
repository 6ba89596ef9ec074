"""object_detection.fast.rasterise's kernel against mask_targets' tensor operations (which
tests/test_mask_targets.py checks against pycocotools), run under Triton's interpreter on the CPU:
`TRITON_INTERPRET=1 python -m tests.support.rasterise_checks` prints one JSON object, case -> the
number of RoIs whose targets differ (benchmarks.mask_targets.kernel_differences: 0 is bit for bit)
or a failure's text; tests/test_mask_targets.py runs it in a process of its own (the variable must
be set before Triton compiles anything). On a GPU `python -m benchmarks.mask_targets` counts the
same at COCO's sizes.

The interpreter runs every program's loops in Python, so the polygons are short (3-8 points): the
kernel's loops do not depend on the edge count beyond their trip count.
"""
from __future__ import annotations

import json

import torch

from object_detection import mask_targets as MT
from benchmarks.mask_targets import kernel_differences
from object_detection.fast.rasterise import usable
from tests.support.polygons import H, W, random_instances


def differing(images) -> int:
    """RoIs of a batch, given per image as (cases, RoI order, image size), whose targets differ."""
    targets, rois, matched, shapes = [], [], [], []
    for cases, order, shape in images:
        edges, owner = MT.polygon_edges([polygons for polygons, _ in cases])
        targets.append({"polygon_edges": edges, "polygon_owner": owner,
                        "polygons": max(len(polygons) for polygons, _ in cases)})
        rois.append(torch.tensor([box for _, box in cases], dtype=torch.float32)[order])
        matched.append(order)
        shapes.append(shape)
    return kernel_differences(targets, rois, matched, shapes)[0]


def main() -> None:
    one = random_instances(12, seed=21, most_points=8)
    sizes = [(H, W), (800, 1067), (100, 90)]
    batch = [(random_instances(5 + 2 * k, seed=30 + k, most_points=6), None, size) for k, size in enumerate(sizes)]
    batch = [(cases, torch.arange(len(cases)).flip(0) if k == 1 else torch.arange(len(cases)), size)
             for k, (cases, _, size) in enumerate(batch)]
    report = {"usable": usable(torch.zeros(1, 1, 4), MT.GRID)}
    for name, images in {"one image": [(one, torch.arange(len(one)), (H, W))],
                         "three images, one matched backwards": batch,
                         "an image without RoIs": [*batch[:1], (batch[2][0], torch.arange(0), batch[2][2])]}.items():
        try:
            report[name] = differing(images)
        except Exception as error:  # noqa: BLE001 - the report says what failed, the test shows it
            report[name] = f"{type(error).__name__}: {error}"
    print(json.dumps(report))


if __name__ == "__main__":
    main()
