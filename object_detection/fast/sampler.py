"""torchvision's BalancedPositiveNegativeSampler for all images of a batch at once."""
from __future__ import annotations

import numpy as np
import torch
from torchvision.models.detection import MaskRCNN

from object_detection.fast.patch import host_values


def pad_rows(rows: list[torch.Tensor], padding_value=0) -> torch.Tensor:
    """torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=...) in a few operators
    for the batch instead of a copy per row: rows of one length stacked; else concatenated and put
    in place through an index made on the host (copied from pinned memory, no wait)."""
    lengths = [len(row) for row in rows]
    if len(set(lengths)) == 1:
        return torch.stack(rows)
    flat, longest = torch.cat(rows), max(lengths)
    out = flat.new_full((len(rows), longest, *flat.shape[1:]), padding_value)
    where = np.concatenate([np.arange(n) + i * longest for i, n in enumerate(lengths)])
    out.view(-1, *flat.shape[1:]).index_copy_(0, host_values(where, flat, torch.int64), flat)
    return out


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
        return self.draw(pad_rows(matched_idxs, padding_value=-1))

    def draw(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Positive and negative masks for [images, N] labels (1 and up positive, 0 negative, -1 neither)."""
        positive = _random_subset(labels >= 1, int(self.batch_size_per_image * self.positive_fraction))
        wanted = self.batch_size_per_image - positive.sum(dim=1, keepdim=True)
        negative = _random_subset(labels == 0, wanted)
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
