"""Mask R-CNN R50-FPN as the MLPerf rules fix it, built from torchvision's detection parts."""
from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
from torch import nn
from torchvision.models import resnet50
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.ops import FrozenBatchNorm2d

NUM_CLASSES_COCO = 81  # 80 categories + background


def build_model(num_classes: int = NUM_CLASSES_COCO, *, backbone_weights: Path | None,
                min_size: int = 800, max_size: int = 1333, image_candidates: int = 1000,
                rois_per_image: int = 512, test_candidates: int = 1000) -> MaskRCNN:
    """Mask R-CNN with the reference's hyperparameters.

    With `backbone_weights` (a torchvision-format ImageNet ResNet-50 state dict) BatchNorm is frozen
    and the stem and first stage stay fixed, as in the reference. Without (shapes runs, which need no
    download), the backbone starts from random weights with trainable GroupNorm: small per-GPU batches
    make BatchNorm statistics too noisy to train from scratch.
    """
    if backbone_weights is not None:
        body = resnet50(norm_layer=FrozenBatchNorm2d)
        state = torch.load(backbone_weights, map_location="cpu", weights_only=True)
        missing, unexpected = body.load_state_dict(state, strict=False)
        if [k for k in missing if not k.startswith("fc.")] or unexpected:
            raise ValueError(f"{backbone_weights} is not a torchvision ResNet-50 state dict "
                             f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
        trainable_layers = 3  # layer2..layer4: the stem and layer1 are frozen
    else:
        # Training from scratch as in He et al., "Rethinking ImageNet Pre-training": GroupNorm in the
        # backbone and FPN, residual branches starting at zero so activations don't grow with depth.
        group_norm = partial(nn.GroupNorm, 32)
        body = resnet50(norm_layer=group_norm, zero_init_residual=True)
        trainable_layers = 5
    backbone = _resnet_fpn_extractor(body, trainable_layers,
                                     norm_layer=None if backbone_weights is not None else group_norm)
    return MaskRCNN(
        backbone, num_classes=num_classes,
        min_size=min_size, max_size=max_size,  # GeneralizedRCNNTransform pads to a multiple of 32
        rpn_pre_nms_top_n_train=2000, rpn_post_nms_top_n_train=image_candidates,
        rpn_pre_nms_top_n_test=1000, rpn_post_nms_top_n_test=test_candidates,
        rpn_nms_thresh=0.7, rpn_batch_size_per_image=256, rpn_positive_fraction=0.5,
        box_batch_size_per_image=rois_per_image, box_positive_fraction=0.25,
        box_score_thresh=0.05, box_detections_per_img=100,
    )
