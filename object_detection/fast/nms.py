"""Greedy NMS for many groups of boxes at once, exact, on the GPU.

torchvision's `batched_nms` runs group by group (and above 5000 boxes one NMS per level or class),
each making the host wait for the GPU; here every (image, level) or (image, class) group is
suppressed in one set of kernels. Two ways, the same answer: `scan_nms` walks each group's boxes in
order in one Triton program per group and never makes the host wait (what a step needs to keep the
host ahead of the GPU); `fixed_point_nms` iterates a fixed point with one wait per block of passes
(where Triton is missing). `tests/test_sync_free.py` checks both against `torchvision.ops.nms`.
"""
from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torchvision.ops import boxes as box_ops

NMS_CHUNK_ENTRIES = 1 << 29  # pairwise entries per chunk: 64 MiB of bits; a batch-16 step is 320M
NMS_WIDTH_STEP = 128


def _pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """[..., K] bool -> [..., ceil(K / 8)] uint8, bit b of byte q holding entry 8q + b."""
    pad = (-mask.shape[-1]) % 8
    if pad:
        mask = F.pad(mask, (0, pad))
    shifts = torch.arange(8, device=mask.device, dtype=torch.uint8)
    return (mask.view(*mask.shape[:-1], -1, 8).to(torch.uint8) << shifts).sum(-1, dtype=torch.uint8)


