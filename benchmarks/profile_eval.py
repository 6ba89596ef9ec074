"""Where evaluation time goes per batch of 8: the model (with mask pasting) against the COCO
conversion, then the heaviest CUDA kernels and host operations of both.

    python -m benchmarks.profile_eval [--gn]

The model is the MLPerf one (frozen BatchNorm folded, fused biases) with random ImageNet-shaped
backbone weights, at score threshold 0: 100 detections per image, the slowest case
(`--score-thresh 0.05`: the reference's). `--gn` takes the GroupNorm model that shapes runs train
from scratch instead.
"""
import argparse
import os
import time
from pathlib import Path

import torch

from benchmarks import random_backbone
from object_detection.coco_results import detections_to_results
from object_detection import fast
from object_detection.fast.rle_gpu import encode_all
from object_detection.model import build_model


def eval_model(device, group_norm: bool = False, score_thresh: float = 0.0):
    """The model `invoke train` evaluates on COCO (or on shapes with `group_norm`), by default in
    the worst case: score threshold 0, so every image keeps 100 of its 80k (proposal, class)
    candidates. At the reference's 0.05 the random weights leave ~4.5k candidates per image, the
    most for one class ~730 (measured on two images on a CPU)."""
    weights = None
    if not group_norm:
        weights = random_backbone()
    model = build_model(81, backbone_weights=weights, speed=fast.Options.for_device(device.type)).to(device)
    model.roi_heads.score_thresh = score_thresh
    return model.eval()


@torch.no_grad()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gn", action="store_true")
    p.add_argument("--score-thresh", type=float, default=0.0)
    args = p.parse_args()
    device = torch.device("cuda")
    model = eval_model(device, args.gn, args.score_thresh)
    g = torch.Generator().manual_seed(0)
    imgs = [torch.randint(0, 256, (3, 480, 640), dtype=torch.uint8, generator=g).to(device).float() / 255
            for _ in range(8)]
    stages = {"model": 0.0, "to_coco": 0.0}

    def step():
        torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            outputs = model(imgs)
        torch.cuda.synchronize()
        t1 = time.perf_counter()
        detections_to_results(outputs, list(range(8)), list(range(82)), encode=encode_all)
        return t1 - t, time.perf_counter() - t1

    for i in range(8):
        model_s, coco_s = step()
        if i >= 3:
            stages["model"] += model_s
            stages["to_coco"] += coco_s
    lines = [f"{k:<10} {v / 5 * 1000:8.1f} ms per batch of 8 ({8 * 5 / v:.1f} img/s)" for k, v in stages.items()]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            step()
    table = prof.key_averages()
    lines.append(table.table(sort_by="self_cuda_time_total", row_limit=25, max_name_column_width=60))
    lines.append(table.table(sort_by="self_cpu_time_total", row_limit=20, max_name_column_width=60))
    text = "\n".join(lines)
    print(text)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], f"profile_eval-{args.score_thresh:g}.txt").write_text(text)


if __name__ == "__main__":
    main()
