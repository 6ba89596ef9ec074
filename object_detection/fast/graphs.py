"""The backbone with its FPN, and the RPN head, replayed as CUDA graphs in training: one launch for
each forward and one for each backward instead of the hundreds of operators the host issues one by
one. NVIDIA's MLPerf Mask R-CNN graphs the same part. Here the step's GPU work already hides most of
that host time: measured, the graphs do not pay consistently (BENCHMARKS.md), so the lever is off
until they do (`--speed fast-with:cuda_graphs`), and the trainer refuses it beside DDP, unmeasured.

A graph replays fixed shapes, so this needs fixed input shapes (fast.Options.fixed_canvas: one per
orientation). Each new training shape is captured once, with torch.cuda.make_graphed_callables (the
trainer's warm_up does both orientations before run_start); past MOST_SHAPES shapes (a short last
batch, say) the module runs as it is. Evaluation, and anything not on a GPU, runs as it is too.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map

from object_detection.fast.patch import mix_in

# Two orientations, and room for short batches; each shape keeps its own activations' memory.
MOST_SHAPES = 4


class _Eager(nn.Module):
    """The graphed module's own forward, as a module whose parameters are its parameters (what
    make_graphed_callables captures, and patches: the graphed module itself keeps its forward)."""

    def __init__(self, graphed: nn.Module):
        super().__init__()
        self.graphed = graphed

    def forward(self, *args):
        return super(CapturedInTraining, self.graphed).forward(*args)


class CapturedInTraining:
    """A module whose training forwards (and their backwards) replay a CUDA graph per input shape."""

    def _adopt(self) -> None:
        self._captured = {}

    def forward(self, *args):
        leaves, _ = tree_flatten(args)
        if not (self.training and torch.is_grad_enabled() and all(t.is_cuda for t in leaves)
                and not torch.cuda.is_current_stream_capturing()):
            return super().forward(*args)
        autocast = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else None
        key = (autocast, *((t.shape, t.stride(), t.dtype, t.requires_grad) for t in leaves))
        replay = self._captured.get(key)
        if replay is None:
            if len(self._captured) >= MOST_SHAPES:
                return super().forward(*args)
            replay = self._captured[key] = self._capture(args, autocast)
        return replay(*args)

    def _capture(self, args, autocast):
        """The graphed forward for these arguments' shapes. The sample arguments share the real
        ones' memory: where the next call passes the same tensors (the RPN head gets the backbone
        graph's outputs), the graph reads them in place instead of copying them in. cuDNN picks its
        fastest kernels for the shape here (cudnn.benchmark): the graph keeps them for the run."""
        sample = tree_map(lambda t: t.detach().requires_grad_(t.requires_grad), args)
        eager = _Eager(self)
        cudnn, tuned = torch.backends.cudnn, torch.backends.cudnn.benchmark
        cudnn.benchmark = True
        try:  # the graph holds the casts: no autocast cache
            with torch.autocast("cuda", dtype=autocast or torch.bfloat16, enabled=autocast is not None,
                                cache_enabled=False):
                return torch.cuda.make_graphed_callables(eager, sample).forward
        finally:
            cudnn.benchmark = tuned


def capture_in_training(model) -> None:
    """Graph the backbone (with its FPN) and the RPN head of a built Mask R-CNN."""
    mix_in(model.backbone, CapturedInTraining)
    mix_in(model.rpn.head, CapturedInTraining)
