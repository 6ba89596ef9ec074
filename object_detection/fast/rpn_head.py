"""The RPN head's objectness and box convolutions as one (fast.Options.rpn_one_output_conv).

torchvision's RPNHead runs two 1x1 convolutions on the same 256-channel map at every level, the
objectness logits (A channels) and the box deltas (4A): the map is read twice in the forward and in
the weight gradients, and its gradient is written twice and summed in the backward, at P2 a map of
12 x 256 x 200 x 336 for a batch of 12. One convolution over both weight sets, its output split by
channel, reads and writes that map once. The parameters stay the two modules' own (their weights are
concatenated at each forward, a few thousand values), so state dicts and checkpoints are unchanged.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.models.detection.rpn import RPNHead

from object_detection.fast.patch import mix_in


class OneOutputConv:
    """An RPNHead whose two 1x1 output convolutions run as one."""

    def forward(self, x: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        anchors = self.cls_logits.out_channels
        weight = torch.cat([self.cls_logits.weight, self.bbox_pred.weight])
        bias = torch.cat([self.cls_logits.bias, self.bbox_pred.bias])
        logits, deltas = [], []
        for feature in x:
            # split, not two slices: its backward is one concatenation, where each slice's would
            # be a zero-filled map of both outputs, then their sum
            both = F.conv2d(self.conv(feature), weight, bias)
            objectness, box = torch.split(both, [anchors, self.bbox_pred.out_channels], dim=1)
            logits.append(objectness)
            deltas.append(box)
        return logits, deltas


def use_one_output_conv(model) -> None:
    """model.rpn.head (torchvision's RPNHead, or a speed class over it) with OneOutputConv's forward."""
    if isinstance(model.rpn.head, RPNHead):
        mix_in(model.rpn.head, OneOutputConv)
