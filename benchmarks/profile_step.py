"""Where a training step's time goes: per-stage wall time (synchronised) and the top operators.

    python benchmarks/profile_step.py --batch 16
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.train_throughput import our_model, synthetic_batch, to_device  # noqa: E402
from object_detection.train import make_optimizer  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=5)
    args = p.parse_args()
    device = torch.device("cuda")
    backbone = Path("/tmp/bench_resnet50.pth")
    if not backbone.exists():
        import torchvision
        torch.save(torchvision.models.resnet50().state_dict(), backbone)
    model = our_model(device, backbone, channels_last=True)
    opt = make_optimizer(model, 0.01, fused=True)
    batches = [synthetic_batch(args.batch, "cpu", seed=s) for s in range(2)]

    stages = {}

    def timed(name, fn):
        def wrapper(*a, **k):
            torch.cuda.synchronize()
            t = time.perf_counter()
            out = fn(*a, **k)
            torch.cuda.synchronize()
            stages[name] = stages.get(name, 0) + time.perf_counter() - t
            return out
        return wrapper

    model.transform.forward = timed("transform", model.transform.forward)
    model.backbone.forward = timed("backbone+fpn", model.backbone.forward)
    model.rpn.forward = timed("rpn", model.rpn.forward)
    model.roi_heads.forward = timed("roi_heads", model.roi_heads.forward)

    def step(i):
        images, targets = to_device(*batches[i % 2], device)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = sum(model(images, targets).values())
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        t = time.perf_counter()
        loss.backward()
        torch.cuda.synchronize()
        stages["backward"] = stages.get("backward", 0) + time.perf_counter() - t
        t = time.perf_counter()
        opt.step()
        torch.cuda.synchronize()
        stages["optimizer"] = stages.get("optimizer", 0) + time.perf_counter() - t

    for i in range(3):
        step(i)
    stages.clear()
    t0 = time.perf_counter()
    for i in range(args.steps):
        step(i)
    total = time.perf_counter() - t0
    print(f"batch {args.batch}: {total / args.steps * 1000:.1f} ms/step (synchronised stages)")
    for k, v in stages.items():
        print(f"  {k:<14} {v / args.steps * 1000:8.1f} ms")

    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for i in range(3):
            step(i)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=50))
    print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=20, max_name_column_width=50))


if __name__ == "__main__":
    main()
