"""The reference's polygon mask targets in one Triton kernel: crop, scale and rasterisation per RoI.

mask_targets.rasterise reproduces pycocotools' rleFrPoly in ~170 tensor operations a batch, each a
kernel launch the host issues while the step's heads wait on it (BENCHMARKS.md, stage 3). Here one
program per RoI does the same arithmetic: the RoI's box clipped to its image in float64, its
instance's edges shifted and scaled in float32 (PolygonInstance.crop and resize), each edge's walk on
the 5x grid and where it crosses every pixel column's centre line (the same float64 expressions in the
same order, floating-point contraction off, IEEE division), the crossings toggling a row per column,
each polygon's parity, and the union of the instance's polygons. Every target equals
mask_targets.rasterise's bit for bit (tests/test_mask_targets.py, under Triton's interpreter on a CPU;
on a GPU `python -m benchmarks.mask_targets` counts the RoIs drawn differently: none on an H100).
"""
from __future__ import annotations

import torch

from object_detection.fast.patch import triton_runs_on
from object_detection.mask_targets import draw_in_chunks

BLOCK = 32                       # lanes for the 28 pixel columns and the 29 crossing rows


def usable(edges: torch.Tensor, size: int) -> bool:
    """Whether the kernel can draw these RoIs: Triton, a GPU (or the interpreter), the grid in a block."""
    return triton is not None and size < BLOCK and triton_runs_on(edges)


def crop_and_rasterise(edges: torch.Tensor, boxes: torch.Tensor, limits: torch.Tensor, owner: torch.Tensor,
                       polygons: int, size: int) -> torch.Tensor:
    """mask_targets.rasterise(mask_targets.crop_and_scale(edges, boxes, limits, size), owner, polygons,
    size): (R, size, size) uint8 from edges (R, E, 4) float32 in image coordinates, boxes (R, 4), limits
    (R, 2) (each RoI's image height and width) and owner (R, E) (-1: padding). Where the kernel is not
    usable (a CPU), mask_targets.draw_in_chunks draws them."""
    if not usable(edges, size):
        return draw_in_chunks(edges, boxes, limits, owner, polygons, size)
    rois, count = owner.shape
    if rois == 0 or count == 0:
        return torch.zeros((rois, size, size), dtype=torch.uint8, device=edges.device)
    out = torch.empty((rois, size, size), dtype=torch.uint8, device=edges.device)  # every pixel is stored
    _kernel[(rois,)](edges.float().contiguous(), boxes.float().contiguous(), limits.float().contiguous(),
                     owner.contiguous(), out, count, max(polygons, 1), size=size, BLOCK=BLOCK,
                     enable_fp_fusion=False)  # a*b+c as two roundings, as the tensor operations compute it
    return out


try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only torch builds: usable() says no
    triton = None

