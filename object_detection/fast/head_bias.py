"""The heads' convolution biases, and the ReLU after them, added by fast.bias_act's kernel
(fast.Options.head_bias_act).

The FPN's lateral and output convolutions, the RPN head's convolution and the mask head's are
torchvision Conv2dNormActivation blocks without a norm: a convolution with a bias, then a ReLU or
nothing. PyTorch adds such a bias after cuDNN's convolution with a broadcasting `add_`, which on
channels_last maps runs the unvectorised elementwise kernel, and the ReLU is one more pass; at P2 each
pass is a 12 x 256 x 200 x 336 map for a batch of 12. Here the convolution runs without its bias and
bias_act adds it (in float32, rounded once) and applies the ReLU in one vectorised pass. Same
parameters and state dict; the bias's gradient is bias_act's channel sum.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops.misc import Conv2dNormActivation

from object_detection.fast.bias_act import bias_act
from object_detection.fast.fold_bn import FoldedConv2d
from object_detection.fast.patch import swap


def biased_conv_block(module: nn.Module) -> bool | None:
    """For a Conv2dNormActivation that is a plain biased convolution, then a ReLU or nothing: whether
    the ReLU is there; None for any other module."""
    if type(module) is not Conv2dNormActivation or len(module) not in (1, 2):
        return None
    conv = module[0]
    if (type(conv) is not nn.Conv2d or isinstance(conv, FoldedConv2d) or conv.bias is None
            or conv.padding_mode != "zeros"):
        return None
    if len(module) == 2 and type(module[1]) is not nn.ReLU:
        return None
    return len(module) == 2


class BiasActConvBlock(Conv2dNormActivation):
    """A head's biased convolution (and ReLU) with bias and ReLU applied by bias_act."""

    def _adopt(self, relu: bool) -> None:
        self._relu = relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = self[0]
        out = F.conv2d(x, conv.weight, None, conv.stride, conv.padding, conv.dilation, conv.groups)
        return bias_act(out, conv.bias, relu=self._relu)


def use_head_bias_act(model) -> int:
    """BiasActConvBlock for every plain biased convolution block of the FPN, the RPN head and the mask
    head; returns how many."""
    heads = [model.backbone.fpn, model.rpn.head]
    if model.roi_heads.has_mask():
        heads.append(model.roi_heads.mask_head)
    changed = 0
    for head in heads:
        for module in head.modules():
            relu = biased_conv_block(module)
            if relu is not None:
                swap(module, BiasActConvBlock, relu=relu)
                changed += 1
    return changed
