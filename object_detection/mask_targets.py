"""The reference's mask targets, from polygons, on the training device.

maskrcnn-benchmark (the MLPerf reference) makes each positive RoI's 28x28 target from its ground-truth
instance's polygons: cropped to the RoI (`PolygonInstance.crop`), scaled to 28x28 (`resize`) and
rasterised by pycocotools (`frPyObjects`, `merge`, `decode`), on the CPU, RoI by RoI. torchvision instead
samples the full-image mask with RoIAlign (soft targets, and 20-40 MB of decoded masks a batch from the
loader). Here the reference's function runs batched on the device: the loader hands over polygon edges
(kilobytes), and `rasterise` reproduces pycocotools' rleFrPoly arithmetic exactly (the same 5x
upsampled integer boundary, the same crossing rows per pixel column), so every target equals the
reference's, bit for bit (tests/test_mask_targets.py checks it against pycocotools).

Polygons of an image travel as `polygon_edges(...)`: per instance, its edges padded to the image's
longest instance, (instances, edges, 4) as x0, y0, x1, y1, with the polygon each edge belongs to
(-1: padding); an instance's polygons are united, as merge does.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.models.detection.roi_heads import project_masks_on_boxes

from object_detection.fast.patch import host_values
from object_detection.fast.sampler import pad_blocks

UPSAMPLE = 5.0                       # rleFrPoly's scale: the boundary is traced on a 5x finer integer grid
GRID = 28                            # the mask head's resolution (the reference's discretization size)
# RoI-edge pairs rasterised at once: each takes ~2 KB of temporaries (28 columns, 4 candidate steps, in
# int64/float64), so a batch with one long polygon (hundreds of points pad every RoI) goes in chunks.
EDGES_AT_ONCE = 2**18


def polygon_edges(polygons: list[list[list[float]]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Edges and polygon numbers of an image's instances, each a list of COCO polygons [x, y, ...]:
    (N, E, 4) float32 and (N, E) int64, E the most edges of any instance (-1 marks padding)."""
    per_instance = []
    for polygons_of_one in polygons:
        edges, owner = [], []
        for number, flat in enumerate(polygons_of_one):
            points = np.asarray(flat, dtype=np.float32).reshape(-1, 2)
            edges.append(np.concatenate([points, np.roll(points, -1, axis=0)], axis=1))
            owner.append(np.full(len(points), number, dtype=np.int64))
        per_instance.append((np.concatenate(edges) if edges else np.zeros((0, 4), np.float32),
                             np.concatenate(owner) if owner else np.zeros(0, np.int64)))
    longest = max((len(e) for e, _ in per_instance), default=0)
    edges = torch.zeros((len(per_instance), longest, 4), dtype=torch.float32)
    owner = torch.full((len(per_instance), longest), -1, dtype=torch.int64)
    for i, (e, o) in enumerate(per_instance):
        edges[i, :len(e)] = torch.from_numpy(e)
        owner[i, :len(o)] = torch.from_numpy(o)
    return edges, owner


def flip_edges(edges: torch.Tensor, owner: torch.Tensor, width: int, offset: int) -> torch.Tensor:
    """Edges of a horizontally flipped image: x' = W - x - offset (the reference's TO_REMOVE = 1)."""
    flipped = edges.clone()
    flipped[..., 0::2] = torch.where(owner[..., None] >= 0, (width - offset) - edges[..., 0::2], 0.0)
    return flipped


def scale_edges(edges: torch.Tensor, original_size, new_size) -> torch.Tensor:
    """Edges of a resized image: x times new_w / old_w, y times new_h / old_h (PolygonInstance.resize:
    the ratios as Python floats, the product in float32)."""
    ratio_h, ratio_w = (float(new) / float(old) for new, old in zip(new_size, original_size))
    scaled = edges.clone()
    scaled[..., 0::2] *= ratio_w
    scaled[..., 1::2] *= ratio_h
    return scaled


