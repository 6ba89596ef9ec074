"""The backbone and FPN (and the RPN head) in channels_last: faster convolutions on tensor cores.

The RoI heads get contiguous feature maps: RoIAlign wants NCHW and would otherwise convert every
level for each pooler, and gradients of mixed layouts meet in slow, unvectorised additions. With
the RPN head in channels_last too (the default), its convolutions skip cuDNN's layout conversions
(+4% at batch 16 on an H200, BENCHMARKS.md).
"""
from __future__ import annotations

import torch
from torchvision.models.detection import MaskRCNN

from object_detection.fast.patch import mix_in


class ChannelsLastInput:
    """A backbone that takes its input in channels_last."""

    def forward(self, x):
        return super().forward(x.contiguous(memory_format=torch.channels_last))


class ContiguousOutput:
    """A backbone whose feature maps leave it contiguous (for heads that all want NCHW)."""

    def forward(self, x):
        return {name: f.contiguous() for name, f in super().forward(x).items()}


class ContiguousFeatures:
    """RoI heads that take contiguous feature maps."""

    def forward(self, features, *args, **kwargs):
        return super().forward({name: f.contiguous() for name, f in features.items()}, *args, **kwargs)


def use_channels_last(model: MaskRCNN, rpn_channels_last: bool = True, contiguous_heads: bool = True) -> MaskRCNN:
    """contiguous_heads=False: the RoI heads take the channels_last maps as they are (their poolers
    read them directly: fast.roi_align)."""
    model.backbone.to(memory_format=torch.channels_last)
    mix_in(model.backbone, ChannelsLastInput)
    if rpn_channels_last:
        model.rpn.head.to(memory_format=torch.channels_last)
        if contiguous_heads:
            mix_in(model.roi_heads, ContiguousFeatures)
    else:
        mix_in(model.backbone, ContiguousOutput)
    return model
