"""fast.Options.downsample_with_conv1: a stage's first block runs conv1 and its downsample as one
convolution (fast.fuse_bias.SharedInputBottleneck), and fast.bias_act's kernel reads the two channel
slices of its output where they lie. The same function as the fused blocks without it."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from functools import partial

import pytest
import torch
import torchvision
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from conftest import ROOT
from object_detection import reference
from object_detection.fast import fold_bn, fuse_bias, options_for
from object_detection.fast.fuse_bias import FusedBottleneck, SharedInputBottleneck
from object_detection.model import build_model
from tests.support.same_training import assert_trains_the_same


def reference_body(seed: int) -> nn.Module:
    """The closed profile's ResNet-50 (stride in the 1x1 convolutions, frozen BatchNorm) with random
    weights and frozen statistics far from the identity, folded and fused as fast.apply does."""
    torch.manual_seed(seed)
    body = reference.stride_in_1x1(torchvision.models.resnet50(norm_layer=partial(FrozenBatchNorm2d, eps=0.0)))
    g = torch.Generator().manual_seed(seed)
    for m in body.modules():
        if isinstance(m, FrozenBatchNorm2d):
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g))
            m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    fold_bn.fold_frozen_batchnorm(body)
    fuse_bias.fuse_bias_relu(body)
    return body.double()


def test_each_stages_first_block_reads_its_input_once_and_trains_the_same():
    """All four first blocks of the reference's layout (stride 1, then 2 in the 1x1 convolutions)
    switch; in float64 the same features and the same gradient for every weight and the input."""
    bodies = {shared: reference_body(0) for shared in (False, True)}
    bodies[True].load_state_dict(bodies[False].state_dict())
    assert fuse_bias.share_input_of_downsample(bodies[True]) == 4
    kinds = [type(m) for m in bodies[True].modules()]
    assert (kinds.count(SharedInputBottleneck), kinds.count(FusedBottleneck)) == (4, 12)
    x = torch.randn(2, 3, 32, 64, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    outputs = {}
    for shared, body in bodies.items():
        image = x.clone().requires_grad_()
        outputs[shared] = body.layer4(body.layer3(body.layer2(body.layer1(body.maxpool(body.relu(
            body.bn1(body.conv1(image))))))))
        outputs[shared].square().sum().backward()
        outputs[shared] = (outputs[shared].detach(), image.grad)
    for got, expected in zip(outputs[True], outputs[False]):  # up to float64's summation order
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9 * expected.abs().max().item())
    assert_trains_the_same(bodies[True], bodies[False], {}, {}, loss_rtol=0, loss_atol=0, grad_rtol=1e-8,
                           grad_atol_of_largest=1e-12)


def test_the_lever_reaches_the_models_backbone(tmp_path):
    """`--speed fast-with:downsample_with_conv1` on the open profile's model (torchvision's stride in
    the 3x3 convolutions): only layer1's first block, whose two 1x1 convolutions both have stride 1,
    can switch (the reference's layout, where all four do, is the test above)."""
    weights = tmp_path / "resnet50.pth"
    torch.save(torchvision.models.resnet50().state_dict(), weights)
    model = build_model(81, backbone_weights=weights, min_size=96, max_size=128,
                        speed=options_for("fast-with:downsample_with_conv1", "cpu"))
    assert [type(m) for m in model.modules()].count(SharedInputBottleneck) == 1
    assert not options_for("fast", "cpu").downsample_with_conv1 and options_for("fast", "cuda").downsample_with_conv1


@pytest.mark.slow
def test_the_bias_kernel_reads_channel_slices_of_a_wider_map():
    """fast.bias_act's Triton kernel as Triton's interpreter runs it on the CPU
    (tests/support/bias_act_checks.py): float32 bit for bit with the tensor operations, dense maps of
    both layouts and the slices SharedInputBottleneck hands it; bfloat16 within one unit in the last
    place of the largest value (the interpreter rounds toward zero)."""
    pytest.importorskip("triton")
    proc = subprocess.run([sys.executable, "-m", "tests.support.bias_act_checks"], cwd=ROOT, timeout=300,
                          env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(report) == 14
    assert all(report[case] == 0.0 for case in report if "float32" in case)
    assert all(report[case] <= 2 ** -7 for case in report if "bfloat16" in case)