def crop_and_scale(edges: torch.Tensor, boxes: torch.Tensor, limits: torch.Tensor, size: int) -> torch.Tensor:
    """Each RoI's edges in its size x size frame, as PolygonInstance.crop then resize compute them:
    the box clipped to its image (at least 1 px), coordinates shifted by its corner and scaled, in
    float32 like the reference's tensors. edges (R, E, 4), boxes (R, 4), limits (R, 2): each RoI's
    image height and width."""
    box, height, width = boxes.double(), limits[:, 0].double(), limits[:, 1].double()  # crop reads Python floats
    x0 = torch.minimum(box[:, 0].clamp(min=0), width - 1)
    y0 = torch.minimum(box[:, 1].clamp(min=0), height - 1)
    x1 = torch.maximum(torch.minimum(box[:, 2].clamp(min=0), width), x0 + 1)
    y1 = torch.maximum(torch.minimum(box[:, 3].clamp(min=0), height), y0 + 1)
    ratio_w, ratio_h = (size / (x1 - x0)).float(), (size / (y1 - y0)).float()
    x = (edges[..., 0::2] - x0.float()[:, None, None]) * ratio_w[:, None, None]
    y = (edges[..., 1::2] - y0.float()[:, None, None]) * ratio_h[:, None, None]
    return torch.stack([x[..., 0], y[..., 0], x[..., 1], y[..., 1]], dim=-1)


def _c_int(value: torch.Tensor) -> torch.Tensor:
    """C's (int) cast of a double: toward zero."""
    return torch.trunc(value).long()


def rasterise(edges: torch.Tensor, owner: torch.Tensor, polygons: int, size: int = GRID) -> torch.Tensor:
    """pycocotools' rasterisation of each row's polygons (united) on a size x size grid: rleFrPoly's
    boundary on the 5x grid, where it crosses each pixel column's centre line, and the run each
    crossing starts or ends. edges (R, E, 4) float32 in grid coordinates, owner (R, E) polygon
    numbers below `polygons` (-1: padding). Returns (R, size, size) uint8 (rows, columns). No host
    synchronisation: every shape is known from the arguments."""
    rois, count = owner.shape
    if rois == 0 or count == 0:
        return torch.zeros((rois, size, size), dtype=torch.uint8, device=edges.device)
    up = _c_int(UPSAMPLE * edges.double() + 0.5)                       # (R, E, 4): x0, y0, x1, y1 on the fine grid
    ax, ay, bx, by = up.unbind(-1)
    dx, dy = (bx - ax).abs(), (by - ay).abs()
    shallow = dx >= dy
    # Each edge's points as rleFrPoly walks them: along x where the edge is shallow, along y where steep,
    # from the end with the smaller coordinate of that axis (its `flip`).
    swap = torch.where(shallow, ax > bx, ay > by)
    xs, xe = torch.where(swap, bx, ax), torch.where(swap, ax, bx)
    ys, ye = torch.where(swap, by, ay), torch.where(swap, ay, by)
    slope = torch.where(shallow, (ye - ys).double() / dx.double(), (xe - xs).double() / dy.double())

    # Pixel column k's centre line lies between fine columns 5k+2 and 5k+3: a crossing is a step of the
    # walk from one to the other, at the lower of the two points' fine rows.
    column = torch.arange(size, device=edges.device)
    c = (5 * column + 2).view(1, 1, -1)                                # (1, 1, K)
    xs_, ys_, xe_ = xs[..., None], ys[..., None], xe[..., None]
    slope_ = slope[..., None]

    def v_at(t):  # the walk's fine row at step t of a shallow edge
        return _c_int(ys_.double() + slope_ * t.double() + 0.5)

    t = (c - xs_).clamp(min=0)
    shallow_row = torch.minimum(v_at(t), v_at(t + 1))
    shallow_hit = (xs_ <= c) & (c < xe_)

    # The step where the walk crosses, found exactly among four steps around the estimate (at most one
    # crosses: the walk is monotonic in x), all at once.
    length = dy[..., None, None]
    estimate = torch.floor((c.double() + 0.5 - xs_.double()) / slope_.masked_fill(slope_ == 0, 1.0))
    step = (estimate.clamp(-4, 2**40).long()[..., None] + torch.arange(-2, 2, device=edges.device)).clamp(min=0)
    xs4, slope4 = xs_[..., None].double(), slope_[..., None]
    here = _c_int(xs4 + slope4 * step.double() + 0.5)
    there = _c_int(xs4 + slope4 * (step + 1).double() + 0.5)
    crosses = (step < length) & (here != there) & (torch.minimum(here, there) == c[..., None])
    steep_hit = crosses.any(-1) & (slope_ != 0)
    steep_row = ys_ + (step * crosses).sum(-1)

    hit = torch.where(shallow[..., None], shallow_hit, steep_hit) & (owner[..., None] >= 0)
    fine_row = torch.where(shallow[..., None], shallow_row, steep_row)
    row = torch.ceil((((fine_row.double() + 0.5) / UPSAMPLE) - 0.5).clamp(0, size)).long()  # (R, E, K)

    polygons = max(polygons, 1)
    toggles = torch.zeros((rois, polygons, size, size + 1), dtype=torch.int32, device=edges.device)
    roi = torch.arange(rois, device=edges.device).view(-1, 1, 1).expand_as(row)
    flat = (((roi * polygons + owner.clamp(min=0)[..., None]) * size + column.view(1, 1, -1)) * (size + 1) + row)
    toggles.view(-1).index_add_(0, flat.reshape(-1), hit.reshape(-1).int())  # every index is in range
    inside = (toggles[..., :size].cumsum(-1) % 2).bool()               # (R, P, columns, rows)
    return inside.any(1).transpose(1, 2).to(torch.uint8)


