"""fast.fpn (fast.Options.fpn_broadcast): the FPN's top-down sums as broadcasting additions compute
torchvision's upsample-then-add, in both memory layouts, and the model with it trains the same function."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from object_detection.fast import options_for
from object_detection.fast.fpn import BroadcastTopDownFPN, add_upsampled
from tests.support.same_training import assert_trains_the_same, one_step_with_and_without


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("size", [(12, 20), (13, 21)])
def test_the_sum_is_torchvisions_upsampled_sum(channels_last, dtype, size):
    """The same values bit for bit, in the finer map's layout; gradients equal up to the order of each
    2x2 block's four terms. 13x21 over 7x11 is not twice the size: torchvision's way, unchanged."""
    g = torch.Generator().manual_seed(0)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    lateral = torch.randn(2, 8, *size, generator=g).to(dtype).contiguous(memory_format=layout).requires_grad_()
    coarser = torch.randn(2, 8, -(-size[0] // 2), -(-size[1] // 2), generator=g).to(dtype)
    coarser = coarser.contiguous(memory_format=layout).requires_grad_()
    got = add_upsampled(lateral, coarser)
    expected = lateral + F.interpolate(coarser, size=size, mode="nearest")
    assert torch.equal(got, expected)
    assert got.is_contiguous(memory_format=layout)
    grad = torch.randn(got.shape, generator=g).to(dtype)
    for ours, theirs in zip(torch.autograd.grad(got, (lateral, coarser), grad),
                            torch.autograd.grad(expected, (lateral, coarser), grad)):
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6 if dtype == torch.float32 else 2 ** -6)


@pytest.mark.slow
def test_the_model_trains_the_same_function_with_the_broadcast_sums(monkeypatch):
    """The CPU demo's model (torchvision's FPN, as the closed profile's) with and without the lever
    (`--speed fast-with:fpn_broadcast`): in float64
    the same losses, and the same gradients up to summation order; every level of the 96x128 canvas is
    twice the next, so each top-down sum takes the broadcasting way."""
    assert options_for("fast-with:fpn_broadcast", "cpu").fpn_broadcast
    upsampled, interpolate = [], F.interpolate
    monkeypatch.setattr(F, "interpolate", lambda *a, **k: upsampled.append(k.get("mode")) or interpolate(*a, **k))
    models, losses = one_step_with_and_without("fpn_broadcast", model="r18-fpn-slim")
    assert type(models[True].backbone.fpn) is BroadcastTopDownFPN
    assert type(models[False].backbone.fpn) is not BroadcastTopDownFPN
    assert upsampled.count("nearest") == 3  # the FPN's three top-down maps, in the model without the lever only
    assert_trains_the_same(models[True], models[False], losses[True], losses[False], loss_rtol=1e-10, loss_atol=1e-12,
                           grad_rtol=1e-7, grad_atol=1e-12)
