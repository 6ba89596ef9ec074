"""Convolution, bias, residual and ReLU: today's way (cuDNN's convolution, then fast.bias_act's
Triton pass, or for the heads the bias `add_` and the ReLU) against one cuDNN call that fuses them
(torch.cudnn_convolution_relu / cudnn_convolution_add_relu), forward only, on the convolutions of
one training forward of the closed profile at 12 images of 800x1216 (bf16, channels_last).

`python -m benchmarks.conv_fusion` (a GPU): each shape's time both ways (CUDA events, the median of
20 after 5), weighted by how often a forward meets it; the largest difference of the fused output
from today's, relative to the output's largest value. Results: BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks import save_result
from object_detection.fast.bias_act import bias_act

# (name, count in a forward, images, in channels, height, width, out channels, kernel, stride,
#  residual: the block's last convolution adds its shortcut, head: bias add_ and ReLU as torch does them)
B = 12
SHAPES = [
    ("stem 7x7", 1, B, 3, 800, 1216, 64, 7, 2, False, False),
    ("layer1 1x1 in", 1, B, 64, 200, 304, 64, 1, 1, False, False),
    ("layer1 1x1 in", 2, B, 256, 200, 304, 64, 1, 1, False, False),
    ("layer1 3x3", 3, B, 64, 200, 304, 64, 3, 1, False, False),
    ("layer1 1x1 out+res", 3, B, 64, 200, 304, 256, 1, 1, True, False),
    ("layer2 1x1 in", 1, B, 256, 200, 304, 128, 1, 1, False, False),
    ("layer2 1x1 in", 3, B, 512, 100, 152, 128, 1, 1, False, False),
    ("layer2 3x3 s2", 1, B, 128, 200, 304, 128, 3, 2, False, False),
    ("layer2 3x3", 3, B, 128, 100, 152, 128, 3, 1, False, False),
    ("layer2 1x1 out+res", 4, B, 128, 100, 152, 512, 1, 1, True, False),
    ("layer3 1x1 in", 1, B, 512, 100, 152, 256, 1, 1, False, False),
    ("layer3 1x1 in", 5, B, 1024, 50, 76, 256, 1, 1, False, False),
    ("layer3 3x3 s2", 1, B, 256, 100, 152, 256, 3, 2, False, False),
    ("layer3 3x3", 5, B, 256, 50, 76, 256, 3, 1, False, False),
    ("layer3 1x1 out+res", 6, B, 256, 50, 76, 1024, 1, 1, True, False),
    ("layer4 1x1 in", 1, B, 1024, 50, 76, 512, 1, 1, False, False),
    ("layer4 1x1 in", 2, B, 2048, 25, 38, 512, 1, 1, False, False),
    ("layer4 3x3 s2", 1, B, 512, 50, 76, 512, 3, 2, False, False),
    ("layer4 3x3", 2, B, 512, 25, 38, 512, 3, 1, False, False),
    ("layer4 1x1 out+res", 3, B, 512, 25, 38, 2048, 1, 1, True, False),
    ("rpn head 3x3 P2", 1, B, 256, 200, 304, 256, 3, 1, False, True),
    ("rpn head 3x3 P3", 1, B, 256, 100, 152, 256, 3, 1, False, True),
    ("rpn head 3x3 P4", 1, B, 256, 50, 76, 256, 3, 1, False, True),
    ("rpn head 3x3 P5", 1, B, 256, 25, 38, 256, 3, 1, False, True),
    ("mask head 3x3", 4, 448, 256, 14, 14, 256, 3, 1, False, True),
]


def timed(fn, warmup: int = 5, runs: int = 20) -> float:
    """The median of `runs` calls in ms, by CUDA events."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def one_shape(images, cin, height, width, cout, kernel, stride, residual, head, dtype) -> dict:
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(images, cin, height, width, device="cuda", generator=g).to(dtype)
    x = x.contiguous(memory_format=torch.channels_last)
    w = (torch.randn(cout, cin, kernel, kernel, device="cuda", generator=g) / (cin * kernel * kernel) ** 0.5)
    w = w.to(dtype).contiguous(memory_format=torch.channels_last)
    b = torch.randn(cout, device="cuda", generator=g).to(dtype)
    padding = kernel // 2
    out_h, out_w = (height + 2 * padding - kernel) // stride + 1, (width + 2 * padding - kernel) // stride + 1
    z = torch.randn(images, cout, out_h, out_w, device="cuda", generator=g).to(dtype)
    z = z.contiguous(memory_format=torch.channels_last) if residual else None

    def today():
        if head:
            return F.relu(F.conv2d(x, w, b, stride, padding))
        return bias_act(F.conv2d(x, w, None, stride, padding), b, z)

    def fused():
        if z is None:
            return torch.cudnn_convolution_relu(x, w, b, (stride, stride), (padding, padding), (1, 1), 1)
        return torch.cudnn_convolution_add_relu(x, w, z, 1.0, b, (stride, stride), (padding, padding), (1, 1), 1)

    with torch.no_grad():
        a, c = today(), fused()
        diff = ((a.float() - c.float()).abs().max() / a.float().abs().max().clamp_min(1e-6)).item()
        return {"today_ms": timed(today), "fused_ms": timed(fused), "max_rel_diff": diff,
                "fused_channels_last": c.is_contiguous(memory_format=torch.channels_last)}


