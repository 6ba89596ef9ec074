"""The one way speed code changes a built model: a module's class becomes a subclass that computes
the same function faster. Parameters, buffers and state-dict keys stay as they are, so checkpoints
move freely between the fast and the stock model.
"""
from __future__ import annotations

import functools
import os

import torch


def swap(module, cls: type, **state):
    """Make `module` an instance of `cls`, a subclass of its class; `cls._adopt(**state)`, where the
    class defines it, sets up what it keeps (swapped instances skip __init__)."""
    if not issubclass(cls, type(module)):
        raise TypeError(f"{cls.__name__} is not a subclass of {type(module).__name__}")
    module.__class__ = cls
    adopt = getattr(cls, "_adopt", None)
    if adopt is not None:
        adopt(module, **state)
    return module


def mix_in(module, mixin: type, **state):
    """`swap` to `mixin` layered over the module's current class (which may be a speed class
    already): e.g. contiguous feature maps in front of the synchronisation-free RoI heads."""
    return swap(module, _mixed(mixin, type(module)), **state)


@functools.cache
def _mixed(mixin: type, base: type) -> type:
    if issubclass(base, mixin):
        return base
    return type(f"{mixin.__name__}{base.__name__}", (mixin, base), {"__module__": mixin.__module__})


class DeviceConstants:
    """Python numbers kept as tensors on the device, made once per (values, dtype, device).

    `torch.as_tensor(values, device=cuda)` copies them to the GPU, and every such copy makes the
    host wait, so torchvision's per-call conversions cost one wait each."""

    def on_device(self, values, like: torch.Tensor) -> torch.Tensor:
        cache = getattr(self, "_device_constants", None)  # made here: swapped instances skip __init__
        if cache is None:
            cache = self._device_constants = {}
        key = (tuple(values), like.dtype, like.device)
        if key not in cache:
            cache[key] = torch.as_tensor(key[0], dtype=like.dtype, device=like.device)
        return cache[key]


def host_values(values, like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Numbers the host has (image sizes, scale ratios) as a tensor on `like`'s device, of `like`'s
    dtype unless given, copied from pinned memory: a copy from pageable memory would make the host
    wait for the GPU."""
    tensor = torch.as_tensor(values, dtype=dtype or like.dtype)
    return tensor.pin_memory().to(like.device, non_blocking=True) if like.is_cuda else tensor


def triton_runs_on(tensor: torch.Tensor) -> bool:
    """Whether the speed code's Triton kernels can take `tensor`: on a GPU, or anywhere under Triton's
    interpreter (TRITON_INTERPRET=1: the tests run them so on a CPU)."""
    return tensor.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"
