"""torchvision's GeneralizedRCNNTransform without host synchronisations, and mask pasting for a
whole batch at once in evaluation (per detection, it ran evaluation at under 10 images/s)."""
from __future__ import annotations

import numpy as np
import torch
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.roi_heads import expand_boxes, expand_masks

from object_detection.fast.patch import DeviceConstants, host_values
from object_detection.transform import InputTransform


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


def box_ratios(original_size, new_size) -> tuple[float, float]:
    """(height, width) ratios as torchvision's resize_boxes computes them: float32 quotients."""
    ratio_h, ratio_w = (float(np.float32(new) / np.float32(old)) for new, old in zip(new_size, original_size))
    return ratio_h, ratio_w


def scale_boxes(boxes: torch.Tensor, original_size, new_size) -> torch.Tensor:
    """torchvision's resize_boxes with the ratios as Python numbers: it builds them as four scalar
    tensors on the GPU, and each copy there makes the host wait for the GPU (64 waits a step at
    batch 16). The ratios are the same float32 quotients, so the boxes are bit-identical."""
    ratio_h, ratio_w = box_ratios(original_size, new_size)
    x0, y0, x1, y1 = boxes.unbind(1)
    return torch.stack((x0 * ratio_w, y0 * ratio_h, x1 * ratio_w, y1 * ratio_h), dim=1)


def scale_targets(targets: list[dict], moves: list[tuple]) -> None:
    """InputTransform.scale_target for a whole batch in one multiplication: every image's boxes and
    polygon edges are rows of (x, y, x, y), each row times its image's ratios (the boxes' float32
    quotients, the edges' float64 ones rounded to float32, as each way multiplies by them), and each
    target gets its rows back as views. `moves`: each image's (original size, new size). On a GPU the
    ratios go over from pinned memory without a wait; the same numbers bit for bit."""
    rows, factors = [], []
    for target, (old, new) in zip(targets, moves):
        box_h, box_w = box_ratios(old, new)
        edge_h, edge_w = (float(n) / float(o) for n, o in zip(new, old))
        rows.append(target["boxes"])
        factors.append((box_w, box_h, box_w, box_h))
        if "polygon_edges" in target:
            rows.append(target["polygon_edges"].reshape(-1, 4))
            factors.append((edge_w, edge_h, edge_w, edge_h))
    counts = [len(r) for r in rows]
    flat = torch.cat(rows)
    per_row = host_values(np.repeat(np.array(factors, dtype=np.float32), counts, axis=0), flat)
    scaled = iter((flat * per_row).split(counts))
    for target in targets:
        target["boxes"] = next(scaled)
        if "polygon_edges" in target:
            target["polygon_edges"] = next(scaled).view(target["polygon_edges"].shape)


def batchable(images, targets, channels: int) -> bool:
    """Whether SyncFreeTransform.forward's batched way takes these: 3-d float images with the mean's
    channels, on one device and dtype, and targets whose boxes and edges share one dtype and device
    and which have no keypoints (those take torchvision's way, image by image)."""
    if not images or any(i.dim() != 3 or not i.is_floating_point() or i.shape[0] != channels for i in images):
        return False
    if len({(i.dtype, i.device) for i in images}) > 1:
        return False
    if targets is None:
        return True
    coordinates = [t[k] for t in targets for k in ("boxes", "polygon_edges") if k in t]
    return (all("boxes" in t and "keypoints" not in t for t in targets)
            and len({(c.dtype, c.device) for c in coordinates}) == 1)


class SyncFreeTransform(DeviceConstants, InputTransform):
    """torchvision's transform without host synchronisations, and with batched mask pasting at the
    original image size; it resizes by the same rule as the InputTransform it builds on. With a
    `canvas` (height, width), every batch is padded to at least it (turned for batches with no
    landscape image: portrait and square ones share a group in the reference's grouping), so a run
    sees one or two input shapes instead of one per batch mix: what fixed-shape kernels
    (cudnn.benchmark, CUDA graphs) need."""

    canvas: tuple[int, int] | None = None

    def _adopt(self, canvas: tuple[int, int] | None = None) -> None:
        self.canvas = canvas

    def batch_images(self, images, size_divisible: int = 32):
        if self.canvas is None:
            return super().batch_images(images, size_divisible)
        height, width = self.canvas
        if all(image.shape[-2] >= image.shape[-1] for image in images):
            height, width = width, height
        shape = [len(images), images[0].shape[0], max(height, max(i.shape[-2] for i in images)),
                 max(width, max(i.shape[-1] for i in images))]
        shape[2:] = [-(-side // size_divisible) * size_divisible for side in shape[2:]]
        batch = images[0].new_zeros(shape)
        for padded, image in zip(batch, images):
            padded[:, :image.shape[-2], :image.shape[-1]].copy_(image)
        return batch

    def forward(self, images, targets=None):
        """GeneralizedRCNNTransform.forward with the per-image operators that do not need an image's
        own shape issued once for the batch, on a step bound by the host's launches: the
        normalisation (foreach operators over every image's channels) and the boxes' and polygon
        edges' scaling (scale_targets). The same numbers bit for bit; what batchable refuses, or a
        skipped resize, takes torchvision's way."""
        images = list(images)
        if not batchable(images, targets, len(self.image_mean)) or (self.training and getattr(self, "_skip_resize", False)):
            return super().forward(images, targets)
        images = self.normalize_batch(images)
        targets = None if targets is None else [dict(t) for t in targets]
        moves = []
        for i, image in enumerate(images):
            images[i], resized = self.resize_image(image, None if targets is None else targets[i])
            if targets is not None:
                targets[i] = resized
            moves.append((tuple(image.shape[-2:]), tuple(images[i].shape[-2:])))
        if targets is not None:
            scale_targets(targets, moves)
        sizes = [new for _, new in moves]
        return ImageList(self.batch_images(images, size_divisible=self.size_divisible), sizes), targets

    def normalize_batch(self, images: list[torch.Tensor]) -> list[torch.Tensor]:
        """normalize for every image at once: a copy, a subtraction and a division over all the images'
        channels (foreach operators: a few launches for the batch instead of two an image), with the
        mean and deviation as float32 scalars, as normalize's broadcast takes them."""
        out = [torch.empty_like(image, memory_format=torch.contiguous_format) for image in images]
        channels = [c for image in out for c in image.unbind(0)]
        torch._foreach_copy_(channels, [c for image in images for c in image.unbind(0)])
        torch._foreach_sub_(channels, [float(m) for m in self.image_mean] * len(images))
        torch._foreach_div_(channels, [float(s) for s in self.image_std] * len(images))
        return out

    def normalize(self, image: torch.Tensor) -> torch.Tensor:
        """The same arithmetic with the mean and std kept on the device: torchvision copies them
        there for every image, and each copy waits for the GPU."""
        if not image.is_floating_point():
            return super().normalize(image)  # torchvision's error
        mean, std = self.on_device(self.image_mean, image), self.on_device(self.image_std, image)
        return (image - mean[:, None, None]) / std[:, None, None]

    def resize_boxes(self, boxes: torch.Tensor, original_size, new_size) -> torch.Tensor:
        return scale_boxes(boxes, original_size, new_size)

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
