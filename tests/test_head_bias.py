"""fast.Options.head_bias_act: the FPN's, RPN head's and mask head's convolution biases and ReLUs
added by fast.bias_act (fast.head_bias) compute what torchvision's blocks compute."""
from __future__ import annotations

import copy
from types import SimpleNamespace

import torch
import torchvision
from torch import nn
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.misc import Conv2dNormActivation

from object_detection.fast import options_for
from object_detection.fast.head_bias import BiasActConvBlock, biased_conv_block, use_head_bias_act
from object_detection.model import build_model


def test_only_plain_biased_convolution_blocks_are_taken():
    assert biased_conv_block(Conv2dNormActivation(4, 4, norm_layer=None)) is True
    assert biased_conv_block(Conv2dNormActivation(4, 4, norm_layer=None, activation_layer=None)) is False
    assert biased_conv_block(Conv2dNormActivation(4, 4)) is None  # a norm, and so no bias
    assert biased_conv_block(Conv2dNormActivation(4, 4, norm_layer=None, activation_layer=nn.SiLU)) is None
    assert biased_conv_block(nn.Conv2d(4, 4, 3)) is None


def test_the_heads_compute_the_same_values_and_gradients():
    """torchvision's FPN, RPN head and mask head (the closed profile's, at 16 channels) with and without
    the lever, in float64: the FPN's four lateral and four output convolutions and the RPN and mask
    heads' five convolution-ReLU pairs switch; the same outputs and the same gradient for every
    parameter and input."""
    torch.manual_seed(0)
    heads = SimpleNamespace(
        backbone=SimpleNamespace(fpn=FeaturePyramidNetwork([8, 16, 32, 64], 16)),
        rpn=SimpleNamespace(head=RPNHead(16, 3)),
        roi_heads=SimpleNamespace(mask_head=MaskRCNNHeads(16, [16] * 4, 1), has_mask=lambda: True))
    for module in (heads.backbone.fpn, heads.rpn.head, heads.roi_heads.mask_head):
        for p in module.parameters():
            nn.init.normal_(p, std=0.3)  # biases far from zero, so a missed one shows
    plain = copy.deepcopy(heads)
    assert use_head_bias_act(heads) == 13
    g = torch.Generator().manual_seed(1)
    maps = {f"c{i}": torch.randn(2, c, 32 >> i, 40 >> i, generator=g, dtype=torch.float64)
            for i, c in enumerate([8, 16, 32, 64])}
    rois = torch.randn(5, 16, 14, 14, generator=g, dtype=torch.float64)

    def run(model):
        fpn, rpn, mask = (m.double() for m in (model.backbone.fpn, model.rpn.head, model.roi_heads.mask_head))
        inputs = {k: v.clone().requires_grad_() for k, v in maps.items()}
        pooled = rois.clone().requires_grad_()
        features = list(fpn(inputs).values())
        logits, deltas = rpn(features)
        outputs = [*features, *logits, *deltas, mask(pooled)]
        sum((o * torch.linspace(-1, 1, o.numel(), dtype=o.dtype).view_as(o)).sum() for o in outputs).backward()
        grads = [p.grad for m in (fpn, rpn, mask) for p in m.parameters()]
        return outputs + grads + [i.grad for i in inputs.values()] + [pooled.grad]

    for got, expected in zip(run(heads), run(plain), strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


def test_the_lever_reaches_the_models_heads(tmp_path):
    """`--speed fast-with:head_bias_act` on the frozen-BatchNorm model (its FPN has no norm, so its
    convolutions have biases): 13 blocks switch, 5 of them with their ReLU."""
    weights = tmp_path / "resnet50.pth"
    torch.save(torchvision.models.resnet50().state_dict(), weights)
    model = build_model(81, backbone_weights=weights, min_size=96, max_size=128,
                        speed=options_for("fast-with:head_bias_act", "cpu"))
    switched = [m for m in model.modules() if type(m) is BiasActConvBlock]
    assert len(switched) == 13 and sum(m._relu for m in switched) == 5
