"""fast.Options.head_bias_act: the FPN's, RPN head's and mask head's convolution biases and ReLUs
added by fast.bias_act (fast.head_bias) train the same function as torchvision's blocks."""
from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from object_detection.fast import options_for
from object_detection.fast.head_bias import BiasActConvBlock, biased_conv_block
from tests.support.same_training import assert_trains_the_same, one_step_with_and_without


def test_only_plain_biased_convolution_blocks_are_taken():
    from torchvision.ops.misc import Conv2dNormActivation

    assert biased_conv_block(Conv2dNormActivation(4, 4, norm_layer=None)) is True
    assert biased_conv_block(Conv2dNormActivation(4, 4, norm_layer=None, activation_layer=None)) is False
    assert biased_conv_block(Conv2dNormActivation(4, 4)) is None  # a norm, and so no bias
    assert biased_conv_block(Conv2dNormActivation(4, 4, norm_layer=None, activation_layer=nn.SiLU)) is None
    assert biased_conv_block(nn.Conv2d(4, 4, 3)) is None


@pytest.mark.slow(seconds=10)
def test_the_model_trains_the_same_function_with_the_heads_biases_by_bias_act(tmp_path):
    """The frozen-BatchNorm model (its FPN has no norm, so its convolutions have biases): the FPN's
    four lateral and four output convolutions, the RPN head's and the mask head's four convolution-ReLU
    pairs switch; in float64 the same losses and gradients (`--speed fast-with:head_bias_act`)."""
    assert options_for("fast-with:head_bias_act", "cpu").head_bias_act
    weights = tmp_path / "resnet50.pth"
    torch.save(torchvision.models.resnet50().state_dict(), weights)
    models, losses = one_step_with_and_without("head_bias_act", backbone_weights=weights)
    switched = [m for m in models[True].modules() if type(m) is BiasActConvBlock]
    assert len(switched) == 13 and sum(m._relu for m in switched) == 5
    assert not any(type(m) is BiasActConvBlock for m in models[False].modules())
    assert_trains_the_same(models[True], models[False], losses[True], losses[False], loss_rtol=1e-10, loss_atol=1e-12,
                           grad_rtol=1e-8, grad_atol=1e-10)