def check_cudnn_fusion(device) -> dict:
    """fast.cudnn_fusion's conv_bias_relu (cuDNN's fused forward, autograd's backward) against F.conv2d,
    the bias, the shortcut and the ReLU as separate operators: the output and the input's, weight's and
    bias's gradients, each way's largest difference from the separate operators in fp32 without TF32,
    relative to that reference's largest value. In fp32 the fused way must match it (the same
    arithmetic); in bf16 under autocast (the trainer's) it must be no farther from it than today's
    way: bf16 rounds the pre-activations, and where one lands on the other side of the ReLU's zero a
    gradient entry changes by the whole upstream value, in either way. On a layer2-sized bottleneck
    convolution with and without its shortcut and a mask-head one; inputs and weights representable
    in bf16, so every way starts from the same numbers."""
    from benchmarks.step_checks import tf32_off
    from object_detection.fast.cudnn_fusion import conv_bias_relu

    def bf16_exact(t: torch.Tensor) -> torch.Tensor:
        return t.bfloat16().float().to(device)

    g = torch.Generator().manual_seed(0)
    worst = {}
    for name, (images, cin, size, cout, kernel, residual) in {
            "1x1+res": (4, 128, 100, 512, 1, True), "3x3": (4, 128, 100, 128, 3, False),
            "mask": (256, 256, 14, 256, 3, False)}.items():
        conv = torch.nn.Conv2d(cin, cout, kernel, padding=kernel // 2).to(device)
        with torch.no_grad():
            conv.weight.copy_(bf16_exact(conv.weight))
            conv.bias.copy_(bf16_exact(conv.bias))
        x = bf16_exact(torch.randn(images, cin, size, size, generator=g)).contiguous(memory_format=torch.channels_last)
        z = bf16_exact(torch.randn(images, cout, size, size, generator=g)) if residual else None
        grad = bf16_exact(torch.randn(images, cout, size, size, generator=g))
        ways = {}
        for way, fused, dtype in (("reference", False, None), ("fused-fp32", True, None),
                                  ("today-bf16", False, torch.bfloat16), ("fused-bf16", True, torch.bfloat16)):
            a = x.clone().requires_grad_()
            conv.zero_grad()
            with tf32_off(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype is not None):
                out = (conv_bias_relu(a, conv.weight, conv.bias, conv, z) if fused
                       else (conv(a) + (z if residual else 0)).relu())
            out.backward(grad.to(out.dtype))
            ways[way] = [out.float(), a.grad.float(), conv.weight.grad.clone(), conv.bias.grad.clone()]
        reference = ways.pop("reference")
        worst[name] = {way: [round(((u - v).abs().max() / v.abs().max().clamp_min(1e-12)).item(), 6)
                             for u, v in zip(found, reference)] for way, found in ways.items()}
    ok = all(max(w["fused-fp32"]) <= 1e-5 and all(f <= 1.5 * t + 1e-3 for f, t in zip(w["fused-bf16"], w["today-bf16"]))
             for w in worst.values())
    return {"max_rel_diff_from_fp32_out_input_weight_bias": worst, "ok": ok}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--output", type=Path, default=Path("benchmarks/results/conv_fusion.json"))
    args = p.parse_args()
    torch.backends.cudnn.benchmark = False  # as the trainer
    rows, totals = [], {"today_ms": 0.0, "fused_ms": 0.0}
    for name, count, *shape in SHAPES:
        try:
            found = one_shape(*shape, dtype=torch.bfloat16)
        except RuntimeError as error:  # a shape cuDNN's fusion engines do not take
            found = {"error": str(error).splitlines()[0][:200]}
        rows.append({"name": name, "count": count, "shape": shape, **found})
        if "error" not in found:
            for key in totals:
                totals[key] += count * found[key]
        print(name, count, {k: (round(v, 4) if isinstance(v, float) else v) for k, v in found.items()}, flush=True)
    print(f"a forward's convolutions: today {totals['today_ms']:.2f} ms, fused {totals['fused_ms']:.2f} ms")
    save_result({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                 "cudnn": torch.backends.cudnn.version(), "rows": rows,
                 **{k: round(v, 3) for k, v in totals.items()}}, args.output)


if __name__ == "__main__":
    main()
