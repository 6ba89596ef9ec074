"""Mask R-CNN R50-FPN as the MLPerf rules fix it, built from torchvision's detection parts."""
from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torchvision.models import resnet50
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.resnet import Bottleneck, ResNet
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.models.detection.roi_heads import expand_boxes, expand_masks
from torchvision.models.detection.transform import (GeneralizedRCNNTransform, _resize_image_and_masks,
                                                    resize_keypoints)
from torchvision.ops import FrozenBatchNorm2d

from object_detection.fused import bias_act
from object_detection.sync_free import make_sync_free, on_device

NUM_CLASSES_COCO = 81  # 80 categories + background


def fold_frozen_batchnorm(module: nn.Module) -> int:
    """Apply each FrozenBatchNorm2d through the weights of the convolution before it.

    conv(x, W) * s + b == conv(x, W * s) + b for a per-channel s, so the output is the same function
    and W keeps its parametrisation and gradients (autograd carries d/dW through W * s). What goes
    away are the full-resolution multiply and add per norm layer, which under autocast ran in fp32
    with a copy back to bf16: about a third of the GPU time of a step at batch 16 on an H200.
    Modules and state-dict keys stay as they are. Returns the number of layers folded.
    """
    folded = 0
    for parent in module.modules():
        previous = None
        for child in parent.children():
            if isinstance(child, FrozenBatchNorm2d) and isinstance(previous, nn.Conv2d):
                previous.forward = _conv_with_frozen_bn(previous, child)
                child.forward = _identity
                folded += 1
            previous = child
    return folded


def _identity(x):
    return x


