"""torchvision's BalancedPositiveNegativeSampler for all images of a batch at once."""
from __future__ import annotations

import torch
from torchvision.models.detection import MaskRCNN


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
        return self.draw(torch.nn.utils.rnn.pad_sequence(matched_idxs, batch_first=True, padding_value=-1))

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
