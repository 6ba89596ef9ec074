"""fast.bias_act's Triton kernel against the same sums in tensor operations, run under Triton's
interpreter on the CPU: `TRITON_INTERPRET=1 python -m tests.support.bias_act_checks` prints one JSON
object, case -> the largest difference as a share of the largest value (tests/test_downsample_with_conv1.py runs it; the variable must
be set before Triton compiles anything, hence a process of its own). The cases: dense NCHW and NHWC
maps, and the channel slices of one wider NHWC map that fast.fuse_bias's SharedInputBottleneck hands
it (conv1's part as the input, the downsample's part as the residual). The interpreter rounds float32
to bfloat16 toward zero where a GPU rounds to nearest: bfloat16 cases differ by up to one unit in the
last place.
"""
from __future__ import annotations

import json

import torch

from object_detection.fast.bias_act import _BiasAct, _layout


def separately(x, bias, residual, relu):
    out = x.float() + bias.float().reshape(1, -1, 1, 1) + (0 if residual is None else residual.float())
    return (out.clamp_min(0) if relu else out).to(x.dtype)


def difference(x, bias, residual, relu) -> float:
    got = _BiasAct.apply(x, bias, residual, relu)
    layout = torch.channels_last if _layout(x)[0] == 1 else torch.contiguous_format
    if not got.is_contiguous(memory_format=layout):
        return float("inf")
    expected = separately(x, bias, residual, relu).float()
    return ((got.float() - expected).abs().max() / expected.abs().max()).item()


def main() -> None:
    g = torch.Generator().manual_seed(0)
    report = {}
    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype).split(".")[1]
        bias = torch.randn(6, generator=g)
        for layout in (torch.contiguous_format, torch.channels_last):
            x, residual = (torch.randn(2, 6, 5, 7, generator=g).to(dtype).contiguous(memory_format=layout)
                           for _ in range(2))
            for relu in (True, False):
                report[f"dense-{layout}-{name}-relu{relu}"] = difference(x, bias, residual, relu)
        wide = torch.randn(2, 6 + 10, 5, 7, generator=g).to(dtype).contiguous(memory_format=torch.channels_last)
        first, second = torch.split(wide, [6, 10], dim=1)
        report[f"slice-{name}"] = difference(first, bias, None, True)
        dense = torch.randn(2, 10, 5, 7, generator=g).to(dtype).contiguous(memory_format=torch.channels_last)
        report[f"slice-residual-{name}"] = difference(dense, torch.randn(10, generator=g), second, True)
        report[f"slice-both-{name}"] = difference(second, torch.randn(10, generator=g),
                                                  torch.split(wide, [0, 6, 10], dim=1)[2], False)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
