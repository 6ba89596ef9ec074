"""object_detection.fast.nms.scan_nms against torchvision's NMS, run under Triton's interpreter on the
CPU (the walk runs as written, program by program): `TRITON_INTERPRET=1 python -m
tests.support.nms_scan_checks` prints one JSON object, case -> whether every group kept what
torchvision keeps; tests/test_sync_free.py runs it (the variable must be set before Triton compiles
anything, hence a process of its own). On the GPU `python -m benchmarks.train_throughput --check`
checks it again at the RPN's sizes (check_nms).
"""
from __future__ import annotations

import json

import torch
from torchvision.ops import nms

from object_detection.fast import nms as fast_nms
from tests.support.boxes import crowded_boxes


def agrees_with_torchvision(seed: int, groups: int, k: int, threshold: float, valid_fraction: float) -> bool:
    g = torch.Generator().manual_seed(seed)
    boxes = torch.stack([crowded_boxes(k, g) for _ in range(groups)])
    scores = torch.rand(groups, k, generator=g)
    order = scores.argsort(dim=1, descending=True)
    boxes = boxes.gather(1, order[..., None].expand(-1, -1, 4))       # best first, as the heads hand them
    scores = scores.gather(1, order)
    valid = torch.rand(groups, k, generator=g) < valid_fraction
    keep = fast_nms.scan_nms(boxes, valid, threshold)
    if keep.shape != valid.shape or keep.dtype != torch.bool:
        return False
    for i in range(groups):
        idx = valid[i].nonzero()[:, 0]
        expected = torch.zeros(k, dtype=torch.bool)
        expected[idx[nms(boxes[i, idx], scores[i, idx], threshold)]] = True
        if not torch.equal(keep[i], expected):
            return False
    return True


def main() -> None:
    report = {
        # 300 boxes padded to 384: rows of 12 words in a block of 16, bit 31 of words in use
        "crowded-0.7": agrees_with_torchvision(0, 3, 300, 0.7, 0.8),
        "crowded-0.5": agrees_with_torchvision(1, 3, 300, 0.5, 0.8),
        "crowded-0.3-two-chunks": None,
        "one-box": agrees_with_torchvision(3, 2, 1, 0.5, 1.0),
        "none-valid": agrees_with_torchvision(4, 2, 40, 0.5, 0.0),
        "empty": fast_nms.scan_nms(torch.zeros(2, 0, 4), torch.zeros(2, 0, dtype=torch.bool), 0.5).shape == (2, 0),
    }
    chunk = fast_nms.NMS_CHUNK_ENTRIES
    fast_nms.NMS_CHUNK_ENTRIES = 2 * 256 * 256  # two groups a chunk: three chunks for five groups
    try:
        report["crowded-0.3-two-chunks"] = agrees_with_torchvision(2, 5, 200, 0.3, 0.9)
    finally:
        fast_nms.NMS_CHUNK_ENTRIES = chunk
    print(json.dumps(report))


if __name__ == "__main__":
    main()
