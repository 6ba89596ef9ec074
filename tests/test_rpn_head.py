"""fast.rpn_head (fast.Options.rpn_one_output_conv): the RPN head's objectness and box convolutions
run as one compute what the two compute, and the model with it trains the same function."""
from __future__ import annotations

import pytest
import torch
from torchvision.models.detection.rpn import RPNHead

from object_detection.fast import options_for
from object_detection.fast.patch import mix_in
from object_detection.fast.rpn_head import OneOutputConv
from tests.support.same_training import assert_trains_the_same, one_step_with_and_without


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_the_head_gives_the_two_convolutions_outputs_and_gradients(layout):
    torch.manual_seed(0)
    head = RPNHead(16, 3).double().to(memory_format=layout)
    maps = [torch.randn(2, 16, size, size + 4, dtype=torch.float64).contiguous(memory_format=layout).requires_grad_()
            for size in (8, 4)]
    expected = head(maps)
    mix_in(head, OneOutputConv)  # as use_one_output_conv does to a model's head
    got = head(maps)
    for ours, theirs in zip(got[0] + got[1], expected[0] + expected[1]):
        assert ours.shape == theirs.shape
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    grads = [torch.randn(t.shape, dtype=torch.float64) for t in expected[0] + expected[1]]
    inputs = [*maps, *head.parameters()]
    for ours, theirs in zip(torch.autograd.grad(got[0] + got[1], inputs, grads),
                            torch.autograd.grad(expected[0] + expected[1], inputs, grads)):
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)


@pytest.mark.slow
def test_the_model_trains_the_same_function_with_one_output_convolution():
    """The CPU demo's model (the same torchvision RPN head as the closed profile's) with and without
    `--speed fast-with:rpn_one_output_conv`, in float64:
    the same losses and gradients, and the same parameters (the two convolutions keep their own)."""
    assert options_for("fast-with:rpn_one_output_conv", "cpu").rpn_one_output_conv
    models, losses = one_step_with_and_without("rpn_one_output_conv", model="r18-fpn-slim")
    assert isinstance(models[True].rpn.head, OneOutputConv) and not isinstance(models[False].rpn.head, OneOutputConv)
    assert models[True].state_dict().keys() == models[False].state_dict().keys()
    assert_trains_the_same(models[True], models[False], losses[True], losses[False], loss_rtol=1e-10, loss_atol=1e-12,
                           grad_rtol=1e-7, grad_atol=1e-12)
