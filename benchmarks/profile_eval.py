"""Where evaluation time goes per batch: the model (with mask pasting) against the COCO conversion.

    python benchmarks/profile_eval.py
"""
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from object_detection.evaluate import detections_to_coco  # noqa: E402
from object_detection.model import build_model, use_channels_last  # noqa: E402


@torch.no_grad()
def main() -> None:
    device = torch.device("cuda")
    model = build_model(81, backbone_weights=None).to(device)
    model.roi_heads.score_thresh = 0.0
    use_channels_last(model)
    model.eval()
    g = torch.Generator().manual_seed(0)
    imgs = [torch.randint(0, 256, (3, 480, 640), dtype=torch.uint8, generator=g).to(device).float() / 255
            for _ in range(8)]
    stages = {"model": 0.0, "to_coco_gpu_masks": 0.0, "to_coco_cpu_masks": 0.0}
    for i in range(6):
        torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            outputs = model(imgs)
        torch.cuda.synchronize()
        t1 = time.perf_counter()
        detections_to_coco([{**o, "masks": o["masks"] > 0.5} for o in outputs], list(range(8)), list(range(82)))
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        detections_to_coco([{k: v.cpu() for k, v in o.items()} | {"masks": (o["masks"] > 0.5).cpu()} for o in outputs],
                           list(range(8)), list(range(82)))
        t3 = time.perf_counter()
        if i >= 2:
            stages["model"] += t1 - t
            stages["to_coco_gpu_masks"] += t2 - t1
            stages["to_coco_cpu_masks"] += t3 - t2
    for k, v in stages.items():
        print(f"{k:<20} {v / 4 * 1000:8.1f} ms per batch of 8 ({8 * 4 / v:.1f} img/s)")


if __name__ == "__main__":
    main()
