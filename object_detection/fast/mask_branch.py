"""The mask branch of the RoI heads on few shapes, in channels_last (fast.Options.mask_roi_bucket,
mask_channels_last): the heads of fast.sync_free and fast.padded_heads run it through `mask_logits`.
"""
from __future__ import annotations

import torch
from torchvision.models.detection.roi_heads import RoIHeads

MASK_ROI_BUCKET = 64


def mask_logits(heads: RoIHeads, features, mask_proposals: list[torch.Tensor], image_shapes) -> torch.Tensor:
    """The mask branch's logits for the positive RoIs (`mask_proposals`, each image's).

    With `heads.mask_roi_bucket` (fast.Options.mask_roi_bucket) the branch runs on them padded to a
    multiple of MASK_ROI_BUCKET, and the padding's logits are dropped: the positives' count changes at
    every step, and cuDNN builds a plan for each new shape of each of the branch's convolutions,
    forward and backward, on the host while the GPU waits; a few counts keep the plans reused. The
    padding's RoIs get no gradient, and a convolution treats each RoI on its own: the same function.
    With `heads.mask_channels_last` the pooled RoIs (as fast.roi_align's kernel writes them) and the
    branch's weights are channels_last, so cuDNN's kernels need no layout conversion around each
    convolution."""
    count = heads.positive_rois = sum(len(p) for p in mask_proposals)  # (a host number: what benchmarks report)
    bucket = MASK_ROI_BUCKET if getattr(heads, "mask_roi_bucket", False) else 0
    if bucket and count % bucket:
        last = mask_proposals[-1]
        filler = last.new_tensor([[0.0, 0.0, 16.0, 16.0]]).expand(bucket - count % bucket, 4)  # inside any image
        mask_proposals = [*mask_proposals[:-1], torch.cat([last, filler])]
    pooled = heads.mask_roi_pool(features, mask_proposals, image_shapes)
    if getattr(heads, "mask_channels_last", False):
        pooled = pooled.contiguous(memory_format=torch.channels_last)
    return heads.mask_predictor(heads.mask_head(pooled))[:count]


def warm_mask_branch(heads: RoIHeads, images_per_step: int, autocast) -> int:
    """The mask branch forward and backward once at every bucket size a step of `images_per_step`
    images can reach (up to the sampler's positives per image): cuDNN's plans for each size are built
    before the run, not in its first steps. Under `heads.mask_roi_bucket` only (without it the sizes
    are every count); the branch's gradients are dropped. Returns the sizes warmed."""
    if not getattr(heads, "mask_roi_bucket", False) or not heads.has_mask():
        return 0
    sampler = heads.fg_bg_sampler
    most = images_per_step * int(sampler.batch_size_per_image * sampler.positive_fraction)
    first_conv = next(m for m in heads.mask_head.modules() if isinstance(m, torch.nn.Conv2d))
    side = heads.mask_roi_pool.output_size[0]
    layout = torch.channels_last if getattr(heads, "mask_channels_last", False) else torch.contiguous_format
    sizes = range(MASK_ROI_BUCKET, -(-most // MASK_ROI_BUCKET) * MASK_ROI_BUCKET + 1, MASK_ROI_BUCKET)
    for count in sizes:
        pooled = torch.randn(count, first_conv.in_channels, side, side, device=first_conv.weight.device)
        pooled = pooled.contiguous(memory_format=layout).requires_grad_()  # its gradient: the first conv's too
        with autocast():
            logits = heads.mask_predictor(heads.mask_head(pooled))
        logits.float().sum().backward()
    heads.mask_head.zero_grad(set_to_none=True)
    heads.mask_predictor.zero_grad(set_to_none=True)
    return len(sizes)
