"""Frozen BatchNorm folded into the convolution before it.

conv(x, W) * s + b == conv(x, W * s) + b for a per-channel s, so the output is the same function
and W keeps its parametrisation and gradients (autograd carries d/dW through W * s). What goes
away are the full-resolution multiply and add per norm layer, which under autocast ran in fp32
with a copy back to bf16: about a third of the GPU time of a step at batch 16 on an H200.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from object_detection.fast.patch import swap


class FoldedFrozenBatchNorm2d(FrozenBatchNorm2d):
    """A FrozenBatchNorm2d whose convolution applies it; its buffers stay (the state dict reads them)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class FoldedConv2d(nn.Conv2d):
    """A convolution that applies the FrozenBatchNorm2d after it through its own weight and bias."""

    def _adopt(self, bn: FrozenBatchNorm2d) -> None:
        self._folded_bn = (bn,)   # in a tuple: not a child module, so the state dict is unchanged
        self._folded_cache = None
        self._norm_cache = None

    @property
    def folded_norm(self) -> FrozenBatchNorm2d:
        """The norm folded into this convolution (what `_adopt` takes when the class is swapped again)."""
        return self._folded_bn[0]

    def folded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The weight and bias of this convolution followed by its norm, as one convolution.

        Only a training forward of a trainable convolution folds anew, and then only its weight:
        W * s, with the norm's per-channel scale s and the bias kept (the norm is frozen). Folding
        everything every step was 318 of the backbone's 505 operators at 12 images (host_ops),
        each a launch on a host-bound step. Otherwise (evaluation, frozen stages) the pair is
        computed once and kept; a forward with autograd drops it for a trainable convolution (the
        optimizer steps that follow change its weight without bumping the version counter: fused
        SGD does not); load_state_dict, .to() and other in-place writes change the keys.
        """
        (bn,) = self._folded_bn
        if torch.is_grad_enabled() and self.weight.requires_grad:
            self._folded_cache = None
            return _fold(self.weight, self._norm())
        key = _key(self.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var)
        self._folded_cache = _kept(self._folded_cache, key, lambda: _fold(self.weight, self._norm()))
        return self._folded_cache[1]

    def _norm(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The frozen norm's scale (shaped to multiply the weight) and bias; kept while its buffers are."""
        (bn,) = self._folded_bn
        key = _key(bn.weight, bn.bias, bn.running_mean, bn.running_var)
        self._norm_cache = _kept(self._norm_cache, key, lambda: _norm(bn))
        return self._norm_cache[1]

    def conv(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x, *self.folded())


def _norm(bn: FrozenBatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    scale = bn.weight * (bn.running_var + bn.eps).rsqrt()
    return scale.reshape(-1, 1, 1, 1), bn.bias - bn.running_mean * scale


def _fold(weight: torch.Tensor, norm: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    scale, bias = norm
    return weight * scale, bias


def _kept(cache: tuple | None, key: list, make) -> tuple:
    """(key, tensors): the cache while its key holds; else make()'s tensors, written into the kept
    ones where they fit, so that what reads them where they are sees the new values (CUDA graphs
    captured before a checkpoint is restored: fast.graphs). Ordinary tensors even in inference mode
    (evaluation): training's backward saves the norm's scale and a frozen stage's weight, which an
    inference tensor refuses."""
    if cache is not None and cache[0] == key:
        return cache
    with torch.inference_mode(False), torch.no_grad():
        fresh = make()
        if cache is not None and all(old.shape == new.shape and old.dtype == new.dtype and old.device == new.device
                                     for old, new in zip(cache[1], fresh)):
            for old, new in zip(cache[1], fresh):
                old.copy_(new)
            return key, cache[1]
        return key, fresh


def _key(*tensors: torch.Tensor) -> list:
    """What changes when a tensor is replaced or written in place (except by fused optimizers)."""
    return [(t.data_ptr(), t._version, t.dtype, t.requires_grad) for t in tensors]


def fold_frozen_batchnorm(module: nn.Module) -> int:
    """Fold every FrozenBatchNorm2d that directly follows a bias-free, zero-padded Conv2d among
    a module's children (ResNet blocks, stems and downsample branches); returns the count."""
    folded = 0
    for parent in module.modules():
        previous = None
        for child in parent.children():
            if (type(child) is FrozenBatchNorm2d and type(previous) is nn.Conv2d
                    and previous.bias is None and previous.padding_mode == "zeros"):
                swap(previous, FoldedConv2d, bn=child)
                swap(child, FoldedFrozenBatchNorm2d)
                folded += 1
            previous = child
    return folded