def _suppresses(boxes: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """[G, K, K/8] bits: bit j of row (g, i) says box j, ranked before box i, overlaps it above the
    threshold. IoU in fp32 with torchvision's CUDA formula (no +1, inter / (a + b - inter)).
    Packed, each pass of the fixed point reads 40 MB instead of 320 MB at batch 16."""
    x1, y1, x2, y2 = boxes.float().unbind(-1)
    area = (x2 - x1) * (y2 - y1)
    width = (torch.minimum(x2[:, :, None], x2[:, None, :]) - torch.maximum(x1[:, :, None], x1[:, None, :])).clamp(min=0)
    height = (torch.minimum(y2[:, :, None], y2[:, None, :]) - torch.maximum(y1[:, :, None], y1[:, None, :])).clamp(min=0)
    inter = width * height
    iou = inter / (area[:, :, None] + area[:, None, :] - inter)
    k = boxes.shape[1]
    earlier = torch.ones(k, k, dtype=torch.bool, device=boxes.device).tril(-1)
    return _pack_bits((iou > iou_threshold) & earlier)


def _relax(suppresses: torch.Tensor, valid: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """One pass of: a box is kept iff it is valid and no kept box ranked before it suppresses it."""
    hit = (suppresses & _pack_bits(keep)[:, None, :]).ne(0).any(dim=-1)
    return valid & ~hit


_compiled: dict = {}


def _kernels(device: torch.device):
    """The two dense steps, fused by torch.compile on CUDA (the [G, K, K] intermediates would
    otherwise each be written to memory); plain eager functions elsewhere. Compiling happens at the
    first call, so a missing toolchain shows there: the step then falls back to eager, once."""
    if device.type != "cuda":
        return _suppresses, _relax
    if "cuda" not in _compiled:
        # Widths are rounded up (fixed_point_nms) and the group count is marked dynamic, so a run
        # compiles for a few widths (training 2000 -> 2048, evaluation 1024) and any count.
        _compiled["cuda"] = (_eager_if_compiling_fails(torch.compile(_suppresses), _suppresses),
                             _eager_if_compiling_fails(torch.compile(_relax), _relax))
    return _compiled["cuda"]


def _eager_if_compiling_fails(compiled, eager):
    current = [compiled]

    def call(*args):
        try:
            return current[0](*args)
        except Exception as exc:
            if current[0] is eager:
                raise
            print(f"warning: torch.compile of {eager.__name__} failed ({type(exc).__name__}: {exc}); "
                  "running it eagerly: same result, slower NMS", file=sys.stderr)
            current[0] = eager
            return eager(*args)
    return call


def greedy_nms(boxes: torch.Tensor, valid: torch.Tensor, iou_threshold: float, scan: bool = False) -> torch.Tensor:
    """Greedy NMS in each of G groups; boxes [G, K, 4] already sorted by score within a group.

    Returns keep [G, K]: exactly what torchvision.ops.nms keeps of each group's valid boxes (invalid
    ones neither survive nor suppress). On a GPU all groups at once (`scan_nms` where `scan` and
    Triton allow, else `fixed_point_nms`); on a CPU, where waiting costs nothing, torchvision's NMS
    group by group, which does far less arithmetic.
    """
    if boxes.device.type == "cuda":
        if scan and _scan_kernel() is not None:
            return scan_nms(boxes, valid, iou_threshold)
        return fixed_point_nms(boxes, valid, iou_threshold)
    keep = torch.zeros_like(valid)
    rank = torch.arange(boxes.shape[1], 0, -1, dtype=torch.float32)  # the given order as scores
    for group, (b, v) in enumerate(zip(boxes, valid)):
        candidates = v.nonzero()[:, 0]
        if len(candidates):
            keep[group, candidates[box_ops.nms(b[candidates].float(), rank[candidates], iou_threshold)]] = True
    return keep


def fixed_point_nms(boxes: torch.Tensor, valid: torch.Tensor, iou_threshold: float,
                    passes_per_check: int = 4) -> torch.Tensor:
    """greedy_nms for all groups at once, with one wait for the host per block of passes.

    Greedy NMS is the unique solution of "kept iff valid and not suppressed by a kept box ranked
    before": the suppression relation is strictly triangular, so the solution is fixed rank by
    rank. Iterating that equation from "all valid kept" makes the first t ranks right after t
    passes and stops changing exactly at the solution, usually after a few passes. Passes run in
    blocks; the only wait for the host is the check after each block.
    """
    suppress_fn, relax_fn = _kernels(boxes.device)
    width = boxes.shape[1]
    if width == 0:
        return valid.clone()
    # Widths rounded up to NMS_WIDTH_STEP, so that the compiled kernels see a few widths, not one per
    # batch (evaluation's width is the most proposals any image of the batch kept). Padding boxes
    # are invalid: they neither survive nor suppress.
    padded = -(-width // NMS_WIDTH_STEP) * NMS_WIDTH_STEP
    if padded != width:
        boxes = F.pad(boxes, (0, 0, 0, padded - width))
        valid = F.pad(valid, (0, padded - width))
    per_chunk = max(1, NMS_CHUNK_ENTRIES // padded ** 2)  # bounds the [G, K, K] memory
    suppresses = [suppress_fn(b, iou_threshold) for b in _any_count(boxes.split(per_chunk))]
    valids = _any_count(valid.split(per_chunk))
    keeps = list(valids)
    while True:
        for _ in range(passes_per_check):
            keeps = [relax_fn(s, v, k) for s, v, k in zip(suppresses, valids, keeps)]
        again = [relax_fn(s, v, k) for s, v, k in zip(suppresses, valids, keeps)]
        changed = torch.stack([(a != k).any() for a, k in zip(again, keeps)]).any()
        keeps = again
        if not changed:  # the wait: one per block of passes
            return torch.cat(keeps)[:, :width].contiguous()


def scan_nms(boxes: torch.Tensor, valid: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """greedy_nms for all groups at once without making the host wait.

    The pairwise suppression bits come from the same compiled kernel as the fixed point's; then one
    Triton program per group walks its boxes best first, as torchvision's NMS does on the host: a box
    is kept iff it is valid and no box kept before it suppresses it, the kept set held as bits. The
    walk is sequential within a group (K steps of one K-bit row each), parallel over groups.
    """
    suppress_fn, _ = _kernels(boxes.device)
    width = boxes.shape[1]
    if width == 0 or boxes.shape[0] == 0:
        return valid.clone()
    padded = -(-width // NMS_WIDTH_STEP) * NMS_WIDTH_STEP  # a multiple of 32: rows are whole int32 words
    if padded != width:
        boxes = F.pad(boxes, (0, 0, 0, padded - width))
        valid = F.pad(valid, (0, padded - width))
    per_chunk = max(1, NMS_CHUNK_ENTRIES // padded ** 2)
    words = padded // 32
    keeps = []
    for b, v in zip(_any_count(boxes.split(per_chunk)), valid.split(per_chunk)):
        bits = suppress_fn(b, iou_threshold).contiguous().view(torch.int32)  # [g, K, K/32]: bit j%32 of word j//32
        keep = torch.empty(v.shape, dtype=torch.int8, device=v.device)
        _scan_kernel()[(len(b),)](bits, v.to(torch.int8).contiguous(), keep, padded, words,
                                  BLOCK=1 << (words - 1).bit_length(), num_warps=1)
        keeps.append(keep)
    return torch.cat(keeps)[:, :width].bool()


def _scan_kernel():
    """The Triton walk of scan_nms, or None where Triton is not installed."""
    if "scan" not in _compiled:
        try:
            import triton
            import triton.language as tl
        except ImportError:
            _compiled["scan"] = None
            return None

        @triton.jit
        def greedy_walk(bits_ptr, valid_ptr, keep_ptr, K, WORDS, BLOCK: tl.constexpr):
            group = tl.program_id(0).to(tl.int64)
            word = tl.arange(0, BLOCK)
            real = word < WORDS
            kept = tl.zeros([BLOCK], dtype=tl.int32)
            rows = bits_ptr + group * K * WORDS
            for i in range(0, K):
                row = tl.load(rows + i * WORDS + word, mask=real, other=0)  # who, ranked before i, suppresses i
                hit = tl.max(((row & kept) != 0).to(tl.int32), axis=0)
                keep = (tl.load(valid_ptr + group * K + i) != 0) & (hit == 0)
                tl.store(keep_ptr + group * K + i, keep.to(tl.int8))
                kept = kept | tl.where(word == i // 32, keep.to(tl.int32) << (i % 32), 0)

        _compiled["scan"] = greedy_walk
    return _compiled["scan"]


def _any_count(chunks: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """Tell torch.compile that the number of groups varies (batch size, the last chunk), so that
    one kernel serves every count instead of one compilation each, up to its limit of 8 (after
    which it ran eagerly: that happened in a benchmark run over three batch sizes)."""
    for chunk in chunks:
        torch._dynamo.maybe_mark_dynamic(chunk, 0)
    return chunks


def precompile(device: torch.device, widths=range(NMS_WIDTH_STEP, 1024 + 1, NMS_WIDTH_STEP)) -> None:
    """Compile the kernels for every padded width evaluation meets (up to 1000 candidates per
    group), on random boxes, so that no compilation falls inside a timed run; training's width
    (2000 -> 2048) compiles in the warm-up's training passes."""
    if device.type != "cuda":
        return
    generator = torch.Generator(device=device).manual_seed(0)
    for width in widths:
        corners = torch.rand(2, width, 2, device=device, generator=generator) * 500
        boxes = torch.cat([corners, corners + 10 + torch.rand(2, width, 2, device=device, generator=generator) * 90],
                          dim=-1)
        fixed_point_nms(boxes, torch.ones(2, width, dtype=torch.bool, device=device), 0.5)
        if _scan_kernel() is not None:
            scan_nms(boxes, torch.ones(2, width, dtype=torch.bool, device=device), 0.5)
