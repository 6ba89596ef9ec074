"""torchvision's Mask R-CNN training path with its host synchronisations taken out.

Every `torch.where(mask)`, boolean-mask assignment, `.item()`, `torch.unique` and NMS in
torchvision's per-image loops makes the CPU wait for the GPU to drain its queue before it can
issue the next kernel. A step at batch 16 had about 300 of them, which left the H200 idle for a
fifth of the step. The replacements below compute the same function (up to the order of sums and
of score ties) with a handful of synchronisations per step:

- RPN proposal filtering: torchvision runs, per image, a `torch.where` for small boxes, one for
  the score threshold, then `batched_nms`, which above 5000 boxes falls back to a `torch.unique`
  plus one `torch.where` and one NMS per level: about 17 waits per image. Here every (image,
  level) group is suppressed at once by `greedy_nms` (fast.nms), an exact greedy NMS computed as a
  fixed point on the GPU, with one wait per batch.
- Matchers, label assignment, samplers and losses use masks and `torch.where(cond, a, b)` instead of
  index lists; the sampled RoIs of each image are ordered positives first, so the mask branch
  takes its positives as slices instead of one `torch.where` per image.
- Multi-scale RoIAlign splits RoIs by level with one count per call instead of one `torch.where`
  per level; the box coder keeps its constants on the device instead of copying them there on
  every call (each such copy also waits; fast.transform does the same for normalisation and box
  scaling).
- Evaluation: detections of every (image, class) are suppressed at once by `greedy_nms` too,
  instead of torchvision's two `torch.where` per image and, above 5000 candidates, one NMS per class.

fast.padded_heads takes the training forward down to one wait.

`tests/test_sync_free.py` checks each piece against torchvision's on the CPU;
`benchmarks/train_throughput.py --check` checks the whole step on the GPU.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection._utils import BoxCoder, Matcher, encode_boxes
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork
from torchvision.ops import boxes as box_ops
from torchvision.ops import roi_align
from torchvision.ops.poolers import MultiScaleRoIAlign, _convert_to_roi_format, _filter_input, _setup_scales

from object_detection.fast.mask_branch import mask_logits
from object_detection.fast.nms import greedy_nms
from object_detection.fast.patch import DeviceConstants, host_values, mix_in, swap
from object_detection.fast.sampler import pad_rows, use_batched_sampler
from object_detection.mask_targets import mask_loss

# ---------------------------------------------------------------- box coding


class SyncFreeBoxCoder(DeviceConstants, BoxCoder):
    """torchvision's BoxCoder without copying Python constants to the GPU on every call. Layered
    over the reference's (+1 widths: reference.ReferenceBoxCoder, already free of copies), it
    leaves the coding to that one."""

    def encode_single(self, reference_boxes, proposals):
        if getattr(self, "offset", 0):
            return super().encode_single(reference_boxes, proposals)
        return encode_boxes(reference_boxes, proposals, self.on_device(self.weights, reference_boxes))

    def decode_single(self, rel_codes, boxes):
        if getattr(self, "offset", 0):
            return super().decode_single(rel_codes, boxes)
        boxes = boxes.to(rel_codes.dtype)
        widths = boxes[:, 2] - boxes[:, 0]
        heights = boxes[:, 3] - boxes[:, 1]
        ctr_x = boxes[:, 0] + 0.5 * widths
        ctr_y = boxes[:, 1] + 0.5 * heights
        wx, wy, ww, wh = self.weights
        dx = rel_codes[:, 0::4] / wx
        dy = rel_codes[:, 1::4] / wy
        dw = torch.clamp(rel_codes[:, 2::4] / ww, max=self.bbox_xform_clip)
        dh = torch.clamp(rel_codes[:, 3::4] / wh, max=self.bbox_xform_clip)
        pred_ctr_x = dx * widths[:, None] + ctr_x[:, None]
        pred_ctr_y = dy * heights[:, None] + ctr_y[:, None]
        half_w = 0.5 * (torch.exp(dw) * widths[:, None])  # torchvision: a 0.5 tensor built on the GPU
        half_h = 0.5 * (torch.exp(dh) * heights[:, None])
        return torch.stack((pred_ctr_x - half_w, pred_ctr_y - half_h, pred_ctr_x + half_w, pred_ctr_y + half_h),
                           dim=2).flatten(1)


# ---------------------------------------------------------------- matching and assignment


class SyncFreeMatcher(Matcher):
    """torchvision's Matcher with masked fills instead of boolean-index assignments."""

    def __call__(self, match_quality_matrix: torch.Tensor) -> torch.Tensor:
        if match_quality_matrix.numel() == 0:
            return super().__call__(match_quality_matrix)  # raises torchvision's error
        return batched_match(match_quality_matrix[None], None, self)[0]


