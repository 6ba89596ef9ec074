"""The MLPerf reference's Mask R-CNN (maskrcnn-benchmark, as mlcommons/training object_detection and
NVIDIA's submissions run it) where it differs from torchvision's, as torchvision subclasses that
read their settings from attributes (`recipe.Recipe` says which):

- the backbone: Detectron's MSRA R-50 (`R-50.pkl`), read by an unpickler that builds numpy arrays
  and nothing else, into a ResNet-50 whose bottlenecks stride in the 1x1 convolution, with frozen
  BatchNorm from the file's scale and bias (no epsilon: the reference's FrozenBatchNorm2d has none);
- anchors: Detectron's cell anchors (a stride-sized base box centred at (stride-1)/2, rounded
  widths and heights per aspect ratio), on the fixed strides 4-64;
- boxes x0..x1 are x1 - x0 + 1 wide (`box_offset`): the box coder's encoding and decoding;
- the RPN ignores anchors that cross the image border (STRADDLE_THRESH 0) and, in training, keeps
  the top (n x images) proposals over the whole per-GPU batch instead of n per image;
- the box head's smooth-L1 has beta 1 (the RPN's stays 1/9), and the heads start from the
  reference's initialisation.

The speed code (object_detection.fast) layers its classes over these and honours the same
attributes, so the fast model computes the same function (tests/test_reference.py).
"""
from __future__ import annotations

import collections
import pickle
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import resnet50
from torchvision.models.detection._utils import BoxCoder
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork, concat_box_prediction_layers
from torchvision.ops import FrozenBatchNorm2d

from object_detection.fast.patch import swap
from object_detection.mask_targets import mask_loss
from object_detection.recipe import MSRA_PIXEL_MEAN_BGR, Recipe

ANCHOR_SIZES = (32, 64, 128, 256, 512)
ANCHOR_STRIDES = (4, 8, 16, 32, 64)
ASPECT_RATIOS = (0.5, 1.0, 2.0)


class BackboneFileError(ValueError):
    """A backbone weights file that is not what it claims to be; the message is one line."""


# ---------------------------------------------------------------- the MSRA R-50 file

_NUMPY_GLOBALS = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                  ("numpy", "ndarray"), ("numpy", "dtype"),
                  ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
                  ("_codecs", "encode")}  # how protocol 2 writes an array's bytes from Python 3


class _ArraysOnly(pickle.Unpickler):
    """Builds numpy arrays, dicts, lists, strings and numbers; any other global a pickle names (the
    way a pickle runs code: os.system, builtins.eval, ...) is refused before it is looked up."""

    def find_class(self, module: str, name: str):
        if (module, name) not in _NUMPY_GLOBALS:
            raise BackboneFileError(f"it asks to build {module}.{name}, which a file of weights never needs "
                                    "(refused: a pickle that names other objects can run code)")
        return super().find_class(module, name)


