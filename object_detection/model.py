"""Mask R-CNN R50-FPN as the MLPerf rules fix it, built from torchvision's public detection parts,
then made faster by object_detection.fast (same function, one switch); and the small Mask R-CNN the
CPU demonstration trains (MODELS)."""
from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
from torch import nn
from torchvision.models import resnet18, resnet50
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops import FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from object_detection import fast
from object_detection.recipe import RECIPES, Recipe

NUM_CLASSES_COCO = 81  # 80 categories + background
# "r50-fpn": MLPerf's Mask R-CNN, every GPU profile's. "r18-fpn-slim": a small one from the same parts
# (ResNet-18 body, 64-channel FPN, slim heads, anchors for 100-pixel images) that learns the shapes
# set in a minute on two CPU cores, where the MLPerf model runs 1 image/s and cannot; open division.
MODELS = ("r50-fpn", "r18-fpn-slim")


def resnet_fpn(body: nn.Module, trainable_layers: int, norm_layer=None, out_channels: int = 256) -> BackboneWithFPN:
    """A ResNet body with an FPN on its four stages (P2-P5 and a max-pooled P6), the stages before
    the last `trainable_layers` frozen: what torchvision's resnet_fpn_backbone builds, for a body
    that is already made (and loaded)."""
    trainable = ["layer4", "layer3", "layer2", "layer1", "conv1"][:trainable_layers]
    if trainable_layers == 5:
        trainable.append("bn1")
    for name, parameter in body.named_parameters():
        if not any(name.startswith(layer) for layer in trainable):
            parameter.requires_grad_(False)
    stage2 = body.inplanes // 8  # the channels of layer1's output
    return BackboneWithFPN(body, {"layer1": "0", "layer2": "1", "layer3": "2", "layer4": "3"},
                           [stage2 * 2 ** i for i in range(4)], out_channels,
                           extra_blocks=LastLevelMaxPool(), norm_layer=norm_layer)


def imagenet_resnet50(weights: Path) -> nn.Module:
    """torchvision's ResNet-50 with frozen BatchNorm, from an ImageNet state dict file."""
    body = resnet50(norm_layer=FrozenBatchNorm2d)
    state = torch.load(weights, map_location="cpu", weights_only=True)
    missing, unexpected = body.load_state_dict(state, strict=False)
    if [k for k in missing if not k.startswith("fc.")] or unexpected:
        raise ValueError(f"{weights} is not a torchvision ResNet-50 state dict "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return body


def slim_parts(num_classes: int) -> dict:
    """The small model's backbone and heads, as MaskRCNN's keyword arguments."""
    group_norm = partial(nn.GroupNorm, 32)
    backbone = resnet_fpn(resnet18(norm_layer=group_norm, zero_init_residual=True), 5, group_norm,
                          out_channels=64)
    sizes = ((8,), (16,), (32,), (64,), (128,))  # the shapes set's objects are 10-60 px across
    return {"backbone": backbone, "rpn_anchor_generator": AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes)),
            "box_head": TwoMLPHead(64 * 7 * 7, 256), "box_predictor": FastRCNNPredictor(256, num_classes),
            "mask_head": MaskRCNNHeads(64, (64, 64), 1), "mask_predictor": MaskRCNNPredictor(64, 64, num_classes),
            "num_classes": None}


def build_model(num_classes: int = NUM_CLASSES_COCO, *, backbone_weights: Path | None,
                min_size: int = 800, max_size: int = 1333, proposals_per_image: int = 1000,
                rois_per_image: int = 512, test_candidates: int = 1000, detections_per_image: int = 100,
                speed: fast.Options = fast.Options(), model: str = "r50-fpn",
                recipe: Recipe = RECIPES["torchvision"]) -> MaskRCNN:
    """Mask R-CNN with the reference's hyperparameters, computing as `recipe` says
    (object_detection.reference), then `fast.apply(model, speed)`.

    With `backbone_weights` BatchNorm is frozen and the stem and first stage stay fixed, as in the
    reference: the reference recipe reads Detectron's MSRA R-50 (R-50.pkl), torchvision's an
    ImageNet state dict. Without (shapes runs, which need no download), the backbone starts from
    random weights with trainable GroupNorm: small per-GPU batches make BatchNorm statistics too
    noisy to train from scratch.
    """
    from object_detection import reference

    if model not in MODELS:
        raise ValueError(f"model {model!r} is not one of {MODELS}")
    if model == "r18-fpn-slim":
        parts = slim_parts(num_classes)
    elif backbone_weights is not None and recipe.backbone == "msra-r50":
        parts = {"backbone": resnet_fpn(reference.msra_resnet50(backbone_weights), 3)}  # layer2..layer4 train
    elif backbone_weights is not None:
        parts = {"backbone": resnet_fpn(imagenet_resnet50(backbone_weights), 3)}
    else:
        # Training from scratch as in He et al., "Rethinking ImageNet Pre-training": GroupNorm in the
        # backbone and FPN, residual branches starting at zero so activations don't grow with depth.
        group_norm = partial(nn.GroupNorm, 32)
        body = resnet50(norm_layer=group_norm, zero_init_residual=True)
        parts = {"backbone": resnet_fpn(reference.stride_in_1x1(body) if recipe.stride_in_1x1 else body, 5,
                                        group_norm)}
    built = MaskRCNN(
        **{"num_classes": num_classes, **parts},
        min_size=min_size, max_size=max_size,  # GeneralizedRCNNTransform pads to a multiple of 32
        rpn_pre_nms_top_n_train=2000, rpn_post_nms_top_n_train=proposals_per_image,
        rpn_pre_nms_top_n_test=1000, rpn_post_nms_top_n_test=test_candidates,
        rpn_nms_thresh=0.7, rpn_batch_size_per_image=256, rpn_positive_fraction=0.5,
        box_batch_size_per_image=rois_per_image, box_positive_fraction=0.25,
        box_score_thresh=0.05, box_detections_per_img=detections_per_image,
        **reference.input_normalisation(recipe),
    )
    return fast.apply(reference.apply_recipe(built, recipe), speed)
