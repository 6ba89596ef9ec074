"""Multi-scale RoIAlign in one kernel over the channels_last feature maps, in their own dtype.

torchvision's MultiScaleRoIAlign runs `roi_align` once per FPN level, and that op wants NCHW float32:
under bf16 autocast every level is converted (layout, then dtype) for the box pooler and again for the
mask pooler, its backward writes float32 NCHW gradients that are cast back and meet the RPN head's
channels_last gradients in slow, unvectorised additions, and each level adds index and scatter kernels.
Here one Triton kernel pools every RoI from its own level, reading the channels_last maps as they are
(bf16 values widened to float32: the same numbers torchvision pools after its cast) and accumulating in
float32; the backward adds into float32 channels_last buffers, cast once to the maps' dtype. Same
arithmetic as torchvision's roi_align (sampling grid, clamping, bilinear weights, the mean; IEEE
division where Triton's own is approximate).

It needs the maps channels_last (fast.channels_last) and a fixed sampling ratio (the recipe's 2); other
inputs take the per-level path. On a CPU it runs only under Triton's interpreter (TRITON_INTERPRET=1:
the tests).
"""
from __future__ import annotations

import torch
from torchvision.ops.poolers import _convert_to_roi_format, _filter_input, _setup_scales

from object_detection.fast.patch import triton_runs_on

MAX_LEVELS = 4
_BLOCK_CHANNELS = 64


def usable(features: list[torch.Tensor], sampling_ratio: int) -> bool:
    """Whether the kernel can pool these maps: channels_last, one dtype and device, at most four levels."""
    first = features[0]
    return (0 < len(features) <= MAX_LEVELS and sampling_ratio > 0 and _kernels() is not None
            and triton_runs_on(first) and first.dtype in (torch.float32, torch.bfloat16, torch.float16)
            and all(f.dim() == 4 and f.is_contiguous(memory_format=torch.channels_last) and f.dtype == first.dtype
                    and f.device == first.device and f.shape[:2] == first.shape[:2] for f in features))


class FusedRoIAlign:
    """A MultiScaleRoIAlign (torchvision's, or fast.sync_free's) that pools by the kernel where
    `usable` says it can, and as before elsewhere. With `channels_last_output` (the mask pooler under
    fast.Options.mask_channels_last) the kernel writes the pooled RoIs channels_last, the layout the
    mask branch's convolutions take, instead of a copy converting them."""

    channels_last_output = False

    def forward(self, x, boxes, image_shapes):
        features = _filter_input(x, self.featmap_names)
        if not usable(features, self.sampling_ratio):
            return super().forward(x, boxes, image_shapes)
        if self.scales is None or self.map_levels is None:
            self.scales, self.map_levels = _setup_scales(features, image_shapes, self.canonical_scale,
                                                          self.canonical_level)
        rois = _convert_to_roi_format(boxes)
        levels = (self.map_levels([rois[:, 1:]]) if len(features) > 1
                  else torch.zeros(len(rois), dtype=torch.int64, device=rois.device))
        return multiscale_roi_align(features, rois, levels, self.scales, self.output_size, self.sampling_ratio,
                                    channels_last=self.channels_last_output)


def use_fused_roi_align(model, mask_channels_last: bool = False) -> None:
    from object_detection.fast.patch import mix_in

    for pool in (model.roi_heads.box_roi_pool, model.roi_heads.mask_roi_pool):
        if pool is not None:
            mix_in(pool, FusedRoIAlign)
    if mask_channels_last and model.roi_heads.mask_roi_pool is not None:
        model.roi_heads.mask_roi_pool.channels_last_output = True


def multiscale_roi_align(features: list[torch.Tensor], rois: torch.Tensor, levels: torch.Tensor,
                         scales: list[float], output_size: tuple[int, int], sampling_ratio: int,
                         aligned: bool = False, channels_last: bool = False) -> torch.Tensor:
    """RoIAlign of RoI k ([batch index, x1, y1, x2, y2] in rois[k]) on features[levels[k]] at
    scales[levels[k]]: [K, C, *output_size] in the maps' dtype, contiguous (or channels_last)."""
    spec = (tuple(float(s) for s in scales), tuple(output_size), int(sampling_ratio), bool(aligned),
            bool(channels_last))
    return _RoIAlign.apply(rois, levels, spec, *features)


