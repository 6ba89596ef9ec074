"""The training forward with one host wait: fast.sync_free's heads at fixed sizes.

fast.sync_free still reads three kinds of numbers from the device in a training forward: how many
proposals each image kept, how many RoIs each image sampled, and (per-level pooling) how many RoIs
each level got; each read makes the host wait until the GPU has run everything queued, so the host,
ahead of the GPU while it queues the backbone, falls behind again in the heads. Here the RPN hands
over a fixed number of proposals per image with a validity mask (`PaddedProposals`) instead of each
image's survivors, and the RoI heads sample into `batch_size_per_image` slots per image (positives
first, then negatives, then unsampled slots the losses leave out), all images at once. The one
number left to read is the mask branch's RoI count, read after the box branch is queued. With
fast.nms's scan and fast.roi_align nothing else waits.

The same function as fast.sync_free's heads: the same candidates, matches and losses (the random
draw of the samples is over a wider row, so the same seed picks other RoIs from the same
distribution); `tests/test_sync_free.py` checks it with samplers that take every candidate.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.models.detection import MaskRCNN

from object_detection.fast.mask_branch import mask_logits
from object_detection.fast.patch import mix_in
from object_detection.fast.sync_free import (SyncFreeRoIHeads, SyncFreeRPN, batched_box_iou, batched_match,
                                             labels_from_matches, padded_targets, unit_box)
from object_detection.mask_targets import mask_loss

OUTSIDE = 128.0  # pixels left of and above the image: below -1 on the coarsest pooled level (1/32)


class PaddedProposals(list):
    """A batch's proposals as PaddedRPN gives them in training: per image a [W, 4] tensor of the
    same width W, best first, and `valid` [images, W] marking the real ones (the rest pad the row
    and must be neither sampled nor counted)."""

    def __init__(self, boxes: torch.Tensor, valid: torch.Tensor):
        super().__init__(boxes.unbind(0))
        self.valid = valid


def _outside_box(like: torch.Tensor) -> torch.Tensor:
    """A unit square beyond the image, where RoIAlign samples nothing, made on the device."""
    return unit_box(like) - OUTSIDE


class PaddedRPN(SyncFreeRPN):
    padded_proposals = True  # SyncFreeMaskRCNN then checks the boxes without a wait

    def filter_proposals(self, proposals, objectness, image_shapes, num_anchors_per_level):
        if not self.training:
            return super().filter_proposals(proposals, objectness, image_shapes, num_anchors_per_level)
        best_boxes, best_scores = self.best_proposals(proposals, objectness, image_shapes, num_anchors_per_level)
        valid = best_scores > float("-inf")
        # The rest of a row may be any candidate, of negative width too (the reference's boxes are
        # pixel-inclusive), which would give a RoI level no pooler has. Instead a unit square beyond
        # every map: an image with few candidates leaves hundreds of these in the box head's slots,
        # and RoIAlign samples nothing there and adds no gradient (at one spot inside the image, the
        # backward's atomic additions queued up: 10-18 ms a step, BENCHMARKS.md).
        return (PaddedProposals(torch.where(valid[..., None], best_boxes, _outside_box(best_boxes)), valid),
                list(best_scores.unbind(0)))


def fastrcnn_loss_padded(class_logits, box_regression, labels, regression_targets, sampled, positive,
                         beta: float = 1 / 9):
    """fast.sync_free.fastrcnn_loss_masked over fixed slots of which only `sampled` count: the
    classification loss is the mean over those, the box loss the sum over `positive` ones divided by
    their number."""
    count = sampled.sum()
    classification = F.cross_entropy(class_logits, labels, reduction="none")
    n = labels.numel()
    per_class = box_regression.reshape(n, box_regression.size(-1) // 4, 4)
    predicted = per_class[torch.arange(n, device=labels.device), labels]
    box = F.smooth_l1_loss(predicted, regression_targets, beta=beta, reduction="none").sum(dim=1)
    return torch.where(sampled, classification, 0).sum() / count, torch.where(positive, box, 0).sum() / count


class PaddedRoIHeads(SyncFreeRoIHeads):

    def forward(self, features, proposals, image_shapes, targets=None):
        if self.training and isinstance(proposals, PaddedProposals) and self.keypoint_roi_pool is None:
            self.check_target_types(targets)
            return self.forward_padded(features, proposals, image_shapes, targets)
        return super().forward(features, proposals, image_shapes, targets)

    def select_padded_samples(self, proposals: PaddedProposals, targets):
        """select_training_samples for PaddedProposals, for the whole batch at once and without a
        host wait: each image gets `batch_size_per_image` slots (fewer only if it has fewer
        candidates), its sampled positives first, then its sampled negatives, then unsampled ones.
        Returns the slots' boxes [B, S, 4], labels and matched ground truth [B, S], which are sampled
        and which positive [B, S], and the regression targets [B * S, 4]."""
        self.check_targets(targets)
        dtype = proposals[0].dtype
        gt, classes, present = padded_targets([t["boxes"].to(dtype) for t in targets],
                                               [t["labels"] for t in targets], at_least=1)
        boxes = torch.cat([torch.stack(list(proposals)), gt], dim=1)            # add_gt_proposals
        candidate = torch.cat([proposals.valid, present], dim=1)
        matched = batched_match(batched_box_iou(gt, boxes), present, self.proposal_matcher)
        clamped = matched.clamp(min=0)
        labels = labels_from_matches(matched, classes.gather(1, clamped).to(torch.int64), self.proposal_matcher)
        positive, negative = self.fg_bg_sampler.draw(labels.masked_fill(~candidate, -1))
        rank = positive.to(torch.int8) * 2 + negative.to(torch.int8)  # 2 positive, 1 negative, 0 neither
        slots = min(self.fg_bg_sampler.batch_size_per_image, rank.shape[1])
        order = rank.argsort(dim=1, descending=True, stable=True)[:, :slots]
        slot_rank = rank.gather(1, order)
        slot_boxes = boxes.gather(1, order[..., None].expand(-1, -1, 4))
        slot_matched = clamped.gather(1, order)
        matched_gt = gt.gather(1, slot_matched[..., None].expand(-1, -1, 4))
        regression_targets = self.box_coder.encode_single(matched_gt.flatten(0, 1), slot_boxes.flatten(0, 1))
        return (slot_boxes, labels.gather(1, order).clamp(min=0), slot_matched, slot_rank > 0, slot_rank == 2,
                regression_targets)

    def forward_padded(self, features, proposals: PaddedProposals, image_shapes, targets):
        """The training forward on PaddedProposals: the box branch on fixed slots, then the one wait
        (the mask branch's RoI count), so the host has queued all else before it waits."""
        boxes, labels, matched, sampled, positive, regression_targets = self.select_padded_samples(proposals, targets)
        box_features = self.box_head(self.box_roi_pool(features, list(boxes), image_shapes))
        class_logits, box_regression = self.box_predictor(box_features)
        loss_classifier, loss_box_reg = fastrcnn_loss_padded(
            class_logits, box_regression, labels.flatten(), regression_targets, sampled.flatten(), positive.flatten(),
            getattr(self, "box_loss_beta", 1 / 9))
        losses = {"loss_classifier": loss_classifier, "loss_box_reg": loss_box_reg}
        if self.has_mask():
            counts = positive.sum(dim=1).tolist()  # the wait
            mask_proposals = [b[:n] for b, n in zip(boxes, counts)]  # positives come first
            positive_matches = [m[:n] for m, n in zip(matched, counts)]
            losses["loss_mask"] = mask_loss(mask_logits(self, features, mask_proposals, image_shapes),
                                            mask_proposals, targets, positive_matches, image_shapes,
                                            getattr(self, "draw_mask_targets", None))
        return [], losses


def use_padded_heads(model: MaskRCNN) -> MaskRCNN:
    """PaddedRPN and PaddedRoIHeads over a model's fast.sync_free heads."""
    mix_in(model.rpn, PaddedRPN)
    mix_in(model.roi_heads, PaddedRoIHeads)
    return model
