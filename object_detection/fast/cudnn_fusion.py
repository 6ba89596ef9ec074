"""Convolution, bias, residual and ReLU in one cuDNN call (fast.Options.cudnn_fusion).

fast.fuse_bias adds a folded convolution's bias, the block's shortcut and the ReLU in one Triton
pass over the convolution's output; the RPN head and the mask head add their bias with PyTorch's
`add_` and then apply the ReLU: two passes more. cuDNN's fused convolutions
(`torch.cudnn_convolution_relu`, `torch.cudnn_convolution_add_relu`: what NVIDIA's implementation
runs through cuDNN's graph API) apply all of it as the convolution writes its output, so the
output is written once and read by nothing but the next layer. These ops have no backward: the
backward here is the one autograd runs today (the ReLU's mask on the saved output, then the
convolution's backward), so only the forward changes. Off the GPU the forward is the same
arithmetic in separate operators (the tests check the backward against autograd's there).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops.misc import Conv2dNormActivation

from object_detection.fast.fuse_bias import FusedBottleneck, FusedStemConv2d, unbiased
from object_detection.fast.head_bias import biased_conv_block
from object_detection.fast.patch import swap


def conv_bias_relu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, conv: nn.Conv2d,
                   residual: torch.Tensor | None = None) -> torch.Tensor:
    """relu(conv2d(x, weight) + bias[None, :, None, None] + residual) with `conv`'s stride, padding,
    dilation and groups; under autocast in its dtype, as F.conv2d would be."""
    return _ConvBiasReLU.apply(x, weight, bias, residual, (conv.stride, conv.padding, conv.dilation, conv.groups))


class _ConvBiasReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, residual, geometry):
        stride, padding, dilation, groups = geometry
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        channels_last = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        layout = torch.channels_last if channels_last else torch.contiguous_format
        x = x.to(dtype)
        weight = weight.detach().to(dtype).contiguous(memory_format=layout)
        bias = bias.detach().to(dtype)
        residual = None if residual is None else residual.to(dtype)
        with torch.autocast(x.device.type, enabled=False):
            if x.is_cuda and residual is None:
                out = torch.cudnn_convolution_relu(x, weight, bias, stride, padding, dilation, groups)
            elif x.is_cuda:
                out = torch.cudnn_convolution_add_relu(x, weight, residual, 1.0, bias, stride, padding, dilation,
                                                       groups)
            else:
                out = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
                out = (out if residual is None else out + residual).relu()
        ctx.geometry, ctx.has_residual = geometry, residual is not None
        ctx.save_for_backward(x, weight, out)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight, out = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.geometry
        need_x, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad = torch.ops.aten.threshold_backward(grad, out, 0)
        grad_x = grad_weight = None
        if need_x or need_weight:
            grad_x, grad_weight, _ = torch.ops.aten.convolution_backward(
                grad, x, weight, None, stride, padding, dilation, False, [0] * len(stride), groups,
                [need_x, need_weight, False])
        # summed in float32 at least (a bf16 sum over a map's pixels would round away most of it)
        grad_bias = grad.sum(dim=(0, 2, 3), dtype=torch.promote_types(grad.dtype, torch.float32)) if need_bias else None
        return grad_x, grad_weight, grad_bias, grad if ctx.has_residual else None, None


class CudnnBottleneck(FusedBottleneck):
    """fast.fuse_bias's bottleneck with each convolution's bias, shortcut and ReLU fused by cuDNN."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = conv_bias_relu(x, *self.conv1.folded(), self.conv1)
        out = conv_bias_relu(out, *self.conv2.folded(), self.conv2)
        weight, bias = self.conv3.folded()
        identity = x
        if self.downsample is not None:
            identity, shortcut_bias = unbiased(self.downsample[0], x)
            bias = bias + shortcut_bias
        return conv_bias_relu(out, weight, bias, self.conv3, identity)


class CudnnStemConv2d(FusedStemConv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return conv_bias_relu(x, *self.folded(), self)


class CudnnConvReLU(Conv2dNormActivation):
    """A head's convolution with bias, then ReLU (torchvision's Conv2dNormActivation without a norm)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = self[0]
        return conv_bias_relu(x, conv.weight, conv.bias, conv)


def use_cudnn_fusion(model) -> int:
    """Swap in the cuDNN-fused classes: fast.fuse_bias's bottlenecks and stem, and the RPN and mask
    heads' convolution-ReLU pairs. Returns the number of modules changed."""
    changed = 0
    for module in model.modules():
        if type(module) is FusedBottleneck:
            swap(module, CudnnBottleneck)
        elif type(module) is FusedStemConv2d:
            swap(module, CudnnStemConv2d, bn=module.folded_norm)
        elif biased_conv_block(module):
            swap(module, CudnnConvReLU)
        else:
            continue
        changed += 1
    return changed
