"""Each folded convolution's bias added together with what follows it (ReLU, residual) in one pass,
in the ResNet bottlenecks and stem whose FrozenBatchNorm layers fold_bn folded.

Same function, same parameters and state dict (fast.bias_act says why it is faster). The heads'
convolutions (RPN, FPN, mask head) are left alone: fusing them too made a training step at batch
16 on an H200 slower, not faster (BENCHMARKS.md).
"""
from __future__ import annotations

import torch
from torch import nn
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.resnet import Bottleneck, ResNet

from object_detection.fast.bias_act import bias_act
from object_detection.fast.fold_bn import FoldedConv2d, FoldedFrozenBatchNorm2d
from object_detection.fast.patch import swap


class FusedBottleneck(Bottleneck):
    """conv1-relu, conv2-relu, conv3 + shortcut-relu, each bias added in the pass that follows."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = bias_act(*unbiased(self.conv1, x))
        out = bias_act(*unbiased(self.conv2, out))
        out, bias = unbiased(self.conv3, out)
        identity = x
        if self.downsample is not None:
            identity, shortcut_bias = unbiased(self.downsample[0], x)
            bias = bias + shortcut_bias
        return bias_act(out, bias, identity)


class SharedInputBottleneck(FusedBottleneck):
    """A stage's first block whose conv1 and downsample, both 1x1 with the same stride (the reference's
    stride in the 1x1 convolution), run as one convolution with their weights stacked
    (fast.Options.downsample_with_conv1). The input is read once, and its two gradients come out of one
    convolution's backward already summed, where autograd otherwise writes both at the input's full size
    and adds them. The output is split by channel; bias_act reads both parts where they lie."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (w1, b1), (wd, bd) = self.conv1.folded(), self.downsample[0].folded()
        both = self.conv1.conv(x, torch.cat([w1, wd]))
        out, identity = torch.split(both, [w1.shape[0], wd.shape[0]], dim=1)
        out = bias_act(out, b1)
        out = bias_act(*unbiased(self.conv2, out))
        out, bias = unbiased(self.conv3, out)
        return bias_act(out, bias + bd, identity)


def share_input_of_downsample(model: nn.Module) -> int:
    """SharedInputBottleneck for each fused block whose conv1 and downsample can be one convolution;
    returns how many."""
    shared = 0
    for module in model.modules():
        if type(module) is FusedBottleneck and _one_convolution(module.conv1, module.downsample):
            swap(module, SharedInputBottleneck)
            shared += 1
    return shared


def _one_convolution(conv1: nn.Conv2d, downsample: nn.Module | None) -> bool:
    """Whether conv1 and the downsample's convolution read the same pixels: both 1x1, unpadded, alike."""
    if downsample is None or not isinstance(downsample[0], FoldedConv2d):
        return False
    shortcut = downsample[0]
    return all(conv.kernel_size == (1, 1) and conv.padding == (0, 0) and conv.groups == 1 and conv.bias is None
               for conv in (conv1, shortcut)) and (conv1.stride, conv1.dilation) == (shortcut.stride, shortcut.dilation)


class FusedStemConv2d(FoldedConv2d):
    """The stem's convolution with its bias and the stem's ReLU in one pass."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return bias_act(*unbiased(self, x))


class FusedReLU(nn.ReLU):
    """The stem's own ReLU, applied by FusedStemConv2d before it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def unbiased(conv: FoldedConv2d, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The folded convolution without its bias, and the bias."""
    weight, bias = conv.folded()
    return conv.conv(x, weight), bias


def fuse_bias_relu(model: nn.Module) -> int:
    """Swap in the fused classes wherever every norm of a bottleneck or stem was folded; returns
    the number of modules changed."""
    fused = 0
    for module in model.modules():
        if type(module) is Bottleneck and _all_folded(module):
            swap(module, FusedBottleneck)
            fused += 1
        elif _is_stem(module) and _all_folded(module):
            swap(module.conv1, FusedStemConv2d, bn=module.bn1)
            swap(module.relu, FusedReLU)  # bottlenecks have ReLUs of their own
            fused += 1
    return fused


def _all_folded(module: nn.Module) -> bool:
    """Whether every BatchNorm directly in module (and its shortcut) was folded into a conv."""
    if _is_stem(module):
        return isinstance(module.bn1, FoldedFrozenBatchNorm2d)
    norms = [module.bn1, module.bn2, module.bn3]
    if module.downsample is not None:
        norms.append(module.downsample[1])
    return all(isinstance(bn, FoldedFrozenBatchNorm2d) for bn in norms)


def _is_stem(module: nn.Module) -> bool:
    """A ResNet, or the IntermediateLayerGetter the FPN backbone wraps it in: conv1, bn1, relu."""
    return isinstance(module, (ResNet, IntermediateLayerGetter)) and all(
        hasattr(module, name) for name in ("conv1", "bn1", "relu")) and type(module.relu) is nn.ReLU