def draw_in_chunks(edges: torch.Tensor, boxes: torch.Tensor, limits: torch.Tensor, owner: torch.Tensor,
                   polygons: int, size: int) -> torch.Tensor:
    """rasterise(crop_and_scale(...)) of every RoI, EDGES_AT_ONCE RoI-edge pairs at a time: (R, size,
    size) uint8. fast.rasterise.crop_and_rasterise draws the same in one Triton kernel."""
    chunk = max(1, EDGES_AT_ONCE // max(edges.shape[1], 1))
    return torch.cat([rasterise(crop_and_scale(edges[i:i + chunk], boxes[i:i + chunk], limits[i:i + chunk], size),
                                owner[i:i + chunk], polygons, size)
                      for i in range(0, max(len(boxes), 1), chunk)])


def polygon_targets(targets: list[dict], proposals: list[torch.Tensor], matched: list[torch.Tensor],
                    image_shapes: list[tuple[int, int]], size: int = GRID, draw=draw_in_chunks) -> list[torch.Tensor]:
    """The mask targets of the images whose instances came as polygons, in one rasterisation for the
    batch (a few hundred kernels a step with draw_in_chunks, not that many per image): for each positive
    RoI (in its resized image), its matched instance's polygons in the RoI's size x size frame, as float.
    Every image's instances are padded to the batch's longest edge list and gathered by one index for
    the batch (each RoI's image offset and size come from the host in pinned memory, without a wait)."""
    edges = pad_blocks([t["polygon_edges"] for t in targets])
    owner = pad_blocks([t["polygon_owner"] for t in targets], padding_value=-1)
    picks = [len(m) for m in matched]
    first = np.cumsum([0] + [len(t["polygon_edges"]) for t in targets[:-1]])
    index = torch.cat(matched) + host_values(np.repeat(first, picks), matched[0])
    limits = host_values(np.repeat(np.array(image_shapes, dtype=np.float32).reshape(-1, 2), picks, axis=0),
                         index, torch.float32)
    polygons = max(t["polygons"] for t in targets)
    drawn = draw(edges[index], torch.cat(proposals), limits, owner[index], polygons, size).float()
    return list(drawn.split(picks))


def mask_loss(mask_logits: torch.Tensor, proposals: list[torch.Tensor], targets: list[dict],
              matched: list[torch.Tensor], image_shapes: list[tuple[int, int]], draw=None,
              labels: torch.Tensor | None = None) -> torch.Tensor:
    """torchvision's maskrcnn_loss, each image's targets from its polygons where the loader gave them
    (the reference's recipe; drawn by `draw`, polygon_targets' default unless given), else from its full
    masks by RoIAlign (torchvision's). `labels`: the RoIs' classes where the caller has them (a
    positive's sampled label is its matched instance's class), instead of a gather per image."""
    size = mask_logits.shape[-1]
    if labels is None:
        labels = torch.cat([t["labels"][m] for t, m in zip(targets, matched)])
    drawn = [i for i, t in enumerate(targets) if "polygon_edges" in t]
    per_image = dict(zip(drawn, polygon_targets([targets[i] for i in drawn], [proposals[i] for i in drawn],
                                                [matched[i] for i in drawn], [image_shapes[i] for i in drawn],
                                                size, draw or draw_in_chunks))) if drawn else {}
    mask_targets = torch.cat([
        per_image[i] if i in per_image else project_masks_on_boxes(t["masks"], p, m, size)
        for i, (t, p, m) in enumerate(zip(targets, proposals, matched))])
    if mask_targets.numel() == 0:
        return mask_logits.sum() * 0
    return F.binary_cross_entropy_with_logits(
        mask_logits[torch.arange(labels.shape[0], device=labels.device), labels], mask_targets)