def _folded(conv: nn.Conv2d, bn: FrozenBatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """The weight and bias of conv followed by bn, as one convolution.

    Without autograd (evaluation) the pair is computed once and kept: recomputing it for each batch
    was ~320 of the ~1600 kernel launches of an evaluation batch. Any forward with autograd drops
    it (the optimizer steps that follow change the weights without bumping their version counter:
    fused SGD does not); load_state_dict, .to() and other in-place writes change the key.
    """
    if torch.is_grad_enabled():
        conv.__dict__.pop("_folded_cache", None)
        return _fold(conv, bn)
    key = [(t.data_ptr(), t._version, t.dtype) for t in (conv.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var)]
    cached = conv.__dict__.get("_folded_cache")
    if cached is None or cached[0] != key:
        cached = conv.__dict__["_folded_cache"] = (key, _fold(conv, bn))
    return cached[1]


def _fold(conv: nn.Conv2d, bn: FrozenBatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    scale = bn.weight * (bn.running_var + bn.eps).rsqrt()
    return conv.weight * scale.reshape(-1, 1, 1, 1), bn.bias - bn.running_mean * scale


def _conv_with_frozen_bn(conv: nn.Conv2d, bn: FrozenBatchNorm2d):
    def forward(x):
        return conv._conv_forward(x, *_folded(conv, bn))
    return forward


def fuse_bias_relu(model: nn.Module) -> int:
    """Add each convolution's bias together with what follows it (ReLU, residual) in one pass, in
    the ResNet bottlenecks and stem whose FrozenBatchNorm layers fold_frozen_batchnorm folded.

    Same function, same parameters and state dict (object_detection.fused says why it is faster).
    The heads' convolutions (RPN, FPN, mask head) are left alone: fusing them too made a training
    step at batch 16 on an H200 slower, not faster (BENCHMARKS.md). Returns the modules changed.
    """
    fused = 0
    for module in model.modules():
        if isinstance(module, Bottleneck) and _folded_pairs(module):
            module.forward = _fused_bottleneck(module)
            fused += 1
        elif _is_stem(module) and _folded_pairs(module):
            module.conv1.forward = _fused_stem(module.conv1, module.bn1)
            module.relu.forward = _identity  # the stem's own ReLU: bottlenecks have theirs
            fused += 1
    return fused


def _folded_pairs(module: nn.Module) -> bool:
    """Whether every BatchNorm directly in module (and its shortcut) was folded into a conv."""
    if _is_stem(module):
        return isinstance(module.bn1, FrozenBatchNorm2d) and module.bn1.forward is _identity
    norms = [module.bn1, module.bn2, module.bn3]
    if module.downsample is not None:
        norms.append(module.downsample[1])
    return all(isinstance(bn, FrozenBatchNorm2d) and bn.forward is _identity for bn in norms)


def _is_stem(module: nn.Module) -> bool:
    """A ResNet, or the IntermediateLayerGetter the FPN backbone wraps it in: conv1, bn1, relu."""
    return isinstance(module, (ResNet, IntermediateLayerGetter)) and all(
        hasattr(module, name) for name in ("conv1", "bn1", "relu"))


def _fused_stem(conv: nn.Conv2d, bn: FrozenBatchNorm2d):
    def forward(x):
        weight, bias = _folded(conv, bn)
        return bias_act(conv._conv_forward(x, weight, None), bias)
    return forward


def _fused_bottleneck(block: Bottleneck):
    def conv(x, conv, bn):
        weight, bias = _folded(conv, bn)
        return conv._conv_forward(x, weight, None), bias

    def forward(x):
        out = bias_act(*conv(x, block.conv1, block.bn1))
        out = bias_act(*conv(out, block.conv2, block.bn2))
        out, bias = conv(out, block.conv3, block.bn3)
        identity = x
        if block.downsample is not None:
            identity, shortcut_bias = conv(x, block.downsample[0], block.downsample[1])
            bias = bias + shortcut_bias
        return bias_act(out, bias, identity)
    return forward


def use_channels_last(model: MaskRCNN, rpn_channels_last: bool = True) -> MaskRCNN:
    """Run the backbone and FPN in channels_last (faster convolutions on tensor cores) and hand the
    heads contiguous feature maps: RoIAlign wants NCHW and would otherwise convert every level for
    each pooler, and gradients of mixed layouts meet in slow, unvectorised additions.

    With `rpn_channels_last` (the default) the RPN head takes the channels_last maps as they are
    and only the RoI heads get contiguous copies: the RPN's convolutions then skip cuDNN's layout
    conversions (+4% at batch 16 on an H200, BENCHMARKS.md)."""
    model.backbone.to(memory_format=torch.channels_last)
    inner = model.backbone.forward
    if rpn_channels_last:
        model.rpn.head.to(memory_format=torch.channels_last)
        model.backbone.forward = lambda x: inner(x.contiguous(memory_format=torch.channels_last))
        heads = model.roi_heads.forward
        model.roi_heads.forward = lambda features, *a, **k: heads(
            {name: f.contiguous() for name, f in features.items()}, *a, **k)
        return model

    def forward(x):
        return {k: v.contiguous() for k, v in inner(x.contiguous(memory_format=torch.channels_last)).items()}

    model.backbone.forward = forward
    return model


def _interpolation_matrix(start, length, size: int, out: int, limit=None):
    """Rows of bilinear weights (align_corners=False, edges clamped, as F.interpolate computes them)
    that resize a `size`-long mask axis to `length` pixels placed at `start` on an `out`-long axis
    (rows from `limit` on, where given, stay zero: they lie outside that mask's image)."""
    pixel = torch.arange(out, device=start.device, dtype=torch.float32)[None, :]
    pos = pixel - start[:, None]
    inside = (pos >= 0) & (pos < length[:, None])
    if limit is not None:
        inside &= pixel < limit[:, None]
    src = ((pos + 0.5) * (size / length[:, None]) - 0.5).clamp(min=0)
    i0 = src.floor().clamp(max=size - 1)
    frac = src - i0
    i0 = i0.long()
    i1 = (i0 + 1).clamp(max=size - 1)
    weights = torch.zeros(*src.shape, size, device=start.device)
    weights.scatter_add_(2, i0[..., None], ((1 - frac) * inside)[..., None])
    weights.scatter_add_(2, i1[..., None], (frac * inside)[..., None])
    return weights


def paste_masks(masks: torch.Tensor, boxes: torch.Tensor, image_shape: tuple[int, int], padding: int = 1):
    """torchvision's paste_masks_in_image for all detections at once.

    The same arithmetic (1-pixel padding, integer boxes, bilinear resize, paste), written as two
    batched matrix products instead of a Python loop of one resize and copy per detection, which
    made evaluation run at under 10 images/s with 100 detections per image.
    """
    return paste_masks_batch([masks], [boxes], [image_shape], padding)[0]


def paste_masks_batch(masks: list[torch.Tensor], boxes: list[torch.Tensor],
                      image_shapes: list[tuple[int, int]], padding: int = 1) -> list[torch.Tensor]:
    """paste_masks for the detections of every image of a batch in one set of kernels (per image,
    they were ~30 launches each). Image i gets a [N_i, 1, H_i, W_i] view into one
    [sum N, max H, max W] tensor, which is zero beyond each mask's own image."""
    counts = [len(m) for m in masks]
    height, width = (max(side) for side in zip(*image_shapes))
    if sum(counts) == 0:
        return [m.new_zeros((0, 1, h, w)) for m, (h, w) in zip(masks, image_shapes)]
    all_masks, scale = expand_masks(torch.cat(masks), padding=padding)
    all_boxes = expand_boxes(torch.cat(boxes), scale).to(torch.int64)
    row_limit = column_limit = None
    if len(set(map(tuple, image_shapes))) > 1:  # each mask stops at its own image's edges
        per_mask = torch.tensor([shape for n, shape in zip(counts, image_shapes) for _ in range(n)],
                                device=all_masks.device, dtype=torch.float32)
        row_limit, column_limit = per_mask[:, 0], per_mask[:, 1]
    size = all_masks.shape[-1]
    x0, y0 = all_boxes[:, 0], all_boxes[:, 1]
    w = (all_boxes[:, 2] - x0 + 1).clamp(min=1)
    h = (all_boxes[:, 3] - y0 + 1).clamp(min=1)
    with torch.autocast(all_masks.device.type, enabled=False):
        rows = _interpolation_matrix(y0.float(), h.float(), size, height, row_limit)    # N x H x size
        cols = _interpolation_matrix(x0.float(), w.float(), size, width, column_limit)  # N x W x size
        pasted = rows @ all_masks[:, 0].float() @ cols.transpose(1, 2)                  # N x H x W
    return [p[:, None, :ih, :iw] for p, (ih, iw) in zip(pasted.split(counts), image_shapes)]


def scale_boxes(boxes: torch.Tensor, original_size, new_size) -> torch.Tensor:
    """torchvision's resize_boxes with the ratios as Python numbers: it builds them as four scalar
    tensors on the GPU, and each copy there makes the host wait for the GPU (64 waits a step at
    batch 16). The ratios are the same float32 quotients, so the boxes are bit-identical."""
    ratio_h, ratio_w = (float(np.float32(new) / np.float32(old)) for new, old in zip(new_size, original_size))
    x0, y0, x1, y1 = boxes.unbind(1)
    return torch.stack((x0 * ratio_w, y0 * ratio_h, x1 * ratio_w, y1 * ratio_h), dim=1)


class DetectionTransform(GeneralizedRCNNTransform):
    """torchvision's transform without host synchronisations, and with batched mask pasting at the
    original image size."""

    def normalize(self, image: torch.Tensor) -> torch.Tensor:
        """The same arithmetic with the mean and std kept on the device: torchvision copies them
        there for every image, and each copy waits for the GPU."""
        if not image.is_floating_point():
            return super().normalize(image)  # torchvision's error
        mean, std = on_device(self, self.image_mean, image), on_device(self, self.image_std, image)
        return (image - mean[:, None, None]) / std[:, None, None]

    def resize(self, image, target=None):
        height, width = image.shape[-2:]
        if self.training:
            if getattr(self, "_skip_resize", False):
                return image, target
            size = self.torch_choice(self.min_size)
        else:
            size = self.min_size[-1]
        image, target = _resize_image_and_masks(image, size, self.max_size, target, self.fixed_size)
        if target is not None:
            target["boxes"] = scale_boxes(target["boxes"], (height, width), image.shape[-2:])
            if "keypoints" in target:
                target["keypoints"] = resize_keypoints(target["keypoints"], (height, width), image.shape[-2:])
        return image, target

    def postprocess(self, result, image_shapes, original_image_sizes):
        if self.training:
            return result
        for pred, shape, original in zip(result, image_shapes, original_image_sizes):
            pred["boxes"] = scale_boxes(pred["boxes"], shape, original)
        if result and "masks" in result[0]:
            pasted = paste_masks_batch([pred["masks"] for pred in result], [pred["boxes"] for pred in result],
                                       original_image_sizes)
            for pred, masks in zip(result, pasted):
                pred["masks"] = masks
        return result


class BatchedBalancedSampler:
    """torchvision's BalancedPositiveNegativeSampler without a host synchronisation per image.

    The same draw: per image, min(positives, batch * fraction) positives uniformly at random, then
    negatives up to the batch size. torchvision finds the candidates with torch.where (a copy to the
    host each, twice per image, in both the RPN and the RoI heads); here every image is padded into
    one tensor and a random ranking picks them, with counts that never leave the device.
    """

    def __init__(self, batch_size_per_image: int, positive_fraction: float):
        self.batch_size_per_image = batch_size_per_image
        self.positive_fraction = positive_fraction

    def padded(self, matched_idxs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Positive and negative masks, [images, longest] bool, rows padded with False."""
        matched = torch.nn.utils.rnn.pad_sequence(matched_idxs, batch_first=True, padding_value=-1)
        positive = _random_subset(matched >= 1, int(self.batch_size_per_image * self.positive_fraction))
        wanted = self.batch_size_per_image - positive.sum(dim=1, keepdim=True)
        negative = _random_subset(matched == 0, wanted)
        return positive, negative

    def __call__(self, matched_idxs: list[torch.Tensor]):
        lengths = [m.numel() for m in matched_idxs]
        positive, negative = self.padded(matched_idxs)
        return ([p[:n].to(torch.uint8) for p, n in zip(positive, lengths)],
                [q[:n].to(torch.uint8) for q, n in zip(negative, lengths)])


def _random_subset(eligible: torch.Tensor, count) -> torch.Tensor:
    """Per row, `count` eligible entries chosen uniformly at random (all of them if fewer)."""
    keys = torch.where(eligible, torch.rand(eligible.shape, device=eligible.device), -1.0)
    order = keys.argsort(dim=1, descending=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    return eligible & (rank < count)


def use_batched_sampler(model: MaskRCNN) -> MaskRCNN:
    for head in (model.rpn, model.roi_heads):
        old = head.fg_bg_sampler
        head.fg_bg_sampler = BatchedBalancedSampler(old.batch_size_per_image, old.positive_fraction)
    return model


def build_model(num_classes: int = NUM_CLASSES_COCO, *, backbone_weights: Path | None,
                min_size: int = 800, max_size: int = 1333, image_candidates: int = 1000,
                rois_per_image: int = 512, test_candidates: int = 1000, detections_per_image: int = 100,
                fold_bn: bool = True, fuse_bias: bool = True, batched_sampler: bool = True,
                sync_free: bool = True) -> MaskRCNN:
    """Mask R-CNN with the reference's hyperparameters.

    With `backbone_weights` (a torchvision-format ImageNet ResNet-50 state dict) BatchNorm is frozen
    and the stem and first stage stay fixed, as in the reference; `fold_bn` folds the frozen
    BatchNorm into the convolutions, `fuse_bias` then adds the backbone's biases with what
    follows them in one pass. Without (shapes runs, which need no
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
        if fold_bn:
            fold_frozen_batchnorm(body)
    else:
        # Training from scratch as in He et al., "Rethinking ImageNet Pre-training": GroupNorm in the
        # backbone and FPN, residual branches starting at zero so activations don't grow with depth.
        group_norm = partial(nn.GroupNorm, 32)
        body = resnet50(norm_layer=group_norm, zero_init_residual=True)
        trainable_layers = 5
    backbone = _resnet_fpn_extractor(body, trainable_layers,
                                     norm_layer=None if backbone_weights is not None else group_norm)
    model = MaskRCNN(
        backbone, num_classes=num_classes,
        min_size=min_size, max_size=max_size,  # GeneralizedRCNNTransform pads to a multiple of 32
        rpn_pre_nms_top_n_train=2000, rpn_post_nms_top_n_train=image_candidates,
        rpn_pre_nms_top_n_test=1000, rpn_post_nms_top_n_test=test_candidates,
        rpn_nms_thresh=0.7, rpn_batch_size_per_image=256, rpn_positive_fraction=0.5,
        box_batch_size_per_image=rois_per_image, box_positive_fraction=0.25,
        box_score_thresh=0.05, box_detections_per_img=detections_per_image,
    )
    t = model.transform
    model.transform = DetectionTransform(t.min_size, t.max_size, t.image_mean, t.image_std,
                                         size_divisible=t.size_divisible, fixed_size=t.fixed_size)
    if fuse_bias:
        fuse_bias_relu(model)
    if sync_free:  # implies the batched sampler
        make_sync_free(model)
    elif batched_sampler:
        use_batched_sampler(model)
    return model
