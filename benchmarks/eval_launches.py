"""Kernel launches of evaluation's post-processing per batch, counted on any device.

    python -m benchmarks.eval_launches [--batches 8,32]

On the H200 evaluation is host-bound: each aten operation is one kernel launch (~8 us of the
host's time) and the GPU waits for them. This counts, per batch of images with 100 detections
each, the operations of the two per-image stages after the model: pasting the masks at the
original image size (the transform's postprocess) and turning detections into COCO results
(`detections_to_results`, masks RLE-encoded by the GPU path, here run on CPU tensors). View
operations launch nothing and are not counted. Half the images are 480x640, half 640x427, as
COCO mixes landscape and portrait.

Then the whole evaluation batch of 8 at the reference's score threshold: the MLPerf model's
forward (random ImageNet-shaped weights, 480x640 images) and the COCO conversion, and the width
of its detection NMS groups: the pairwise entries it computes against the 1000 x 1000 per class
of every proposal, which it computed before groups were cut after their last candidate.

Counts, not times: on a CPU the arithmetic dominates and says nothing of a GPU.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from benchmarks import save_result
from benchmarks.op_count import CountOps
from object_detection import evaluate
from object_detection.fast import nms, sync_free
from object_detection.model import build_model

try:
    from object_detection.coco_results import detections_to_results
    from object_detection.fast import rle_gpu
except ImportError:  # code before evaluation's speed pieces moved to object_detection.fast
    detections_to_results, rle_gpu = evaluate.detections_to_results, None


def gpu_path_on_cpu() -> None:
    """Send CPU tensors down the GPU encoding path (on a CPU, pycocotools' C encoder is used)."""
    try:
        from object_detection import rle
    except ImportError:  # code before the encoders left evaluate.py
        rle = None
    if rle_gpu is not None:
        rle_gpu.on_gpu = lambda masks: isinstance(masks, torch.Tensor)
    elif rle is not None:
        rle.on_gpu = lambda masks: isinstance(masks, torch.Tensor)
    elif hasattr(evaluate, "_on_gpu"):
        evaluate._on_gpu = lambda masks: isinstance(masks, torch.Tensor)
    else:  # code before the batch was encoded in one pass: one _encode_tensor per image
        def encode(masks):
            binary = masks[:, 0] if masks.dim() == 4 else masks
            return evaluate._encode_tensor(binary if binary.dtype == torch.bool else binary > 0.5)
        evaluate._encode_masks = encode


def to_results(outputs: list[dict], n_images: int):
    """COCO results of a batch as the trainer's `--speed fast` evaluator makes them."""
    if rle_gpu is None:
        return detections_to_results(outputs, list(range(n_images)), list(range(82)))
    return detections_to_results(outputs, list(range(n_images)), list(range(82)), encode=rle_gpu.encode_all)


def batch(n_images: int, detections: int, generator: torch.Generator):
    """What the RoI heads hand the transform: boxes in resized coordinates, 28x28 mask probabilities."""
    originals = [(480, 640) if i % 2 == 0 else (640, 427) for i in range(n_images)]
    resized = [(800, 1066) if h < w else (800, 533) for h, w in originals]
    result = []
    for h, w in resized:
        corner = torch.rand(detections, 2, generator=generator) * torch.tensor([w * 0.8, h * 0.8])
        size = torch.rand(detections, 2, generator=generator) * torch.tensor([w * 0.4, h * 0.4]) + 4
        result.append({"boxes": torch.cat([corner, corner + size], 1),
                       "labels": torch.randint(1, 81, (detections,), generator=generator),
                       "scores": torch.rand(detections, generator=generator),
                       "masks": torch.rand(detections, 1, 28, 28, generator=generator)})
    return result, resized, originals


def launches(n_images: int, detections: int = 100) -> dict:
    transform = build_model(81, backbone_weights=None).eval().transform
    result, resized, originals = batch(n_images, detections, torch.Generator().manual_seed(0))
    stages = {}
    with CountOps() as paste:
        outputs = transform.postprocess(result, resized, originals)
    stages["paste"] = paste.counts
    with CountOps() as convert:
        coco = to_results(outputs, n_images)
    stages["to_coco"] = convert.counts
    assert len(coco) == n_images * detections
    return {"images": n_images, "detections_per_image": detections,
            **{f"{name}_ops": sum(c.values()) for name, c in stages.items()},
            "ops_per_image": round(sum(sum(c.values()) for c in stages.values()) / n_images, 1),
            "most_frequent": {name: dict(c.most_common(6)) for name, c in stages.items()}}


@torch.no_grad()
def model_launches(n_images: int = 8, score_thresh: float = 0.05) -> dict:
    """Operations of a whole evaluation batch: the MLPerf model's forward (its second, so one-time
    set-up is not counted) at the reference's threshold, with the NMS the GPU runs (fixed_point_nms;
    there torch.compile fuses each of its passes into one kernel, here each is several operations),
    then the COCO conversion. And the width of the detection NMS's (image, class) groups, whose
    pairwise work goes with its square, against the uncut width (every proposal)."""
    from benchmarks.profile_eval import eval_model

    torch.manual_seed(0)
    model = eval_model(torch.device("cpu"))
    model.roi_heads.score_thresh = score_thresh
    g = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (3, 480, 640), generator=g).float() / 255 for _ in range(n_images)]
    shapes = []

    def recorded(boxes, valid, iou_threshold):
        shapes.append(tuple(boxes.shape[:2]))
        return nms.fixed_point_nms(boxes, valid, iou_threshold)

    inner, sync_free.greedy_nms = sync_free.greedy_nms, recorded
    try:
        model(images)
        with CountOps() as counted:
            outputs = model(images)
            to_results(outputs, n_images)
    finally:
        sync_free.greedy_nms = inner
    groups, width = shapes[-1]  # the detection NMS (the RPN's came first)

    def padded(w):
        return -(-w // nms.NMS_WIDTH_STEP) * nms.NMS_WIDTH_STEP

    uncut = padded(model.rpn.post_nms_top_n())
    return {"images": n_images, "score_thresh": score_thresh, "ops": sum(counted.counts.values()),
            "most_frequent": dict(counted.counts.most_common(8)),
            "detection_nms": {"groups": groups, "width": width, "padded_width": padded(width),
                              "pairwise_entries_vs_uncut": round(padded(width) ** 2 / uncut ** 2, 3)},
            "detections_per_image": [len(o["boxes"]) for o in outputs]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", default="8,32")
    p.add_argument("--skip-model", action="store_true")
    p.add_argument("--output", type=Path,
                   default=Path(__file__).resolve().parent / "results" / "eval_launches.json")
    args = p.parse_args()
    gpu_path_on_cpu()
    result = {"launches": [launches(int(n)) for n in args.batches.split(",")]}
    for row in result["launches"]:
        print(json.dumps({k: v for k, v in row.items() if k != "most_frequent"}), flush=True)
    if not args.skip_model:
        result["model"] = model_launches()
        print(json.dumps({k: v for k, v in result["model"].items() if k != "most_frequent"}), flush=True)
    save_result(result, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