def read_msra_pickle(path: Path) -> dict[str, np.ndarray]:
    """Detectron's weights pickle (a dict of blob name -> array, or such a dict under "blobs";
    written by Python 2, so strings are read as latin-1) as numeric arrays by name, momentum
    blobs left out. Anything else in the file is a BackboneFileError."""
    try:
        with open(path, "rb") as handle:
            doc = _ArraysOnly(handle, encoding="latin1").load()
    except BackboneFileError as bad:
        raise BackboneFileError(f"{path} is not a weights file: {bad}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as bad:
        raise BackboneFileError(f"{path} is not a readable weights pickle ({type(bad).__name__}: "
                                f"{str(bad)[:120]})") from None
    blobs = doc.get("blobs", doc) if isinstance(doc, dict) else None
    if not isinstance(blobs, dict):
        raise BackboneFileError(f"{path} holds a {type(doc).__name__}, not a dict of weight arrays")
    arrays = {}
    for name, value in blobs.items():
        if not isinstance(name, str) or name.endswith("_momentum"):
            continue
        if not isinstance(value, np.ndarray) or value.dtype.kind not in "fiu":
            raise BackboneFileError(f"{path}: blob {name[:60]!r} is a {type(value).__name__}, not a numeric array")
        arrays[name] = value
    return arrays


def _msra_names() -> dict[str, str]:
    """torchvision ResNet-50 parameter name -> Detectron blob name."""
    names = {"conv1.weight": "conv1_w", "bn1.weight": "res_conv1_bn_s", "bn1.bias": "res_conv1_bn_b"}
    for stage, blocks in zip(range(2, 6), (3, 4, 6, 3)):
        for block in range(blocks):
            ours, theirs = f"layer{stage - 1}.{block}", f"res{stage}_{block}"
            for conv, branch in (("1", "2a"), ("2", "2b"), ("3", "2c")):
                names[f"{ours}.conv{conv}.weight"] = f"{theirs}_branch{branch}_w"
                names[f"{ours}.bn{conv}.weight"] = f"{theirs}_branch{branch}_bn_s"
                names[f"{ours}.bn{conv}.bias"] = f"{theirs}_branch{branch}_bn_b"
            if block == 0:
                names[f"{ours}.downsample.0.weight"] = f"{theirs}_branch1_w"
                names[f"{ours}.downsample.1.weight"] = f"{theirs}_branch1_bn_s"
                names[f"{ours}.downsample.1.bias"] = f"{theirs}_branch1_bn_b"
    return names


def msra_state_dict(arrays: dict[str, np.ndarray], shapes: dict[str, torch.Size], source: str) -> dict:
    """The ResNet-50 state dict from Detectron blobs: conv1's input channels reversed (the file's
    network reads BGR; ours gets RGB, so the same function), frozen BatchNorm as scale and bias
    with mean 0 and variance 1."""
    state = {}
    for ours, theirs in _msra_names().items():
        if theirs not in arrays:
            raise BackboneFileError(f"{source} has no blob {theirs!r}: not Detectron's MSRA R-50 "
                                    f"(R-50.pkl, catalog://ImageNetPretrained/MSRA/R-50)")
        value = torch.from_numpy(np.ascontiguousarray(arrays[theirs], dtype=np.float32))
        if ours == "conv1.weight":
            value = value.flip(1).contiguous()
        if value.shape != shapes[ours]:
            raise BackboneFileError(f"{source}: blob {theirs!r} has shape {tuple(value.shape)}, a ResNet-50's "
                                    f"{ours} has {tuple(shapes[ours])}")
        state[ours] = value
        if ours.endswith(".bias") and ("bn" in ours or "downsample.1" in ours):
            stem = ours[: -len("bias")]
            state[stem + "running_mean"] = torch.zeros_like(value)
            state[stem + "running_var"] = torch.ones_like(value)
    return state


def stride_in_1x1(body: nn.Module) -> nn.Module:
    """Move each stage's stride from the 3x3 convolution (torchvision) to the 1x1 before it
    (Detectron's MSRA models, STRIDE_IN_1X1): the weights' shapes stay, the function changes."""
    for layer in (body.layer2, body.layer3, body.layer4):
        first = layer[0]
        first.conv1.stride, first.conv2.stride = first.conv2.stride, (1, 1)
    return body


def msra_resnet50(weights: Path) -> nn.Module:
    """The reference's ResNet-50 from Detectron's R-50.pkl."""
    body = stride_in_1x1(resnet50(norm_layer=partial(FrozenBatchNorm2d, eps=0.0)))
    shapes = {name: value.shape for name, value in body.state_dict().items()}
    state = msra_state_dict(read_msra_pickle(weights), shapes, str(weights))
    missing, unexpected = body.load_state_dict(state, strict=False)
    if [k for k in missing if not k.startswith("fc.")] or unexpected:  # the classifier is not used
        raise BackboneFileError(f"{weights}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return body


def input_normalisation(recipe: Recipe) -> dict:
    """The model transform's image_mean and image_std for images in [0, 1], RGB. "BGR255": the
    reference's BGR 0-255 minus the pixel mean, std 1 — as 255 * x - mean, in RGB order (conv1's
    input channels are reversed at conversion)."""
    if recipe.input == "BGR255":
        return {"image_mean": [m / 255 for m in reversed(MSRA_PIXEL_MEAN_BGR)], "image_std": [1 / 255] * 3}
    return {}


# ---------------------------------------------------------------- anchors and box coding


def cell_anchors(stride: int, size: int, ratios=ASPECT_RATIOS) -> torch.Tensor:
    """Detectron's anchors of one level around the origin cell: for each aspect ratio, the base box
    [0, 0, stride-1, stride-1] reshaped to that ratio with rounded sides, then scaled to `size`,
    centred at ((stride-1)/2, (stride-1)/2); corners inclusive (+1 widths)."""
    centre = (stride - 1) / 2
    anchors = []
    for ratio in ratios:
        w = np.round(np.sqrt(stride * stride / ratio))
        h = np.round(w * ratio)
        w, h = w * size / stride, h * size / stride
        anchors.append([centre - (w - 1) / 2, centre - (h - 1) / 2, centre + (w - 1) / 2, centre + (h - 1) / 2])
    return torch.tensor(anchors, dtype=torch.float32)


class ReferenceAnchorGenerator(AnchorGenerator):
    """Detectron's cell anchors on the fixed strides of the FPN levels. (torchvision centres its
    anchors at 0 and takes a level's stride as the padded size // the map size, 61 instead of 64
    for P6 of an 800-pixel side.)"""

    def __init__(self, sizes=ANCHOR_SIZES, strides=ANCHOR_STRIDES, ratios=ASPECT_RATIOS):
        super().__init__(tuple((s,) for s in sizes), (tuple(ratios),) * len(sizes))
        self.fixed_strides = tuple(strides)
        self.cell_anchors = [cell_anchors(stride, size, ratios) for stride, size in zip(strides, sizes)]
        self._kept: collections.OrderedDict = collections.OrderedDict()

    # The anchors of the last few map sizes are kept: they depend on nothing else, and making them
    # was ~50 operators a step. A batch's padded size is a multiple of 32 between the recipe's
    # bounds, so a run sees a few dozen map sizes, the most frequent again and again; each kept
    # set is ~1.6 MB at 800x1344.
    KEPT_SIZES = 32

    def forward(self, image_list, feature_maps):
        # float32 whatever autocast made the feature maps: in bfloat16 a coordinate near 1300 moves
        # in steps of 8 pixels
        dtype, device = torch.float32, feature_maps[0].device
        key = (tuple(tuple(feature_map.shape[-2:]) for feature_map in feature_maps), device)
        everything = self._kept.get(key)
        if everything is None:
            everything = self._kept[key] = self.anchors(key[0], dtype, device)
            if len(self._kept) > self.KEPT_SIZES:
                self._kept.popitem(last=False)
        else:
            self._kept.move_to_end(key)
        return [everything for _ in image_list.image_sizes]

    def anchors(self, grid_sizes, dtype, device) -> torch.Tensor:
        """Every level's anchors, location-major and ratio-minor, one level after another."""
        # Python ints, not tensors made on the device: each torch.tensor(s, device=cuda) is a copy the
        # host waits for (5 a step); the grid's arange times an int gives the same int32 shifts.
        strides = [[s, s] for s in self.fixed_strides]
        self.set_cell_anchors(dtype, device)
        with torch.inference_mode(False):  # kept for training steps whatever asked first
            return torch.cat(self.grid_anchors(grid_sizes, strides))


class ReferenceBoxCoder(BoxCoder):
    """The box coder with the reference's +1 widths (`offset`): a box x0..x1 is x1 - x0 + offset
    wide, its centre x0 + width / 2, and a decoded box ends at centre + width / 2 - offset."""

    offset = 1

    def encode_single(self, reference_boxes, proposals):
        return encode_with_offset(reference_boxes, proposals, self.weights, self.offset)

    def decode_single(self, rel_codes, boxes):
        return decode_with_offset(rel_codes, boxes, self.weights, self.bbox_xform_clip, self.offset)


def encode_with_offset(reference_boxes, proposals, weights, offset: float):
    wx, wy, ww, wh = weights
    ex_w = proposals[:, 2] - proposals[:, 0] + offset
    ex_h = proposals[:, 3] - proposals[:, 1] + offset
    gt_w = reference_boxes[:, 2] - reference_boxes[:, 0] + offset
    gt_h = reference_boxes[:, 3] - reference_boxes[:, 1] + offset
    dx = wx * ((reference_boxes[:, 0] + 0.5 * gt_w) - (proposals[:, 0] + 0.5 * ex_w)) / ex_w
    dy = wy * ((reference_boxes[:, 1] + 0.5 * gt_h) - (proposals[:, 1] + 0.5 * ex_h)) / ex_h
    return torch.stack((dx, dy, ww * torch.log(gt_w / ex_w), wh * torch.log(gt_h / ex_h)), dim=1)


def decode_with_offset(rel_codes, boxes, weights, clip: float, offset: float):
    """Decoded in float32 (reduced-precision codes under autocast included), as the reference does."""
    rel_codes, boxes = rel_codes.float(), boxes.float()
    widths = boxes[:, 2] - boxes[:, 0] + offset
    heights = boxes[:, 3] - boxes[:, 1] + offset
    ctr_x = boxes[:, 0] + 0.5 * widths
    ctr_y = boxes[:, 1] + 0.5 * heights
    wx, wy, ww, wh = weights
    dx = rel_codes[:, 0::4] / wx
    dy = rel_codes[:, 1::4] / wy
    dw = torch.clamp(rel_codes[:, 2::4] / ww, max=clip)
    dh = torch.clamp(rel_codes[:, 3::4] / wh, max=clip)
    pred_ctr_x = dx * widths[:, None] + ctr_x[:, None]
    pred_ctr_y = dy * heights[:, None] + ctr_y[:, None]
    half_w = 0.5 * (torch.exp(dw) * widths[:, None])
    half_h = 0.5 * (torch.exp(dh) * heights[:, None])
    return torch.stack((pred_ctr_x - half_w, pred_ctr_y - half_h, pred_ctr_x + half_w - offset,
                        pred_ctr_y + half_h - offset), dim=2).flatten(1)


# ---------------------------------------------------------------- the RPN


def visible_anchors(anchors: torch.Tensor, image_size: tuple[int, int], thresh: float) -> torch.Tensor:
    """Anchors inside the image (its size before padding) up to `thresh` pixels, as the reference's
    add_visibility_to: x0, y0 >= -thresh and x1 < width + thresh, y1 < height + thresh."""
    height, width = image_size
    return ((anchors[:, 0] >= -thresh) & (anchors[:, 1] >= -thresh)
            & (anchors[:, 2] < width + thresh) & (anchors[:, 3] < height + thresh))


def ignore_straddling(labels: list[torch.Tensor], anchors: list[torch.Tensor], image_sizes, thresh) -> list:
    """Anchors that cross the border neither train nor count as negatives (label -1)."""
    if thresh is None:
        return labels
    return [image_labels.masked_fill(~visible_anchors(a, size, thresh), -1)
            for image_labels, a, size in zip(labels, anchors, image_sizes)]


def batch_top(scores: list[torch.Tensor], n: int) -> list[torch.Tensor]:
    """Masks of the `n` best scores over all images together (the reference's
    select_over_all_levels in training: FPN_POST_NMS_TOP_N_TRAIN over the per-GPU batch)."""
    flat = torch.cat(scores)
    chosen = torch.zeros_like(flat, dtype=torch.bool)
    chosen[flat.topk(min(n, flat.numel())).indices] = True
    return list(chosen.split([len(s) for s in scores]))


class ReferenceRPN(RegionProposalNetwork):
    """torchvision's RPN with the reference's border filter (`straddle_thresh`) and, in training,
    its proposal selection over the per-GPU batch (`proposals_per == "batch"`)."""

    straddle_thresh: float | None = None
    proposals_per: str = "image"

    def ignore_straddling(self, labels: list[torch.Tensor], anchors: list[torch.Tensor], image_sizes) -> list:
        return ignore_straddling(labels, anchors, image_sizes, self.straddle_thresh)

    def forward(self, images, features, targets=None):
        features = list(features.values())
        objectness, pred_bbox_deltas = self.head(features)
        anchors = self.anchor_generator(images, features)
        num_images = len(anchors)
        num_anchors_per_level = [o[0].numel() for o in objectness]
        objectness, pred_bbox_deltas = concat_box_prediction_layers(objectness, pred_bbox_deltas)
        proposals = self.box_coder.decode(pred_bbox_deltas.detach(), anchors).view(num_images, -1, 4)
        boxes, scores = self.filter_proposals(proposals, objectness, images.image_sizes, num_anchors_per_level)
        losses = {}
        if self.training:
            if targets is None:
                raise ValueError("targets should not be None")
            labels, matched_gt_boxes = self.assign_targets_to_anchors(anchors, targets)
            labels = self.ignore_straddling(labels, anchors, images.image_sizes)
            regression_targets = self.box_coder.encode(matched_gt_boxes, anchors)
            loss_objectness, loss_rpn_box_reg = self.compute_loss(objectness, pred_bbox_deltas, labels,
                                                                  regression_targets)
            losses = {"loss_objectness": loss_objectness, "loss_rpn_box_reg": loss_rpn_box_reg}
        return boxes, losses

    def filter_proposals(self, proposals, objectness, image_shapes, num_anchors_per_level):
        if not (self.training and self.proposals_per == "batch"):
            return super().filter_proposals(proposals, objectness, image_shapes, num_anchors_per_level)
        per_image = self._post_nms_top_n["training"]
        self._post_nms_top_n["training"] = proposals.shape[1]  # every survivor of each image's NMS
        try:
            boxes, scores = super().filter_proposals(proposals, objectness, image_shapes, num_anchors_per_level)
        finally:
            self._post_nms_top_n["training"] = per_image
        keep = batch_top(scores, per_image * len(boxes))
        return [b[k] for b, k in zip(boxes, keep)], [s[k] for s, k in zip(scores, keep)]


# ---------------------------------------------------------------- the RoI heads


def fastrcnn_loss(class_logits, box_regression, labels, regression_targets, beta: float):
    """torchvision's fastrcnn_loss with the smooth-L1 beta as a parameter (torchvision fixes 1/9;
    the reference's box head has 1)."""
    labels = torch.cat(labels)
    regression_targets = torch.cat(regression_targets)
    classification_loss = F.cross_entropy(class_logits, labels)
    positive = torch.where(labels > 0)[0]
    n = class_logits.shape[0]
    box_regression = box_regression.reshape(n, box_regression.size(-1) // 4, 4)
    box_loss = F.smooth_l1_loss(box_regression[positive, labels[positive]], regression_targets[positive],
                                beta=beta, reduction="sum")
    return classification_loss, box_loss / labels.numel()


class ReferenceRoIHeads(RoIHeads):
    """torchvision's RoI heads, training with the box-head loss's beta of the recipe."""

    box_loss_beta: float = 1.0 / 9
    draw_mask_targets = None  # polygon targets by mask_targets.draw_in_chunks; fast.mask_targets_kernel: one kernel

    def check_targets(self, targets):
        """torchvision's checks; an image's mask targets may come as polygons (mask_targets.mask_loss)."""
        if targets is not None:
            targets = [{**t, "masks": None} if "polygon_edges" in t else t for t in targets]
        super().check_targets(targets)

    def forward(self, features, proposals, image_shapes, targets=None):
        if not self.training or self.keypoint_roi_pool is not None:
            return super().forward(features, proposals, image_shapes, targets)
        proposals, matched_idxs, labels, regression_targets = self.select_training_samples(proposals, targets)
        box_features = self.box_head(self.box_roi_pool(features, proposals, image_shapes))
        class_logits, box_regression = self.box_predictor(box_features)
        loss_classifier, loss_box_reg = fastrcnn_loss(class_logits, box_regression, labels, regression_targets,
                                                      self.box_loss_beta)
        losses = {"loss_classifier": loss_classifier, "loss_box_reg": loss_box_reg}
        if self.has_mask():
            positive = [torch.where(image_labels > 0)[0] for image_labels in labels]
            mask_proposals = [p[i] for p, i in zip(proposals, positive)]
            positive_matches = [m[i] for m, i in zip(matched_idxs, positive)]
            mask_logits = self.mask_predictor(self.mask_head(self.mask_roi_pool(features, mask_proposals,
                                                                                image_shapes)))
            losses["loss_mask"] = mask_loss(mask_logits, mask_proposals, targets, positive_matches, image_shapes,
                                          self.draw_mask_targets)
        return [], losses


# ---------------------------------------------------------------- the whole model


def initialise_heads(model) -> None:
    """The reference's initialisation where torchvision's differs: the box head's fc6/fc7 as
    Caffe2's XavierFill (kaiming_uniform a=1), cls_score N(0, 0.01), bbox_pred N(0, 0.001), the
    mask predictor's biases 0; every bias of these 0. (FPN, RPN head and mask head convolutions
    start the same way in both.)"""
    head, predictor = model.roi_heads.box_head, model.roi_heads.box_predictor
    for fc in (head.fc6, head.fc7):
        nn.init.kaiming_uniform_(fc.weight, a=1)
        nn.init.zeros_(fc.bias)
    nn.init.normal_(predictor.cls_score.weight, std=0.01)
    nn.init.normal_(predictor.bbox_pred.weight, std=0.001)
    for layer in (predictor.cls_score, predictor.bbox_pred):
        nn.init.zeros_(layer.bias)
    for name, parameter in model.roi_heads.mask_predictor.named_parameters():
        if name.endswith("bias"):
            nn.init.zeros_(parameter)


def apply_recipe(model, recipe: Recipe):
    """Make a built torchvision Mask R-CNN compute as `recipe` says (the backbone and input are
    the builder's). torchvision's recipe leaves it as it is."""
    if recipe.anchors == "maskrcnn-benchmark":
        sizes = [s[0] for s in model.rpn.anchor_generator.sizes]
        model.rpn.anchor_generator = ReferenceAnchorGenerator(sizes)
    if recipe.box_offset:
        for coder in (model.rpn.box_coder, model.roi_heads.box_coder):
            swap(coder, ReferenceBoxCoder)
    if recipe.straddle_thresh is not None or recipe.proposals_per != "image":
        swap(model.rpn, ReferenceRPN)
        model.rpn.straddle_thresh = recipe.straddle_thresh
        model.rpn.proposals_per = recipe.proposals_per
    if recipe.box_loss_beta != 1.0 / 9:
        swap(model.roi_heads, ReferenceRoIHeads)
        model.roi_heads.box_loss_beta = recipe.box_loss_beta
    if recipe.rpn_loss_beta != 1.0 / 9:
        raise ValueError(f"recipe {recipe.name}: the RPN's smooth-L1 beta is 1/9 in both implementations")
    if recipe.heads_init == "reference":
        initialise_heads(model)
    if recipe.resize != "scale":
        from object_detection.transform import use_reference_transform

        use_reference_transform(model.transform, recipe)
    return model


def msra_blobs(state: dict) -> dict[str, np.ndarray]:
    """Detectron's blobs of a torchvision ResNet-50 state dict (BatchNorm as scale and bias, conv1
    back to BGR): the inverse of msra_state_dict, to write R-50.pkl files of other weights
    (benchmarks, tests)."""
    blobs = {}
    for ours, theirs in _msra_names().items():
        stem, kind = ours.rsplit(".", 1)
        if f"{stem}.running_var" in state:
            scale = state[f"{stem}.weight"] * (state[f"{stem}.running_var"] + 1e-5).rsqrt()
            value = scale if kind == "weight" else state[f"{stem}.bias"] - state[f"{stem}.running_mean"] * scale
        else:
            value = state[ours].flip(1) if ours == "conv1.weight" else state[ours]
        blobs[theirs] = value.detach().cpu().numpy().astype(np.float32)
    return blobs