def labels_from_matches(matched: torch.Tensor, foreground: torch.Tensor, matcher: Matcher):
    """Background below the low threshold, ignored (-1) between the thresholds."""
    labels = foreground.masked_fill(matched == matcher.BELOW_LOW_THRESHOLD, 0)
    return labels.masked_fill(matched == matcher.BETWEEN_THRESHOLDS, -1)


def unit_box(like: torch.Tensor) -> torch.Tensor:
    """The box (0, 0, 1, 1), made on the device (a tensor of Python numbers would be a copy that waits)."""
    unit = torch.zeros(4, dtype=like.dtype, device=like.device)
    unit[2:] = 1
    return unit


def padded_targets(boxes: list[torch.Tensor], labels: list[torch.Tensor], at_least: int = 0):
    """Ground truth of a batch as [B, G, 4] boxes, [B, G] labels and [B, G] presence, G at least
    `at_least`. Padding boxes are unit squares, so whatever picks them up still encodes to finite
    regression targets."""
    if max((len(b) for b in boxes), default=0) < at_least:
        boxes = [*boxes, boxes[0].new_zeros((at_least, 4))]  # widens the padding, dropped below
        labels = [*labels, labels[0].new_full((at_least,), -1)]
        gt, classes, present = padded_targets(boxes, labels)
        return gt[:-1], classes[:-1], present[:-1]
    classes = pad_rows(labels, padding_value=-1)
    present = classes >= 0
    gt = torch.where(present[..., None], pad_rows(boxes), unit_box(boxes[0]))
    return gt, classes.clamp(min=0), present  # labels padded with 0 (real ones are never below 0 here)


def clip_to_images(boxes: torch.Tensor, image_shapes) -> torch.Tensor:
    """torchvision's clip_boxes_to_image for [images, N, 4] boxes, each image's to its own (height,
    width), in five operators for the batch instead of three an image; the same clamps."""
    limits = host_values(image_shapes, boxes)[:, None, None]  # [images, 1, 1, 2]: height, width
    x = torch.minimum(boxes[..., 0::2].clamp(min=0), limits[..., 1])
    y = torch.minimum(boxes[..., 1::2].clamp(min=0), limits[..., 0])
    return torch.stack((x, y), dim=-1).reshape(boxes.shape)


