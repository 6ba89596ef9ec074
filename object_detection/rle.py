"""COCO run-length encoding of predicted masks on the host, with pycocotools: the stock path
(`encode_on_host`), and fast.rle_gpu's way for masks that are not on a GPU. Needs numpy and
pycocotools; torch only when given tensors."""
from __future__ import annotations

import numpy as np
from pycocotools import mask as mask_utils

MASK_THRESHOLD = 0.5   # a predicted mask's probability above which a pixel is in the mask


def encode_on_host(masks: list, per_image: list[int]) -> list[dict | None]:
    """Every image's mask RLEs in order, image by image with pycocotools (None for each result of
    an image without masks): what torchvision's evaluation does, none of object_detection.fast."""
    return [rle for m, n in zip(masks, per_image) for rle in ([None] * n if m is None else encode_masks(m))]


def binary(masks):
    """Bool [N,H,W] of a tensor [N,1,H,W] or [N,H,W] of probabilities (> 0.5) or binary masks."""
    masks = masks.detach()
    if masks.dim() == 4:
        masks = masks[:, 0]
    return masks > MASK_THRESHOLD if masks.is_floating_point() else masks != 0


def encode_masks(masks) -> list[dict]:
    """RLE of each mask, on the host (pycocotools' one C pass beats torch's several on a CPU):
    [N,1,H,W] or [N,H,W], probabilities (> 0.5) or already binary, tensors or arrays."""
    if hasattr(masks, "detach"):
        masks = binary(masks).cpu().numpy()
    masks = np.asarray(masks)
    if masks.ndim == 4:
        masks = masks[:, 0]
    chosen = masks > MASK_THRESHOLD if np.issubdtype(masks.dtype, np.floating) else masks != 0
    # pycocotools wants Fortran (H, W, N), which is C (N, W, H): one call for all masks.
    by_column = np.ascontiguousarray(chosen.transpose(0, 2, 1), dtype=np.uint8)
    rles = mask_utils.encode(by_column.transpose(2, 1, 0))
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")  # JSON and pickles want text
    return rles
