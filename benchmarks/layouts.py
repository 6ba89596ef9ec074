"""Elementwise operators whose 4-d operands are laid out differently (one channels_last, one not, or
a strided view) or are of different dtypes: PyTorch then runs its unvectorised kernel, several times
slower than the vectorised one on the same bytes. Operands broadcast to the output's shape (a bias, a
per-channel scale) are left out. `mixed_layouts(fn)` runs fn once under a dispatch
mode that sees every operator, the backward's gradient sums included, and counts those calls by
operator, shape and operands (profile_step --layouts prints them for a training step).
"""
from __future__ import annotations

import collections

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ELEMENTWISE_OPS = {"add", "add_", "sub", "mul", "mul_", "copy_", "threshold_backward", "where", "div", "clamp_min",
                   "_to_copy", "sum"}
CASTS = {"copy_", "_to_copy"}


def layout(t: torch.Tensor) -> str:
    """nchw or nhwc for a dense tensor in that order (nchw where both hold), else its strides."""
    if t.is_contiguous():
        return "nchw"
    if t.is_contiguous(memory_format=torch.channels_last):
        return "nhwc"
    return f"strided{tuple(t.stride())}"


class MixedLayouts(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls: collections.Counter = collections.Counter()
        self.bytes: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name in ELEMENTWISE_OPS:
            maps = [a for a in (*args, *(kwargs or {}).values(), *(out if isinstance(out, tuple) else (out,)))
                    if isinstance(a, torch.Tensor) and a.dim() == 4 and a.numel() > 1]
            maps = [t for t in maps if t.shape == maps[-1].shape]  # broadcast operands (biases, scales) aside
            kinds = [f"{layout(t)}:{str(t.dtype).split('.')[1]}" for t in maps]
            compared = [layout(t) for t in maps] if name in CASTS else kinds  # a cast's dtypes differ by design
            if len(set(compared)) > 1 or any(k.startswith("strided") for k in kinds):
                key = (name, tuple(maps[0].shape), " ".join(kinds))
                self.calls[key] += 1
                self.bytes[key] += sum(t.numel() * t.element_size() for t in maps)
        return out


def mixed_layouts(fn) -> list[tuple[str, tuple, str, int, int]]:
    """fn() under MixedLayouts: (operator, first map's shape, operands' layouts and dtypes, calls, bytes),
    most bytes first."""
    mode = MixedLayouts()
    with mode:
        fn()
    return sorted(((*key, mode.calls[key], mode.bytes[key]) for key in mode.calls), key=lambda row: -row[4])


def print_mixed_layouts(step) -> None:
    """mixed_layouts(step)'s 40 heaviest rows (none: every operand of the step agrees)."""
    rows = mixed_layouts(step)
    print(f"elementwise operators of one step on operands of mixed layouts or dtypes: {len(rows) or 'none'}")
    for name, shape, operands, calls, touched in rows[:40]:
        print(f"  {name:<20} {str(shape):<24} {calls:4d} calls {touched / 2**20:9.1f} MiB  {operands}")