if triton is not None:
    @triton.jit
    def _div(x, y):
        """x / y in float64, which Triton divides as IEEE does (div.rn.f64; its float32 `/` is approximate)."""
        return x / y

    @triton.jit
    def _fine(value):
        """C's (int) of value * 5 + 0.5: a coordinate on rleFrPoly's 5x grid."""
        return (value.to(tl.float64) * 5.0 + 0.5).to(tl.int64)

    @triton.jit
    def _kernel(edges_ptr, boxes_ptr, limits_ptr, owner_ptr, out_ptr, count, polygons,
                size: tl.constexpr, BLOCK: tl.constexpr):
        roi = tl.program_id(0).to(tl.int64)
        # PolygonInstance.crop: the box clipped to the image in float64 (Python floats), at least 1 px
        height = tl.load(limits_ptr + roi * 2).to(tl.float64)
        width = tl.load(limits_ptr + roi * 2 + 1).to(tl.float64)
        x0 = tl.minimum(tl.maximum(tl.load(boxes_ptr + roi * 4).to(tl.float64), 0.0), width - 1.0)
        y0 = tl.minimum(tl.maximum(tl.load(boxes_ptr + roi * 4 + 1).to(tl.float64), 0.0), height - 1.0)
        x1 = tl.maximum(tl.minimum(tl.maximum(tl.load(boxes_ptr + roi * 4 + 2).to(tl.float64), 0.0), width), x0 + 1.0)
        y1 = tl.maximum(tl.minimum(tl.maximum(tl.load(boxes_ptr + roi * 4 + 3).to(tl.float64), 0.0), height),
                        y0 + 1.0)
        ratio_w = _div(tl.zeros_like(x1) + size, x1 - x0).to(tl.float32)
        ratio_h = _div(tl.zeros_like(y1) + size, y1 - y0).to(tl.float32)
        x0f, y0f = x0.to(tl.float32), y0.to(tl.float32)

        lanes = tl.arange(0, BLOCK)
        c = (5 * lanes + 2).to(tl.int64)                       # pixel column k's centre line on the fine grid
        cd = c.to(tl.float64)
        rows = tl.arange(0, BLOCK)
        drawn = tl.zeros((BLOCK, BLOCK), dtype=tl.int32)       # (columns, rows)
        for polygon in range(0, polygons):
            toggles = tl.zeros((BLOCK, BLOCK), dtype=tl.int32)
            for e in range(0, count):
                at = edges_ptr + (roi * count + e) * 4
                # PolygonInstance.resize in float32, then rleFrPoly's walk of the edge
                ax = _fine((tl.load(at) - x0f) * ratio_w)
                ay = _fine((tl.load(at + 1) - y0f) * ratio_h)
                bx = _fine((tl.load(at + 2) - x0f) * ratio_w)
                by = _fine((tl.load(at + 3) - y0f) * ratio_h)
                mine = tl.load(owner_ptr + roi * count + e) == polygon
                dx, dy = tl.abs(bx - ax), tl.abs(by - ay)
                shallow = dx >= dy
                swap = tl.where(shallow, ax > bx, ay > by)
                xs, xe = tl.where(swap, bx, ax), tl.where(swap, ax, bx)
                ys, ye = tl.where(swap, by, ay), tl.where(swap, ay, by)
                slope = tl.where(shallow, _div((ye - ys).to(tl.float64), dx.to(tl.float64)),
                                 _div((xe - xs).to(tl.float64), dy.to(tl.float64)))
                xsd, ysd = xs.to(tl.float64), ys.to(tl.float64)
                # a shallow edge: its row where the walk passes the column, the lower of two steps
                t = tl.maximum(c - xs, 0).to(tl.float64)
                shallow_row = tl.minimum((ysd + slope * t + 0.5).to(tl.int64),
                                         (ysd + slope * (t + 1.0) + 0.5).to(tl.int64))
                shallow_hit = (xs <= c) & (c < xe)
                # a steep edge: the one step among four around the estimate that crosses the column
                estimate = tl.floor(_div(cd + 0.5 - xsd, tl.where(slope == 0.0, 1.0, slope)))
                first = tl.minimum(tl.maximum(estimate, -4.0), 1099511627776.0).to(tl.int64)
                steep_hit = tl.zeros((BLOCK,), dtype=tl.int1)
                steep_row = ys + tl.zeros((BLOCK,), dtype=tl.int64)
                for j in tl.static_range(4):
                    step = tl.maximum(first + (j - 2), 0)
                    here = (xsd + slope * step.to(tl.float64) + 0.5).to(tl.int64)
                    there = (xsd + slope * (step + 1).to(tl.float64) + 0.5).to(tl.int64)
                    crosses = (step < dy) & (here != there) & (tl.minimum(here, there) == c)
                    steep_hit = steep_hit | crosses
                    steep_row += tl.where(crosses, step, 0)
                steep_hit = tl.where(slope != 0.0, steep_hit, 0) != 0
                hit = tl.where(shallow, shallow_hit, steep_hit) & mine & (lanes < size)
                fine_row = tl.where(shallow, shallow_row, steep_row)
                row = tl.ceil(tl.minimum(tl.maximum(_div(fine_row.to(tl.float64) + 0.5, 5.0) - 0.5, 0.0),
                                         size * 1.0)).to(tl.int32)
                toggles ^= ((rows[None, :] == row[:, None]) & hit[:, None]).to(tl.int32)
            drawn |= tl.cumsum(toggles, axis=1) & 1            # this polygon's inside, united with the others'
        keep = (lanes[:, None] < size) & (rows[None, :] < size)
        tl.store(out_ptr + roi * size * size + rows[None, :] * size + lanes[:, None], drawn.to(tl.uint8), mask=keep)
