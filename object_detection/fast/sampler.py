"""torchvision's BalancedPositiveNegativeSampler for all images of a batch at once."""
from __future__ import annotations

import numpy as np
import torch
from torchvision.models.detection import MaskRCNN

from object_detection.fast.patch import host_values


def pad_rows(rows: list, padding_value=0) -> torch.Tensor:
    """torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=...) in a few operators
    for the batch instead of a copy per row. A row may come in pieces (a tuple of tensors), which
    makes each row's torch.cat unnecessary."""
    rows = [row if isinstance(row, tuple) else (row,) for row in rows]
    return _padded(torch.cat([piece for row in rows for piece in row]),
                   [sum(len(piece) for piece in row) for row in rows], padding_value)


def pad_blocks(blocks: list[torch.Tensor], padding_value=0) -> torch.Tensor:
    """Blocks [n_i, length_i, ...] padded to the longest length and concatenated: [sum n_i, longest, ...]
    (torch.cat of each block padded along dim 1) in a few operators for the batch."""
    tail = blocks[0].shape[2:]
    return _padded(torch.cat([block.reshape(-1, *tail) for block in blocks]),
                   [block.shape[1] for block in blocks for _ in range(len(block))], padding_value,
                   longest=max(block.shape[1] for block in blocks))  # an empty block's length counts too


def _padded(flat: torch.Tensor, lengths: list[int], padding_value, longest: int | None = None) -> torch.Tensor:
    """Rows of the given lengths, back to back in flat, as [rows, longest, ...]: a view when all are
    as long; else put in place through an index made on the host (copied from pinned memory, no wait)."""
    longest = max(lengths, default=0) if longest is None else longest
    if all(n == longest for n in lengths):
        return flat.view(len(lengths), longest, *flat.shape[1:])
    out = flat.new_full((len(lengths), longest, *flat.shape[1:]), padding_value)
    starts = np.cumsum([0] + lengths[:-1])
    where = np.arange(len(flat)) + np.repeat(np.arange(len(lengths)) * longest - starts, lengths)
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