def batched_box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """torchvision's box_iou with a batch dimension: [B, N, 4] x [B or 1, M, 4] -> [B, N, M]."""
    area1 = (boxes1[..., 2] - boxes1[..., 0]) * (boxes1[..., 3] - boxes1[..., 1])
    area2 = (boxes2[..., 2] - boxes2[..., 0]) * (boxes2[..., 3] - boxes2[..., 1])
    lt = torch.max(boxes1[:, :, None, :2], boxes2[:, None, :, :2])
    rb = torch.min(boxes1[:, :, None, 2:], boxes2[:, None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    return inter / (area1[:, :, None] + area2[:, None, :] - inter)


def batched_match(quality: torch.Tensor, present: torch.Tensor | None, matcher: Matcher) -> torch.Tensor:
    """Matcher's matches for [B, G, M] quality, a batch at once; `present` [B, G] marks the ground
    truth that exists (padding rows are set to -1 and never win), None when all of it does."""
    if present is not None:
        quality = quality.masked_fill(~present[:, :, None], -1)
    matched_vals, matches = quality.max(dim=1)
    all_matches = matches
    matches = matches.masked_fill(matched_vals < matcher.low_threshold, matcher.BELOW_LOW_THRESHOLD)
    between = (matched_vals >= matcher.low_threshold) & (matched_vals < matcher.high_threshold)
    matches = matches.masked_fill(between, matcher.BETWEEN_THRESHOLDS)
    if matcher.allow_low_quality_matches:
        # every prediction that is some ground truth's best match (ties included) keeps its match
        highest = quality.max(dim=2).values
        best = quality == highest[:, :, None]
        if present is not None:
            best &= present[:, :, None]
        matches = torch.where(best.any(dim=1), all_matches, matches)
    return matches


# ---------------------------------------------------------------- the RPN


class SyncFreeRPN(RegionProposalNetwork):
    padded_proposals: bool = False   # training: fast.padded_heads.PaddedProposals, and no host wait
    nms_scan: bool = False           # greedy_nms's wait-free scan where Triton is (fast.Options.nms_scan)

    def assign_targets_to_anchors(self, anchors, targets):
        """All images in one batched IoU and match, not one loop turn (some 20 kernels) per image.
        torchvision's AnchorGenerator gives every image of a batch the same anchors (they depend
        on the padded batch size only), so the first image's stand for all."""
        gt_boxes = [t["boxes"] for t in targets]
        if all(len(b) for b in gt_boxes) and all(a.shape == anchors[0].shape for a in anchors):
            gt, _, present = padded_targets(gt_boxes, [t["labels"] for t in targets])
            matched = batched_match(batched_box_iou(gt, anchors[0][None]), present, self.proposal_matcher)
            matched_gt = gt.gather(1, matched.clamp(min=0)[..., None].expand(-1, -1, 4))
            labels = labels_from_matches(matched, (matched >= 0).float(), self.proposal_matcher)
            return list(labels.unbind(0)), list(matched_gt.unbind(0))
        labels, matched_gt_boxes = [], []
        for anchors_per_image, target in zip(anchors, targets):
            gt_boxes = target["boxes"]
            if gt_boxes.numel() == 0:  # an image without objects: every anchor is background
                matched_gt_boxes.append(torch.zeros_like(anchors_per_image, dtype=torch.float32))
                labels.append(anchors_per_image.new_zeros(anchors_per_image.shape[0], dtype=torch.float32))
                continue
            matched = self.proposal_matcher(self.box_similarity(gt_boxes, anchors_per_image))
            matched_gt_boxes.append(gt_boxes[matched.clamp(min=0)])
            labels.append(labels_from_matches(matched, (matched >= 0).float(), self.proposal_matcher))
        return labels, matched_gt_boxes

    def ignore_straddling(self, labels, anchors, image_sizes):
        """The reference RPN's border filter (object_detection.reference.visible_anchors) for the whole
        batch at once: every image has the same anchors, so one comparison with each image's size
        instead of ~9 operators an image."""
        thresh = getattr(self, "straddle_thresh", None)
        if thresh is None or not all(a.shape == anchors[0].shape for a in anchors):
            return super().ignore_straddling(labels, anchors, image_sizes)
        a = anchors[0]
        limits = host_values([(height + thresh, width + thresh) for height, width in image_sizes], a)
        visible = (((a[:, 0] >= -thresh) & (a[:, 1] >= -thresh))[None]
                   & (a[None, :, 2] < limits[:, 1:]) & (a[None, :, 3] < limits[:, :1]))
        return list(torch.stack(labels).masked_fill(~visible, -1).unbind(0))

    def filter_proposals(self, proposals, objectness, image_shapes, num_anchors_per_level):
        best_boxes, best_scores = self.best_proposals(proposals, objectness, image_shapes, num_anchors_per_level)
        counts = (best_scores > float("-inf")).sum(dim=1).tolist()  # the one wait
        return ([b[:n] for b, n in zip(best_boxes, counts)],
                [s[:n] for s, n in zip(best_scores, counts)])

    def best_proposals(self, proposals, objectness, image_shapes, num_anchors_per_level):
        """Each image's proposals after NMS, best first, as [images, W, 4] boxes and [images, W]
        scores: the survivors, then (scored -inf) whatever fills the row."""
        num_images = proposals.shape[0]
        objectness = objectness.detach().reshape(num_images, -1)
        top_n_idx = self._get_top_n_idx(objectness, num_anchors_per_level)  # per level, best first
        per_level = [min(self.pre_nms_top_n(), n) for n in num_anchors_per_level]
        rows = torch.arange(num_images, device=proposals.device)[:, None]
        scores = torch.sigmoid(objectness[rows, top_n_idx])
        boxes = clip_to_images(proposals[rows, top_n_idx], image_shapes)
        widths, heights = boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1]
        valid = (widths >= self.min_size) & (heights >= self.min_size) & (scores >= self.score_thresh)

        # one group per (image, level), padded to the longest level with invalid entries
        width = max(per_level)
        groups = []
        for part in (boxes, valid, scores):
            pieces = part.split(per_level, dim=1)
            pad = [F.pad(p, (0, 0, 0, width - p.shape[1]) if p.dim() == 3 else (0, width - p.shape[1]))
                   for p in pieces]
            groups.append(torch.stack(pad, dim=1).flatten(0, 1))  # [images * levels, width, ...]
        group_boxes, group_valid, group_scores = groups
        keep = greedy_nms(group_boxes, group_valid, self.nms_thresh, scan=self.nms_scan)

        # the image's best post_nms_top_n survivors over all its levels, best first (as batched_nms);
        # the reference's recipe in training: the best post_nms_top_n x images over the whole batch
        kept_scores = group_scores.masked_fill(~keep, float("-inf")).reshape(num_images, -1)
        survivors = keep.reshape(num_images, -1)
        take = min(self.post_nms_top_n(), kept_scores.shape[1])
        if self.training and getattr(self, "proposals_per", "image") == "batch":
            flat = kept_scores.flatten()
            chosen = torch.zeros_like(survivors).flatten()
            chosen.index_fill_(0, flat.topk(min(take * num_images, flat.numel())).indices, True)  # (`[i] = True` copies)
            survivors = survivors & chosen.view_as(survivors)
            kept_scores = kept_scores.masked_fill(~survivors, float("-inf"))
            take = min(take * num_images, kept_scores.shape[1])
        best_scores, best = kept_scores.topk(take, dim=1)
        best_boxes = group_boxes.reshape(num_images, -1, 4).gather(1, best[..., None].expand(-1, -1, 4))
        return best_boxes, best_scores

    def compute_loss(self, objectness, pred_bbox_deltas, labels, regression_targets):
        positive, negative = self.fg_bg_sampler.padded(labels)
        lengths = [len(image_labels) for image_labels in labels]
        positive = torch.cat([p[:n] for p, n in zip(positive, lengths)])
        sampled = positive | torch.cat([q[:n] for q, n in zip(negative, lengths)])
        count = sampled.sum()
        labels = torch.cat(labels)
        regression_targets = torch.cat(regression_targets)
        box = F.smooth_l1_loss(pred_bbox_deltas, regression_targets, beta=1 / 9, reduction="none").sum(dim=1)
        box_loss = torch.where(positive, box, 0).sum() / count  # (an empty image's targets are not finite)
        bce = F.binary_cross_entropy_with_logits(objectness.flatten(), labels, reduction="none")
        return (bce * sampled).sum() / count, box_loss


# ---------------------------------------------------------------- the RoI heads


class SyncFreeRoIAlign(MultiScaleRoIAlign):
    """Multi-scale RoIAlign with one wait per call (the RoI count of each level) instead of one
    `torch.where` per level, and the RoIs' levels found for the whole batch at once."""

    def forward(self, x, boxes, image_shapes):
        features = _filter_input(x, self.featmap_names)
        if self.scales is None or self.map_levels is None:
            self.scales, self.map_levels = _setup_scales(features, image_shapes, self.canonical_scale,
                                                          self.canonical_level)
        rois = _convert_to_roi_format(boxes)
        if len(features) == 1:
            return roi_align(features[0], rois, self.output_size, self.scales[0], self.sampling_ratio)
        levels = self.map_levels([rois[:, 1:]])  # the same areas, for all images in one go
        order = torch.argsort(levels, stable=True)
        counts = (levels[None, :] == torch.arange(len(features), device=levels.device)[:, None]).sum(1).tolist()
        pooled = [roi_align(f, r, self.output_size, scale, self.sampling_ratio).to(features[0].dtype)
                  for f, r, scale in zip(features, rois[order].split(counts), self.scales)]
        back = torch.empty_like(order)
        back[order] = torch.arange(order.numel(), device=order.device)
        return torch.cat(pooled)[back]


def fastrcnn_loss_masked(class_logits, box_regression, labels, regression_targets, beta: float = 1 / 9):
    """torchvision's fastrcnn_loss (with the recipe's smooth-L1 beta, reference.fastrcnn_loss): the
    box loss summed over positives by a mask, not an index list."""
    labels = torch.cat(labels)
    regression_targets = torch.cat(regression_targets)
    classification_loss = F.cross_entropy(class_logits, labels)
    n = labels.numel()
    per_class = box_regression.reshape(n, box_regression.size(-1) // 4, 4)
    predicted = per_class[torch.arange(n, device=labels.device), labels]
    box = F.smooth_l1_loss(predicted, regression_targets, beta=beta, reduction="none").sum(dim=1)
    return classification_loss, torch.where(labels > 0, box, 0).sum() / n  # (not `*`: 0 x inf for empty images)


class SyncFreeRoIHeads(RoIHeads):

    def assign_targets_to_proposals(self, proposals, gt_boxes, gt_labels, padded=None):
        """Batched over images (proposals padded with empty boxes, which match nothing; `padded`:
        pad_rows(proposals) where the caller has it)."""
        if all(len(b) for b in gt_boxes):
            gt, classes, present = padded_targets(gt_boxes, gt_labels)
            padded = pad_rows(proposals) if padded is None else padded
            matched = batched_match(batched_box_iou(gt, padded), present, self.proposal_matcher)
            clamped = matched.clamp(min=0)
            labels = labels_from_matches(matched, classes.gather(1, clamped).to(torch.int64), self.proposal_matcher)
            lengths = [len(p) for p in proposals]
            return [c[:n] for c, n in zip(clamped, lengths)], [c[:n] for c, n in zip(labels, lengths)]
        matched_idxs, labels = [], []
        for proposals_in_image, boxes, classes in zip(proposals, gt_boxes, gt_labels):
            if boxes.numel() == 0:
                zeros = proposals_in_image.new_zeros(proposals_in_image.shape[0], dtype=torch.int64)
                matched_idxs.append(zeros)
                labels.append(zeros.clone())
                continue
            matched = self.proposal_matcher(box_ops.box_iou(boxes, proposals_in_image))
            clamped = matched.clamp(min=0)
            matched_idxs.append(clamped)
            labels.append(labels_from_matches(matched, classes[clamped].to(torch.int64), self.proposal_matcher))
        return matched_idxs, labels

    @staticmethod
    def check_target_types(targets) -> None:
        """torchvision's type checks of the training targets, which cost nothing."""
        for t in targets:
            if t["boxes"].dtype not in (torch.float, torch.double, torch.half):
                raise TypeError(f"target boxes must of float type, instead got {t['boxes'].dtype}")
            if t["labels"].dtype != torch.int64:
                raise TypeError(f"target labels must of int64 type, instead got {t['labels'].dtype}")

    def select_training_samples(self, proposals, targets):
        """torchvision's selection, with each image's sampled RoIs ordered positives first; also
        returns the number of positives per image."""
        self.check_targets(targets)
        dtype = proposals[0].dtype
        gt_boxes = [t["boxes"].to(dtype) for t in targets]
        gt_labels = [t["labels"] for t in targets]
        # torchvision's add_gt_proposals (a cat per image) as the padded rows, each image's a view
        padded_proposals = pad_rows([(p, g) for p, g in zip(proposals, gt_boxes)])
        proposals = [row[:len(p) + len(g)] for row, p, g in zip(padded_proposals, proposals, gt_boxes)]
        matched_idxs, labels = self.assign_targets_to_proposals(proposals, gt_boxes, gt_labels, padded_proposals)
        padded_labels = pad_rows(labels, padding_value=-1)
        positive, negative = self.fg_bg_sampler.draw(padded_labels)
        rank = positive.to(torch.int8) * 2 + negative.to(torch.int8)  # 2 positive, 1 negative, 0 neither
        order = rank.argsort(dim=1, descending=True, stable=True)
        num_positive, num_sampled = torch.stack([positive.sum(1), (rank > 0).sum(1)]).tolist()  # the wait
        # each image's sampled RoIs (the first num_sampled of its order) gathered for the whole batch
        # from padded rows, then each image's as a view: four gathers a batch, not four an image
        chosen = order[:, :max(num_sampled)]
        rows = padded_proposals.gather(1, chosen[..., None].expand(-1, -1, 4))
        matched = pad_rows(matched_idxs).gather(1, chosen)
        sampled_labels = padded_labels.gather(1, chosen)  # the chosen are sampled: never the padding
        gt = pad_rows([b if b.numel() else b.new_zeros((1, 4)) for b in gt_boxes])  # an image without: a zero box
        matched_gt = gt.gather(1, matched[..., None].expand(-1, -1, 4))
        proposals = [r[:n] for r, n in zip(rows, num_sampled)]
        matched_idxs = [m[:n] for m, n in zip(matched, num_sampled)]
        labels = [c[:n] for c, n in zip(sampled_labels, num_sampled)]
        regression_targets = self.box_coder.encode([g[:n] for g, n in zip(matched_gt, num_sampled)], proposals)
        return proposals, matched_idxs, labels, regression_targets, num_positive

    def forward(self, features, proposals, image_shapes, targets=None):
        if not self.training or self.keypoint_roi_pool is not None:
            return super().forward(features, proposals, image_shapes, targets)
        self.check_target_types(targets)
        proposals, matched_idxs, labels, regression_targets, num_positive = \
            self.select_training_samples(proposals, targets)
        box_features = self.box_head(self.box_roi_pool(features, proposals, image_shapes))
        class_logits, box_regression = self.box_predictor(box_features)
        loss_classifier, loss_box_reg = fastrcnn_loss_masked(class_logits, box_regression, labels,
                                                             regression_targets,
                                                             getattr(self, "box_loss_beta", 1 / 9))
        losses = {"loss_classifier": loss_classifier, "loss_box_reg": loss_box_reg}
        if self.has_mask():
            mask_proposals = [p[:n] for p, n in zip(proposals, num_positive)]  # positives come first
            positive_matches = [m[:n] for m, n in zip(matched_idxs, num_positive)]
            losses["loss_mask"] = mask_loss(mask_logits(self, features, mask_proposals, image_shapes),
                                            mask_proposals, targets, positive_matches, image_shapes,
                                            getattr(self, "draw_mask_targets", None),
                                            torch.cat([c[:n] for c, n in zip(labels, num_positive)]))
        return [], losses

    def postprocess_detections(self, class_logits, box_regression, proposals, image_shapes):
        """torchvision's detections: per class, boxes above the score threshold and not empty go
        through NMS, and each image keeps its best `detections_per_img`. torchvision runs, per image,
        two `torch.where` and, above 5000 candidates, a `torch.unique` and one NMS per class (about
        160 waits per image with 1000 proposals and 80 classes); here every (image, class) group goes
        through `greedy_nms` at once, with three waits per batch."""
        per_image = [len(p) for p in proposals]
        if not per_image or max(per_image) == 0:
            return super().postprocess_detections(class_logits, box_regression, proposals, image_shapes)
        num_images, width = len(per_image), max(per_image)
        pred_boxes = self.box_coder.decode(box_regression, proposals).split(per_image, 0)  # [n, C, 4] each
        pred_scores = F.softmax(class_logits, -1).split(per_image, 0)
        pad = torch.nn.utils.rnn.pad_sequence
        boxes = pad([box_ops.clip_boxes_to_image(b, shape)[:, 1:] for b, shape in zip(pred_boxes, image_shapes)],
                    batch_first=True)                                          # [B, P, C-1, 4]
        scores = pad([s[:, 1:] for s in pred_scores], batch_first=True, padding_value=-1.0)  # [B, P, C-1]
        widths, heights = boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1]
        valid = (scores > self.score_thresh) & (widths >= 1e-2) & (heights >= 1e-2)
        # one group per (image, class), its proposals best first
        scores, boxes, valid = scores.transpose(1, 2), boxes.transpose(1, 2), valid.transpose(1, 2)
        order = scores.argsort(dim=-1, descending=True)
        scores = scores.gather(-1, order)
        valid = valid.gather(-1, order)
        boxes = boxes.gather(2, order[..., None].expand(-1, -1, -1, 4))
        # Past the last valid candidate of any group nothing can be kept: with the 0.05 threshold of
        # a trained model most of the 1000 columns, and NMS costs the square of the width.
        longest = int((valid * torch.arange(1, width + 1, device=valid.device)).amax())  # a wait
        width = max(longest, 1)
        scores, boxes, valid = scores[..., :width], boxes[:, :, :width], valid[..., :width]
        keep = greedy_nms(boxes.reshape(-1, width, 4), valid.reshape(-1, width), self.nms_thresh,
                          scan=getattr(self, "nms_scan", False))
        kept = scores.masked_fill(~keep.view_as(valid), float("-inf")).reshape(num_images, -1)
        take = min(self.detections_per_img, kept.shape[1])
        best_scores, best = kept.topk(take, dim=1)                             # best first, as torchvision
        best_boxes = boxes.reshape(num_images, -1, 4).gather(1, best[..., None].expand(-1, -1, 4))
        best_labels = best // width + 1
        counts = keep.view(num_images, -1).sum(dim=1).clamp(max=take).tolist()  # the wait
        return ([b[:n] for b, n in zip(best_boxes, counts)], [s[:n] for s, n in zip(best_scores, counts)],
                [c[:n] for c, n in zip(best_labels, counts)])


# ---------------------------------------------------------------- the whole model


DEGENERATE = "All bounding boxes should have positive height and width"


def check_boxes(boxes: torch.Tensor) -> None:
    """torchvision's check of a batch's target boxes (xyxy): a ValueError naming the first without area."""
    degenerate = (boxes[:, 2:] <= boxes[:, :2]).any(dim=1)
    if len(boxes) and bool(degenerate.any()):
        raise ValueError(f"{DEGENERATE}. Found invalid box {boxes[degenerate][0].tolist()}")


class SyncFreeMaskRCNN(MaskRCNN):
    """The training forward of GeneralizedRCNN with one degenerate-box check for the batch instead
    of one per image; the evaluation forward is torchvision's (its heads post-process as above)."""

    def forward(self, images, targets=None):
        if not self.training:
            return super().forward(images, targets)
        if targets is None:
            raise ValueError("targets should not be None when in training mode")
        images, targets = self.transform(images, targets)
        boxes = torch.cat([t["boxes"] for t in targets])
        if boxes.is_cuda and getattr(self.rpn, "padded_proposals", False):
            # without a wait: the trainer checked its batches on the host (engine.to_device); anything
            # else stops at a device-side assertion
            torch._assert_async(~(boxes[:, 2:] <= boxes[:, :2]).any(), DEGENERATE)
        else:
            check_boxes(boxes)  # the wait, on a GPU
        features = self.backbone(images.tensors)
        proposals, proposal_losses = self.rpn(images, features, targets)
        _, detector_losses = self.roi_heads(features, proposals, images.image_sizes, targets)
        return {**detector_losses, **proposal_losses}


def _layer(module, cls: type) -> None:
    """`cls` in place of torchvision's class, or over the reference's subclass of it (object_detection.
    reference), whose settings the classes above honour."""
    swap(module, cls) if issubclass(cls, type(module)) else mix_in(module, cls)


def make_sync_free(model: MaskRCNN, nms_scan: bool = False) -> MaskRCNN:
    """Swap in the classes above; parameters, buffers and state-dict keys stay as they are.
    `nms_scan`: greedy_nms by its wait-free scan on GPUs."""
    use_batched_sampler(model)  # the heads above take its padded masks
    swap(model, SyncFreeMaskRCNN)
    _layer(model.rpn, SyncFreeRPN)
    _layer(model.roi_heads, SyncFreeRoIHeads)
    for matcher in (model.rpn.proposal_matcher, model.roi_heads.proposal_matcher):
        swap(matcher, SyncFreeMatcher)
    for coder in (model.rpn.box_coder, model.roi_heads.box_coder):
        _layer(coder, SyncFreeBoxCoder)
    for pool in (model.roi_heads.box_roi_pool, model.roi_heads.mask_roi_pool):
        if pool is not None:
            swap(pool, SyncFreeRoIAlign)
    model.rpn.nms_scan = model.roi_heads.nms_scan = nms_scan
    return model
