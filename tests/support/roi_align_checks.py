"""object_detection.fast.roi_align against torchvision's roi_align, run under Triton's interpreter on
the CPU (the kernel runs as written, program by program): `TRITON_INTERPRET=1 python -m
tests.support.roi_align_checks` prints one JSON object of measured differences; tests/test_roi_align.py
runs it (the variable must be set before Triton compiles anything, hence a process of its own).
"""
from __future__ import annotations

import json
import os

import torch
from torchvision.ops import roi_align

from object_detection.fast.roi_align import multiscale_roi_align, usable

SHAPES, SCALES = [(20, 28), (10, 14), (5, 7), (3, 4)], [1 / 4, 1 / 8, 1 / 16, 1 / 32]


def rois_of_every_kind(count: int, images: int, g: torch.Generator) -> torch.Tensor:
    """Boxes inside, straddling and beyond a 80x112 image, and degenerate ones (zero width, a point)."""
    corner = torch.rand(count, 2, generator=g) * torch.tensor([140.0, 100.0]) - 14
    size = torch.rand(count, 2, generator=g) ** 2 * 70
    size[:3] = torch.tensor([[0.0, 0.0], [0.0, 9.0], [0.3, 0.2]])
    return torch.cat([torch.randint(0, images, (count, 1), generator=g).float(), corner, corner + size], 1)


def compare_with_torchvision(maps: list[torch.Tensor], rois: torch.Tensor, levels: torch.Tensor, scales: list[float],
                             output: int, aligned: bool = False, generator: torch.Generator | None = None,
                             channels_last: bool = False) -> dict:
    """The kernel's pooling of `maps` (channels_last, requiring gradients) against torchvision's roi_align
    level by level on the same values in float32 (what autocast gives it), forward and backward for one
    random output gradient: the largest differences, the gradients' scale, and whether the kernel kept
    the maps' dtype and layout. With `channels_last` the kernel writes the pooled RoIs channels_last and
    reads their gradient so (as the mask branch's convolutions give it). Also the GPU check
    (benchmarks/step_checks.py check_roi_align)."""
    pooled = multiscale_roi_align(maps, rois, levels, scales, (output, output), 2, aligned, channels_last)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    grad = torch.randn(pooled.shape, generator=generator).to(pooled.device, pooled.dtype, memory_format=layout)
    ours = torch.autograd.grad(pooled, maps, grad)
    wide = [m.detach().float().contiguous().requires_grad_() for m in maps]
    expected = torch.zeros(pooled.shape, device=pooled.device)
    for level in range(len(maps)):
        chosen = levels == level
        expected[chosen] = roi_align(wide[level], rois[chosen], output, scales[level], 2, aligned)
    theirs = torch.autograd.grad(expected, wide, grad.float())
    return {"forward": (pooled.float() - expected).abs().max().item(),
            "backward": max((a.float() - b).abs().max().item() for a, b in zip(ours, theirs)),
            "backward_rel": max(((a.float() - b).norm() / b.norm()).item() for a, b in zip(ours, theirs)),
            "grad_scale": max(b.abs().max().item() for b in theirs),
            "dtype_kept": pooled.dtype == maps[0].dtype and all(a.dtype == maps[0].dtype for a in ours),
            "layout_asked": pooled.is_contiguous(memory_format=layout),
            "channels_last_grads": all(a.is_contiguous(memory_format=torch.channels_last) for a in ours)}


def against_torchvision(levels_used: int, dtype: torch.dtype, output: int, aligned: bool, count: int = 12,
                        channels_last: bool = False) -> dict:
    g = torch.Generator().manual_seed(levels_used * 100 + output)
    maps = [torch.randn(2, 70, h, w, generator=g).to(dtype).to(memory_format=torch.channels_last).requires_grad_()
            for h, w in SHAPES[:levels_used]]
    assert usable(maps, 2)
    rois = rois_of_every_kind(count, 2, g)
    levels = torch.randint(0, levels_used, (count,), generator=g)
    return compare_with_torchvision(maps, rois, levels, SCALES[:levels_used], output, aligned, g, channels_last)


def in_the_model() -> dict:
    """A model's poolers with fast.roi_align against the same model's per-level poolers: the same
    detections (boxes, scores, masks) from the same weights on channels_last maps."""
    from object_detection.fast import Options
    from object_detection.model import build_model

    torch.manual_seed(0)
    options = Options(channels_last=True, roi_align=True)
    small = {"model": "r18-fpn-slim", "min_size": 96, "max_size": 128}  # 64 channels: the 70-channel cases cross blocks
    fused = build_model(81, backbone_weights=None, proposals_per_image=16, **small,
                        test_candidates=16, detections_per_image=5, speed=options).eval()
    plain = build_model(81, backbone_weights=None, proposals_per_image=16, **small,
                        test_candidates=16, detections_per_image=5,
                        speed=Options(channels_last=True, roi_align=False)).eval()
    plain.load_state_dict(fused.state_dict())
    for model in (fused, plain):
        model.roi_heads.score_thresh = 0.0  # untrained scores: keep every detection
    images = [torch.rand(3, 96, 128, generator=torch.Generator().manual_seed(3)) for _ in range(2)]
    with torch.no_grad():
        a, b = fused(images), plain(images)
    return {"kinds": [type(pool).__name__ for pool in (fused.roi_heads.box_roi_pool, fused.roi_heads.mask_roi_pool)],
            "detections": [len(r["boxes"]) for r in a],
            "boxes": max((x["boxes"] - y["boxes"]).abs().max().item() for x, y in zip(a, b)),
            "scores": max((x["scores"] - y["scores"]).abs().max().item() for x, y in zip(a, b)),
            "masks": max((x["masks"] - y["masks"]).abs().max().item() for x, y in zip(a, b)),
            "same_labels": all(torch.equal(x["labels"], y["labels"]) for x, y in zip(a, b))}


def main() -> None:
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    report = {f"{levels}-{str(dtype)[6:]}-{output}-{'aligned' if aligned else 'legacy'}":
              against_torchvision(levels, dtype, output, aligned)
              for levels, dtype, output, aligned in [(4, torch.float32, 7, False), (4, torch.float32, 14, False),
                                                     (3, torch.float32, 7, True), (1, torch.float32, 7, False),
                                                     (4, torch.bfloat16, 7, False)]}
    report["4-float32-14-legacy-channels_last"] = against_torchvision(4, torch.float32, 14, False, channels_last=True)
    empty = multiscale_roi_align([torch.zeros(1, 8, 4, 4).to(memory_format=torch.channels_last)],
                                 torch.zeros(0, 5), torch.zeros(0, dtype=torch.int64), [1.0], (7, 7), 2)
    report["empty_shape"] = list(empty.shape)
    report["model"] = in_the_model()
    print(json.dumps(report))


if __name__ == "__main__":
    main()
