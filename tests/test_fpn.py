"""fast.fpn (fast.Options.fpn_broadcast): the FPN's top-down sums as broadcasting additions compute
torchvision's upsample-then-add, in both memory layouts, and the model with it trains the same function."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from object_detection.fast import Options, options_for
from object_detection.fast.fpn import BroadcastTopDownFPN, add_upsampled
from object_detection.model import build_model
from tests.support.same_training import assert_trains_the_same


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


def test_the_model_trains_the_same_function_with_the_broadcast_sums(monkeypatch):
    """The closed profile's model with and without the lever (`--speed fast-with:fpn_broadcast`): in float64
    the same losses, and the same gradients up to summation order; every level of the 96x128 canvas is
    twice the next, so each top-down sum takes the broadcasting way."""
    assert options_for("fast-with:fpn_broadcast", "cpu").fpn_broadcast
    models = {}
    for broadcast in (False, True):
        torch.manual_seed(0)
        models[broadcast] = build_model(81, backbone_weights=None, min_size=96, max_size=128,
                                        speed=replace(Options.for_device("cpu"), fpn_broadcast=broadcast)).double()
    assert type(models[True].backbone.fpn) is BroadcastTopDownFPN
    assert type(models[False].backbone.fpn) is not BroadcastTopDownFPN
    models[True].load_state_dict(models[False].state_dict())  # the same keys: nothing renamed
    g = torch.Generator().manual_seed(1)
    images = [torch.rand(3, 96, 128, generator=g, dtype=torch.float64) for _ in range(2)]
    boxes = torch.tensor([[10.0, 12.0, 60.0, 70.0], [40.0, 20.0, 110.0, 90.0]], dtype=torch.float64)
    masks = torch.zeros(2, 96, 128, dtype=torch.uint8)
    masks[0, 12:70, 10:60] = masks[1, 20:90, 40:110] = 1
    targets = [{"boxes": boxes, "labels": torch.tensor([1, 2]), "masks": masks}] * 2
    losses, upsampled, interpolate = {}, [], F.interpolate
    monkeypatch.setattr(F, "interpolate", lambda *a, **k: upsampled.append(k.get("mode")) or interpolate(*a, **k))
    for broadcast, model in models.items():
        model.train()
        torch.manual_seed(5)  # the same samples drawn
        losses[broadcast] = model(images, targets)
        sum(losses[broadcast].values()).backward()
        assert upsampled.count("nearest") == (0 if broadcast else 3)  # the FPN's three top-down maps
        upsampled.clear()
    assert_trains_the_same(models[True], models[False], losses[True], losses[False], loss_rtol=1e-10, loss_atol=1e-12,
                           grad_rtol=1e-7, grad_atol=1e-12)
