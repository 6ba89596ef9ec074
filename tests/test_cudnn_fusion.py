"""fast.cudnn_fusion: the convolution, bias, shortcut and ReLU of one cuDNN call, and its backward
(autograd's own operators), compute the function they replace. On the CPU the forward is the same
arithmetic in separate operators, so these tests check the backward and the swaps; on the GPU
`python -m benchmarks.train_throughput --check` compares cuDNN's fused forward too (check_cudnn_fusion)."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torchvision
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from object_detection.fast import Options
from object_detection.fast.cudnn_fusion import CudnnBottleneck, CudnnConvReLU, CudnnStemConv2d, conv_bias_relu
from object_detection.model import build_model
from tests.support.same_training import assert_trains_the_same, train_step_each, two_images_and_targets


@pytest.mark.parametrize("stride, kernel, residual", [(1, 3, False), (2, 3, False), (1, 1, True), (2, 1, True)])
def test_the_backward_is_autograds_of_the_separate_operations(stride, kernel, residual):
    conv = nn.Conv2d(4, 6, kernel, stride=stride, padding=kernel // 2)
    g = torch.Generator().manual_seed(stride * 10 + kernel)
    x = torch.randn(2, 4, 7, 9, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(6, 4, kernel, kernel, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(6, generator=g, dtype=torch.float64, requires_grad=True)
    size = ((7 + 2 * (kernel // 2) - kernel) // stride + 1, (9 + 2 * (kernel // 2) - kernel) // stride + 1)
    shortcut = torch.randn(2, 6, *size, generator=g, dtype=torch.float64, requires_grad=True)
    inputs = (x, weight, bias, shortcut if residual else None)
    assert torch.autograd.gradcheck(lambda x, w, b, r: conv_bias_relu(x, w, b, conv, r), inputs)
    expected = torch.nn.functional.conv2d(x, weight, bias, stride, kernel // 2) + (shortcut if residual else 0)
    torch.testing.assert_close(conv_bias_relu(x, weight, bias, conv, inputs[3]), expected.relu(), rtol=0, atol=0)


def test_under_autocast_it_computes_in_the_autocast_dtype_and_returns_float32_gradients():
    conv = nn.Conv2d(4, 6, 3, padding=1)
    x = torch.randn(2, 4, 7, 9).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = conv_bias_relu(x, conv.weight, conv.bias, conv)
        expected = torch.relu(conv(x))
    assert out.dtype == torch.bfloat16 and out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, expected, rtol=2e-2, atol=2e-2)
    out.float().sum().backward()
    assert conv.weight.grad.dtype == conv.bias.grad.dtype == torch.float32


@pytest.mark.slow
def test_the_model_trains_the_same_function_with_every_pair_swapped(tmp_path):
    """The closed profile's model: the stem, 16 bottlenecks, the RPN head's and the mask head's 4
    convolution-ReLU pairs swapped; the same losses and gradients as fast.fuse_bias's model in
    float64 (frozen statistics far from the identity, so a missed bias shows)."""
    weights = tmp_path / "resnet50.pth"
    torch.save(torchvision.models.resnet50().state_dict(), weights)
    models = {}
    for fusion in (False, True):
        torch.manual_seed(0)
        models[fusion] = build_model(81, backbone_weights=weights, min_size=96, max_size=128,
                                     speed=replace(Options.for_device("cpu"), cudnn_fusion=fusion)).double().train()
    g = torch.Generator().manual_seed(1)
    for m in models[False].modules():
        if isinstance(m, FrozenBatchNorm2d):
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g))
    models[True].load_state_dict(models[False].state_dict())  # the same keys: nothing renamed
    kinds = [type(m) for m in models[True].modules()]
    assert (kinds.count(CudnnStemConv2d), kinds.count(CudnnBottleneck), kinds.count(CudnnConvReLU)) == (1, 16, 5)
    losses = train_step_each(models, *two_images_and_targets(g))
    assert_trains_the_same(models[True], models[False], losses[True], losses[False], loss_rtol=1e-10, loss_atol=1e-12,
                           grad_rtol=1e-8, grad_atol=1e-10)