class _RoIAlign(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rois, levels, spec, *features):
        scales, (height, width), samples, aligned, nhwc = spec
        rois = rois.detach().float().contiguous()
        levels = levels.to(torch.int32).contiguous()
        count, channels = rois.shape[0], features[0].shape[1]
        out = torch.empty((count, channels, height, width), dtype=features[0].dtype, device=features[0].device,
                          memory_format=torch.channels_last if nhwc else torch.contiguous_format)
        if count:
            forward_kernel, _ = _kernels()
            forward_kernel[(count, -(-channels // _BLOCK_CHANNELS))](
                rois, levels, out, *_level_args(features, scales), channels,
                PH=height, PW=width, SAMPLES=samples, ALIGNED=aligned, POOLED_NHWC=nhwc,
                BLOCK_BINS=_pow2(height * width), BLOCK_C=_BLOCK_CHANNELS)
        ctx.spec = spec
        ctx.shapes = [(f.shape, f.dtype) for f in features]
        ctx.save_for_backward(rois, levels)
        return out

    @staticmethod
    def backward(ctx, grad):
        rois, levels = ctx.saved_tensors
        scales, (height, width), samples, aligned, _ = ctx.spec
        channels = ctx.shapes[0][0][1]
        # the gradient read in the layout it comes in (channels_last from the mask branch's convolutions)
        nhwc = not grad.is_contiguous() and grad.is_contiguous(memory_format=torch.channels_last)
        # float32 accumulators laid out [N, H, W, C]: the maps' channels_last order
        buffers = [grad.new_zeros((shape[0], shape[2], shape[3], shape[1]), dtype=torch.float32)
                   for shape, _ in ctx.shapes]
        if rois.shape[0]:
            _, backward_kernel = _kernels()
            backward_kernel[(rois.shape[0], -(-channels // _BLOCK_CHANNELS))](
                rois, levels, grad if nhwc else grad.contiguous(), *_level_args(buffers, scales, nhwc=True),
                channels, PH=height, PW=width, SAMPLES=samples, ALIGNED=aligned, POOLED_NHWC=nhwc,
                BLOCK_BINS=_pow2(height * width), BLOCK_C=_BLOCK_CHANNELS)
        grads = [b.permute(0, 3, 1, 2).to(feature_dtype) for b, (_, feature_dtype) in zip(buffers, ctx.shapes)]
        return (None, None, None, *(g if need else None for g, need in zip(grads, ctx.needs_input_grad[3:])))


def _level_args(maps: list[torch.Tensor], scales, nhwc: bool = False) -> list:
    """Four (map, height, width, scale) groups, the last level repeated where there are fewer."""
    maps, scales = list(maps), list(scales)
    while len(maps) < MAX_LEVELS:
        maps.append(maps[-1])
        scales.append(scales[-1])
    heights = [m.shape[1] if nhwc else m.shape[2] for m in maps]
    widths = [m.shape[2] if nhwc else m.shape[3] for m in maps]
    return [*maps, *heights, *widths, *scales]


def _pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def _kernels():
    """(forward, backward) Triton kernels, or None where Triton is not installed."""
    return (roi_align_forward, roi_align_backward) if triton is not None else None


try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only torch builds: usable() says no
    triton = None

if triton is not None:  # Triton resolves a kernel's helpers among the module's globals
    @triton.jit
    def _level(level, a, b, c, d):
        return tl.where(level == 0, a, tl.where(level == 1, b, tl.where(level == 2, c, d)))

    @triton.jit
    def _divide(x, n):
        """x / n rounded as IEEE division (Triton's `/` on float32 is approximate): as torchvision computes."""
        return tl.math.div_rn(x, tl.zeros_like(x) + n)

    @triton.jit
    def _corners(y, x, height, width, channels, c):
        """torchvision's bilinear_interpolate(_gradient) for a column of sampling points: the four pixels'
        element offsets in the image's [H, W, C] map for channels `c`, their weights (zero for points
        beyond the map), and which points lie inside."""
        inside = (y >= -1.0) & (y <= height) & (x >= -1.0) & (x <= width)
        y = tl.maximum(y, 0.0)
        x = tl.maximum(x, 0.0)
        y_low = y.to(tl.int32)
        x_low = x.to(tl.int32)
        y_edge = y_low >= height - 1
        x_edge = x_low >= width - 1
        y_low = tl.where(y_edge, height - 1, y_low)
        x_low = tl.where(x_edge, width - 1, x_low)
        y_high = tl.where(y_edge, y_low, y_low + 1)
        x_high = tl.where(x_edge, x_low, x_low + 1)
        y = tl.where(y_edge, y_low.to(tl.float32), y)
        x = tl.where(x_edge, x_low.to(tl.float32), x)
        ly = y - y_low
        lx = x - x_low
        hy = 1.0 - ly
        hx = 1.0 - lx
        zero = tl.zeros_like(ly)
        return ((y_low * width + x_low)[:, None] * channels + c[None, :],
                (y_low * width + x_high)[:, None] * channels + c[None, :],
                (y_high * width + x_low)[:, None] * channels + c[None, :],
                (y_high * width + x_high)[:, None] * channels + c[None, :],
                tl.where(inside, hy * hx, zero)[:, None], tl.where(inside, hy * lx, zero)[:, None],
                tl.where(inside, ly * hx, zero)[:, None], tl.where(inside, ly * lx, zero)[:, None], inside[:, None])

    @triton.jit
    def _program(rois_ptr, levels_ptr, m0, m1, m2, m3, h0, h1, h2, h3, w0, w1, w2, w3, s0, s1, s2, s3, channels,
                 PH: tl.constexpr, PW: tl.constexpr, ALIGNED: tl.constexpr, BLOCK_BINS: tl.constexpr,
                 BLOCK_C: tl.constexpr, POOLED_NHWC: tl.constexpr):
        """This program's share (RoI program_id(0), channel block program_id(1)), as torchvision's
        roi_align sets it up: the start of the RoI's image in its level's map (m0..m3: maps or their
        gradient buffers), that map's size, the sampling grid's origin and bin size, each bin's row and
        column, the channels, which (bin, channel) pairs exist and where they are in the pooled
        [K, C, PH, PW] tensor (laid out [K, PH, PW, C] with POOLED_NHWC)."""
        k = tl.program_id(0)
        level = tl.load(levels_ptr + k)
        image = tl.load(rois_ptr + k * 5).to(tl.int64)
        scale = _level(level, s0, s1, s2, s3)
        height = _level(level, h0, h1, h2, h3)
        width = _level(level, w0, w1, w2, w3)
        offset = 0.5 if ALIGNED else 0.0
        start_x = tl.load(rois_ptr + k * 5 + 1) * scale - offset
        start_y = tl.load(rois_ptr + k * 5 + 2) * scale - offset
        roi_w = tl.load(rois_ptr + k * 5 + 3) * scale - offset - start_x
        roi_h = tl.load(rois_ptr + k * 5 + 4) * scale - offset - start_y
        if not ALIGNED:
            roi_w = tl.maximum(roi_w, 1.0)
            roi_h = tl.maximum(roi_h, 1.0)
        base = _level(level, m0, m1, m2, m3) + image * height * width * channels
        bins = tl.arange(0, BLOCK_BINS)
        c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        wanted = (bins < PH * PW)[:, None] & (c < channels)[None, :]
        if POOLED_NHWC:
            pooled = k.to(tl.int64) * channels * PH * PW + bins[:, None] * channels + c[None, :]
        else:
            pooled = k.to(tl.int64) * channels * PH * PW + c[None, :] * (PH * PW) + bins[:, None]
        return (base, height, width, start_y, start_x, _divide(roi_h, PH), _divide(roi_w, PW),
                (bins // PW).to(tl.float32), (bins % PW).to(tl.float32), c, wanted, pooled)

    @triton.jit
    def _sample(start, bin_index, bin_size, i: tl.constexpr, SAMPLES: tl.constexpr):
        """Sampling point i of each bin along one axis: start + bin * size + (i + 0.5) * size / samples."""
        return start + bin_index * bin_size + _divide((i + 0.5) * bin_size, SAMPLES)

    @triton.jit
    def roi_align_forward(rois_ptr, levels_ptr, out_ptr, f0, f1, f2, f3, h0, h1, h2, h3, w0, w1, w2, w3,
                          s0, s1, s2, s3, channels, PH: tl.constexpr, PW: tl.constexpr, SAMPLES: tl.constexpr,
                          ALIGNED: tl.constexpr, BLOCK_BINS: tl.constexpr, BLOCK_C: tl.constexpr,
                          POOLED_NHWC: tl.constexpr):
        base, height, width, start_y, start_x, bin_h, bin_w, ph, pw, c, wanted, pooled = _program(
            rois_ptr, levels_ptr, f0, f1, f2, f3, h0, h1, h2, h3, w0, w1, w2, w3, s0, s1, s2, s3, channels,
            PH, PW, ALIGNED, BLOCK_BINS, BLOCK_C, POOLED_NHWC)
        total = tl.zeros([BLOCK_BINS, BLOCK_C], dtype=tl.float32)
        for iy in tl.static_range(SAMPLES):
            y = _sample(start_y, ph, bin_h, iy, SAMPLES)
            for ix in tl.static_range(SAMPLES):
                x = _sample(start_x, pw, bin_w, ix, SAMPLES)
                a1, a2, a3, a4, g1, g2, g3, g4, inside = _corners(y, x, height, width, channels, c)
                load = wanted & inside
                v1 = tl.load(base + a1, mask=load, other=0.0).to(tl.float32)
                v2 = tl.load(base + a2, mask=load, other=0.0).to(tl.float32)
                v3 = tl.load(base + a3, mask=load, other=0.0).to(tl.float32)
                v4 = tl.load(base + a4, mask=load, other=0.0).to(tl.float32)
                total += g1 * v1 + g2 * v2 + g3 * v3 + g4 * v4
        total = _divide(total, SAMPLES * SAMPLES)
        tl.store(out_ptr + pooled, total.to(out_ptr.dtype.element_ty), mask=wanted)

    @triton.jit
    def roi_align_backward(rois_ptr, levels_ptr, grad_ptr, b0, b1, b2, b3, h0, h1, h2, h3, w0, w1, w2, w3,
                           s0, s1, s2, s3, channels, PH: tl.constexpr, PW: tl.constexpr, SAMPLES: tl.constexpr,
                           ALIGNED: tl.constexpr, BLOCK_BINS: tl.constexpr, BLOCK_C: tl.constexpr,
                           POOLED_NHWC: tl.constexpr):
        base, height, width, start_y, start_x, bin_h, bin_w, ph, pw, c, wanted, pooled = _program(
            rois_ptr, levels_ptr, b0, b1, b2, b3, h0, h1, h2, h3, w0, w1, w2, w3, s0, s1, s2, s3, channels,
            PH, PW, ALIGNED, BLOCK_BINS, BLOCK_C, POOLED_NHWC)
        grad = _divide(tl.load(grad_ptr + pooled, mask=wanted, other=0.0).to(tl.float32), SAMPLES * SAMPLES)
        for iy in tl.static_range(SAMPLES):
            y = _sample(start_y, ph, bin_h, iy, SAMPLES)
            for ix in tl.static_range(SAMPLES):
                x = _sample(start_x, pw, bin_w, ix, SAMPLES)
                a1, a2, a3, a4, g1, g2, g3, g4, inside = _corners(y, x, height, width, channels, c)
                add = wanted & inside
                tl.atomic_add(base + a1, grad * g1, mask=add, sem="relaxed")
                tl.atomic_add(base + a2, grad * g2, mask=add, sem="relaxed")
                tl.atomic_add(base + a3, grad * g3, mask=add, sem="relaxed")
                tl.atomic_add(base + a4, grad * g4, mask=add, sem="relaxed")
