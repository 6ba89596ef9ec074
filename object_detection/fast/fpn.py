"""The FPN's top-down sums without the upsampled maps (fast.Options.fpn_broadcast).

torchvision's FPN upsamples each coarser map to the next level's size (nearest) and then adds the
lateral convolution's output: a full-size copy of the coarser map is written and read again, once
a level in the forward and again in the backward. Where the finer map is exactly twice the coarser
one in each dimension (every level of a batch padded to a multiple of 32), nearest upsampling
repeats each value over a 2x2 block, so the sum is one broadcasting addition over a view of the
finer map split into those blocks: the same values, with no upsampled map made; its backward sums
each block's four gradients (autograd's reduction for a broadcast operand). Any other size takes
torchvision's way.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torchvision.ops import FeaturePyramidNetwork

from object_detection.fast.patch import swap


def add_upsampled(lateral: torch.Tensor, coarser: torch.Tensor) -> torch.Tensor:
    """`lateral + F.interpolate(coarser, size=lateral's, mode="nearest")`, in `lateral`'s memory layout."""
    n, c, h, w = lateral.shape
    if (h, w) != (2 * coarser.shape[-2], 2 * coarser.shape[-1]) or coarser.shape[:2] != (n, c):
        return lateral + F.interpolate(coarser, size=(h, w), mode="nearest")
    if lateral.is_contiguous(memory_format=torch.channels_last) and not lateral.is_contiguous():
        blocks = lateral.permute(0, 2, 3, 1).reshape(n, h // 2, 2, w // 2, 2, c)
        coarse = coarser.permute(0, 2, 3, 1).reshape(n, h // 2, 1, w // 2, 1, c)
        return (blocks + coarse).reshape(n, h, w, c).permute(0, 3, 1, 2)
    blocks = lateral.reshape(n, c, h // 2, 2, w // 2, 2)
    return (blocks + coarser.reshape(n, c, h // 2, 1, w // 2, 1)).reshape(n, c, h, w)


class BroadcastTopDownFPN(FeaturePyramidNetwork):
    """torchvision's FeaturePyramidNetwork.forward with its top-down sums made by add_upsampled."""

    def forward(self, x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        names, maps = list(x.keys()), list(x.values())
        last_inner = self.get_result_from_inner_blocks(maps[-1], -1)
        results = [self.get_result_from_layer_blocks(last_inner, -1)]
        for idx in range(len(maps) - 2, -1, -1):
            last_inner = add_upsampled(self.get_result_from_inner_blocks(maps[idx], idx), last_inner)
            results.insert(0, self.get_result_from_layer_blocks(last_inner, idx))
        if self.extra_blocks is not None:
            results, names = self.extra_blocks(results, maps, names)
        return OrderedDict(zip(names, results))


def use_broadcast_top_down(model) -> None:
    """The model's FPN (model.backbone.fpn, torchvision's BackboneWithFPN) with BroadcastTopDownFPN's sums."""
    if type(model.backbone.fpn) is FeaturePyramidNetwork:
        swap(model.backbone.fpn, BroadcastTopDownFPN)
