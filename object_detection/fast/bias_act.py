"""Bias, residual and ReLU of a convolution in one pass over its output.

With BatchNorm folded into the convolution weights (fast.fold_bn), each ResNet
convolution is followed by a per-channel bias, in every block's last convolution a residual, and
a ReLU. PyTorch adds a convolution's bias with a broadcasting `add_` (on channels_last maps the
unvectorised elementwise kernel: about 11 ms of a 85 ms training step at batch 16 on an H200),
then the residual, then the ReLU: up to three passes over the largest tensors of the network.
`bias_act` does them in one, with a Triton kernel on CUDA and torch operations elsewhere; the
backward pass is one vectorised `threshold_backward`.
"""
from __future__ import annotations

import functools

import torch

from object_detection.fast.patch import triton_runs_on

_BLOCK = 2048


def bias_act(x: torch.Tensor, bias: torch.Tensor, residual: torch.Tensor | None = None,
             relu: bool = True) -> torch.Tensor:
    """relu(x + bias[None, :, None, None] + residual), or without the ReLU; x [N,C,H,W].

    The sum is rounded to x's dtype once (the unfused order rounds after each addition).
    """
    return _BiasAct.apply(x, bias, residual, relu)


class _BiasAct(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bias, residual, relu):
        kernel = _triton_kernel() if triton_runs_on(x) else None
        layout = _layout(x)
        residual_layout = layout if residual is None else _layout(residual)
        if (kernel is not None and layout is not None and x.numel() and residual_layout is not None
                and residual_layout[0] == layout[0]):
            (inner, x_pixel), r_pixel = layout, residual_layout[1]
            channels = x.shape[1]
            strided = inner == 1 and (x_pixel != channels or r_pixel != channels)
            out = torch.empty(x.shape, dtype=x.dtype, device=x.device,
                              memory_format=torch.channels_last if inner == 1 else torch.contiguous_format)
            n = x.numel()
            extent = max(n, n // channels * max(x_pixel, r_pixel)) if strided else n
            kernel[(-(-n // _BLOCK),)](
                x, bias.detach().contiguous(), x if residual is None else residual, out, n,
                channels, inner, x_pixel, r_pixel, HAS_RESIDUAL=residual is not None, RELU=relu,
                STRIDED=strided, WIDE=extent + _BLOCK >= 2**31, BLOCK=_BLOCK)
        else:
            out = x + bias.detach().to(x.dtype).reshape(1, -1, 1, 1)
            if residual is not None:
                out = out + residual
            if relu:
                out = out.clamp_min_(0)
        ctx.relu = relu
        ctx.has_residual = residual is not None
        ctx.bias_dtype = bias.dtype
        if relu:
            ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, grad):
        if ctx.relu:
            (out,) = ctx.saved_tensors
            grad = torch.ops.aten.threshold_backward(grad, out, 0)
        grad_bias = grad.sum(dim=(0, 2, 3), dtype=torch.promote_types(grad.dtype, torch.float32)).to(ctx.bias_dtype) \
            if ctx.needs_input_grad[1] else None
        return grad, grad_bias, grad if ctx.has_residual else None, None


def _layout(x: torch.Tensor) -> tuple[int, int] | None:
    """(elements between consecutive channels, elements between consecutive pixels) of a dense NCHW
    tensor (H*W, 1) or of an NHWC one (1, C), or of a channel slice of a wider NHWC tensor (1, its
    width: fast.fuse_bias's shared convolution for conv1 and the downsample); None otherwise."""
    if x.dim() != 4:
        return None
    if x.is_contiguous(memory_format=torch.channels_last):
        return 1, x.shape[1]
    if x.is_contiguous():
        return x.shape[2] * x.shape[3], 1
    n, c, h, w = x.stride()
    if c == 1 and h == w * x.shape[3] and n == h * x.shape[2] and w >= x.shape[1]:
        return 1, w
    return None


@functools.cache
def _triton_kernel():
    """The Triton kernel, or None where Triton is not installed (CPU-only torch builds)."""
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def bias_act_kernel(x_ptr, bias_ptr, residual_ptr, out_ptr, n, channels, channel_stride, x_pixel, r_pixel,
                        HAS_RESIDUAL: tl.constexpr, RELU: tl.constexpr, STRIDED: tl.constexpr, WIDE: tl.constexpr,
                        BLOCK: tl.constexpr):
        if WIDE:  # 64-bit offsets only where needed: the channel's integer division is cheaper in 32
            offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        else:
            offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        inside = offsets < n
        if STRIDED:  # NHWC channel slices: the output dense, the inputs a pixel's channels apart
            pixel = offsets // channels
            channel = offsets - pixel * channels
            x_at, r_at = pixel * x_pixel + channel, pixel * r_pixel + channel
        else:
            channel = (offsets // channel_stride) % channels
            x_at, r_at = offsets, offsets
        value = tl.load(x_ptr + x_at, mask=inside).to(tl.float32)
        value += tl.load(bias_ptr + channel, mask=inside).to(tl.float32)
        if HAS_RESIDUAL:
            value += tl.load(residual_ptr + r_at, mask=inside).to(tl.float32)
        if RELU:
            value = tl.maximum(value, 0.0)
        tl.store(out_ptr + offsets, value.to(out_ptr.dtype.element_ty), mask=inside)

    return bias_act_kernel
