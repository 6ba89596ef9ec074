"""Training-step throughput: our step against torchvision's Mask R-CNN, side by side.

The same synthetic batches for every variant, in one process, the variants interleaved in rounds
(median of the rounds' medians), so ratios are comparable on a shared machine. `--shapes coco`
(the default) draws COCO train2017's image shapes: 640 on the long side, landscape 4:3, 3:2, 16:9
and 5:4, a quarter of the batches portrait, one orientation per batch as the grouped sampler
gives them, 1-20 instances with masks; after the 800/1333 resize such batches pad to 800x1024-1344.
`--shapes legacy` draws the earlier 480-640 x 640 landscape images (3-12 instances).

Baselines: `torchvision-bf16` / `torchvision-fp16` is torchvision's MaskRCNN with the MLPerf recipe
(ImageNet ResNet-50 with FrozenBatchNorm2d, stem and layer1 frozen, 81 classes, 1000 proposals per
image, SGD with the reference's parameter groups), which is the same work as ours; `stock-fp16` is
maskrcnn_resnet50_fpn without pretrained weights (trainable BatchNorm, all five stages: more work).

    python -m benchmarks.train_throughput --batch-sizes 12 --iterations 20 --rounds 2
    invoke bench   (the same)

Writes JSON to benchmarks/results/ and prints a table. `--check` also compares, in fp32 on the
same weights and batch, the losses of our step and of torchvision's (must agree within 1e-3).
"""
from __future__ import annotations

import argparse
import datetime as dt
import gc
import inspect
import json
import math
import platform
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import torchvision
from torchvision.models import resnet50
from torchvision.models.detection import MaskRCNN, maskrcnn_resnet50_fpn
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.ops import FrozenBatchNorm2d

from benchmarks import calibrated_backbones, random_msra_backbone, save_result
from benchmarks.conv_fusion import check_cudnn_fusion
from object_detection import fast
from object_detection.engine import amp_dtype, make_optimizer, set_lr, to_device, train_step
from object_detection.fast.mask_branch import warm_mask_branch
from object_detection.fast.sampler import use_batched_sampler
from mlperf.datasets.shapes import COCO_SHAPES, COCO_WEIGHTS, PORTRAIT_SHARE  # COCO's image shapes
from object_detection.model import build_model
from object_detection.recipe import CLOSED_PROFILE, PROFILES, RECIPES, Schedule

RESULTS = Path(__file__).resolve().parent / "results"




def synthetic_batch(n: int, device, seed: int, shapes: str = "coco"):
    """A batch as the loader gives it (uint8 images) with targets: boxes, labels and masks."""
    g = torch.Generator().manual_seed(seed)
    portrait = shapes == "coco" and torch.rand(1, generator=g).item() < PORTRAIT_SHARE
    images, targets = [], []
    for _ in range(n):
        if shapes == "coco":
            h, w = COCO_SHAPES[int(torch.multinomial(torch.tensor(COCO_WEIGHTS), 1, generator=g))]
            h, w = (w, h) if portrait else (h, w)
            k = int(torch.randint(1, 21, (1,), generator=g))
            images.append(torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g))
        else:  # drawn in the order the earlier benchmark drew them, so its batches come out again
            h, w = int(torch.randint(480, 641, (1,), generator=g)), 640
            images.append(torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g))
            k = int(torch.randint(3, 13, (1,), generator=g))
        x0 = torch.rand(k, generator=g) * (w - 64)
        y0 = torch.rand(k, generator=g) * (h - 64)
        bw = 32 + torch.rand(k, generator=g) * (w - x0 - 32)
        bh = 32 + torch.rand(k, generator=g) * (h - y0 - 32)
        boxes = torch.stack([x0, y0, x0 + bw, y0 + bh], 1)
        masks = torch.zeros(k, h, w, dtype=torch.uint8)
        for i, (a, b, c, d) in enumerate(boxes.round().int().tolist()):
            masks[i, b:d, a:c] = 1
        targets.append({"boxes": boxes, "labels": torch.randint(1, 81, (k,), generator=g), "masks": masks})
    return images, targets


def pinned(batch):
    """A CPU batch in page-locked memory, as the trainer's DataLoader(pin_memory=True) hands it."""
    images, targets = batch
    return [i.pin_memory() for i in images], [{k: v.pin_memory() for k, v in t.items()} for t in targets]


def stock_model(device):
    """torchvision's maskrcnn_resnet50_fpn as a user would take it (BatchNorm, 91 classes)."""
    return maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, trainable_backbone_layers=3).to(device)


def torchvision_model(backbone: Path):
    """torchvision's MaskRCNN with the MLPerf recipe, as `maskrcnn_resnet50_fpn` builds it from an
    ImageNet backbone: frozen BatchNorm, layer2-4 trainable, 81 classes, 1000 proposals per image."""
    body = resnet50(norm_layer=FrozenBatchNorm2d)
    body.load_state_dict(torch.load(backbone, weights_only=True))
    return MaskRCNN(_resnet_fpn_extractor(body, 3), num_classes=81, rpn_post_nms_top_n_train=1000)


def our_model(device, backbone: Path, channels_last: bool | str, fold_bn: bool = True, compile_backbone: bool = False,
              batched_sampler: bool = True, sync_free: bool = True, fuse_bias: bool = True, fixed_canvas: bool = False,
              recipe: str = "torchvision", roi_align: bool = False, padded_heads: bool = False, nms_scan: bool = False,
              cuda_graphs: bool = False, reference_weights: Path | None = None, mask_roi_bucket: bool = False,
              mask_channels_last: bool = False, cudnn_fusion: bool = False, fpn_broadcast: bool = False):
    """channels_last: "rpn" (what the trainer runs), True (backbone only), "all" (every module).
    recipe: "torchvision" (the open profiles') or "reference" (the closed profile's model), whose
    backbone is `reference_weights` (an R-50.pkl) or else random_msra_backbone's."""
    speed = fast.Options(fold_bn=fold_bn, fuse_bias=fuse_bias, batched_sampler=batched_sampler, sync_free=sync_free,
                         channels_last=channels_last in (True, "rpn"), rpn_channels_last=channels_last == "rpn",
                         fixed_canvas=fixed_canvas, roi_align=roi_align, padded_heads=padded_heads, nms_scan=nms_scan,
                         cuda_graphs=cuda_graphs, mask_roi_bucket=mask_roi_bucket,
                         mask_channels_last=mask_channels_last, cudnn_fusion=cudnn_fusion,
                         fpn_broadcast=fpn_broadcast)
    weights = (reference_weights or random_msra_backbone()) if recipe == "reference" else backbone
    model = build_model(81, backbone_weights=weights, proposals_per_image=1000, speed=speed,
                        recipe=RECIPES[recipe]).to(device)
    if channels_last == "all":
        model = model.to(memory_format=torch.channels_last)
    if compile_backbone:
        model.backbone = torch.compile(model.backbone, dynamic=True)
    return model


class StepWork:
    """What timed steps did besides take time: whether every loss was finite (a model whose loss is
    not finite trains on NaN boxes and times less work than a training one) and the mask branch's RoIs
    per image (the heads' positives: the weights decide them, and the step's time follows them)."""

    def __init__(self, model):
        self.losses, self.mask_rois = [], []
        heads = model.roi_heads  # the positives' count, not the padding fast.Options.mask_roi_bucket adds
        self._hook = heads.mask_head.register_forward_hook(  # a host value: no wait
            lambda module, inputs, output: self.mask_rois.append(heads.__dict__.get("positive_rois", len(inputs[0]))))

    def add(self, loss: torch.Tensor) -> None:
        self.losses.append(loss.detach())

    def close(self) -> None:
        """The hook off the model (again: harmless); a step that failed (out of memory) must not leave it
        counting the next round's steps."""
        self._hook.remove()

    def report(self, images_per_step: int) -> dict:
        self.close()
        finite = torch.isfinite(torch.stack(self.losses).float()).cpu()
        first_bad = (~finite).nonzero()
        return {"losses_finite": bool(finite.all()),
                "first_nonfinite_step": int(first_bad[0]) if len(first_bad) else None,
                "mask_rois_per_image": round(sum(self.mask_rois) / max(len(self.mask_rois), 1) / images_per_step, 1)}


def warm_as_the_trainer(model, batch: int, dtype) -> None:
    """What the trainer's warm-up (engine.warm_up) does beyond the steps a benchmark warms up with:
    the mask branch at each bucket size (fast.Options.mask_roi_bucket; nothing without it)."""
    if next(model.parameters()).is_cuda:
        warm_mask_branch(model.roi_heads, batch, lambda: torch.autocast("cuda", dtype=dtype, enabled=dtype is not None))


def time_steps(model, optimizer, batches, device, dtype, scaler, iterations: int, warmup: int,
               schedule: Schedule | None = None, steps_done: int = 0) -> dict:
    """Mean and median step time over `iterations` steps (whole cycles of the batches) after `warmup`,
    with a CUDA sync per step; and StepWork's report of those steps. With a schedule each step takes
    its learning rate, counting from `steps_done`; else the optimizer's own."""
    model.train()
    times = []
    autocast = ((lambda: torch.autocast(device.type, dtype=dtype)) if dtype is not None
                else (lambda: torch.autocast(device.type, enabled=False)))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    iterations = -(-iterations // len(batches)) * len(batches)  # whole cycles: every batch as often
    work = None
    try:
        for i in range(warmup + iterations):
            images, targets = batches[i % len(batches)]
            if i == warmup:
                work = StepWork(model)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            if schedule is not None:
                set_lr(optimizer, schedule, steps_done + i)
            images, targets = to_device(images, targets, device)
            loss, _ = train_step(model, optimizer, scaler, images, targets, autocast)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
                work.add(loss)
    finally:
        if work is not None:
            work.close()  # also when a step fails (out of memory): the next round counts only its own steps
    n = len(batches[0][0])
    median = statistics.median(times)
    # Throughput over whole cycles of the batches (they differ in size by design); the median step too.
    return {"step_ms": round(sum(times) / len(times) * 1000, 1), "img_per_s": round(n * len(times) / sum(times), 1),
            "median_step_ms": round(median * 1000, 1),
            "peak_mem_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None,
            "steps_run": warmup + iterations, **work.report(n)}


@contextmanager
def tf32_off():
    """fp32 matmuls and convolutions without TF32, restored after: the checks compare in fp32, where
    TF32's 10-bit-mantissa products differ by about 1e-3 through fifty layers of random weights
    between kernels that differ (memory layouts, cuDNN's choices)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def same_losses(device, ours, stock) -> dict:
    """fp32, same weights, same batch, same sampling seed: `ours`'s losses against `stock`'s.

    TF32 is off for the forwards (tf32_off): the two memory layouts pick different convolution kernels."""
    # The sampler draws its random subsets differently (same distribution): give both the same one.
    # The padded heads draw the RoIs over a padded row, so the same seed picks others: both RoI heads
    # take every candidate instead (no draw).
    use_batched_sampler(stock)
    for model in (ours, stock):
        model.roi_heads.fg_bg_sampler.batch_size_per_image = 100_000
    stock.load_state_dict(ours.state_dict())
    images, targets = to_device(*synthetic_batch(2, "cpu", seed=123), device)
    losses = {}
    for name, model in (("ours", ours), ("stock", stock)):
        model.train()
        torch.manual_seed(0)
        with tf32_off(), torch.autocast(device.type, enabled=False):
            losses[name] = {k: v.item() for k, v in model(images, targets).items()}
    rel = {k: abs(losses["ours"][k] - losses["stock"][k]) / max(abs(losses["stock"][k]), 1e-12) for k in losses["ours"]}
    return {"losses": losses, "max_rel_diff": max(rel.values()), "ok": max(rel.values()) < 1e-3}


def check_same_function(device, backbone: Path) -> dict:
    """Our step against torchvision's MaskRCNN with the same (torchvision) recipe."""
    return same_losses(device, our_model(device, backbone, channels_last=_trainer_layout(device)),
                       torchvision_model(backbone).to(device))


def _trainer_layout(device) -> str | bool:
    """The trainer's layout: channels_last backbone and RPN head on a GPU."""
    return "rpn" if device.type == "cuda" else False


def check_reference(device, backbone: Path) -> dict:
    """The closed profile's model (the reference recipe): the fast model against the stock reference
    model (object_detection.reference without object_detection.fast)."""
    stock = build_model(81, backbone_weights=random_msra_backbone(), proposals_per_image=1000, speed=fast.STOCK,
                        recipe=RECIPES["reference"]).to(device)
    result = same_losses(device, our_model(device, backbone, channels_last=_trainer_layout(device), recipe="reference"),
                         stock)
    if device.type == "cuda":  # the same with fast.roi_align and the padded heads (off in the trainer until they pay)
        result["with_roi_align"] = same_losses(device, our_model(device, backbone, channels_last="rpn",
                                                                 recipe="reference", roi_align=True,
                                                                 padded_heads=True, nms_scan=True), stock)
    return result


def check_graphs(device, backbone: Path, steps: int = 4) -> dict:
    """fast.Options.cuda_graphs: the graphed model's losses and gradients against the same model's
    without graphs, in fp32 with TF32 off, step by step on batches of both orientations (L, P, L, P:
    each orientation's graphs are captured on its first batch and replayed in step 3 and 4, after
    the weights moved). Before each step both take the eager model's weights (copied in place, as
    the optimizer writes them), so each step compares one step's function: compared after
    free-running steps, differences grew from 1e-6 to 1e-1 by the fourth step however the graphs
    were placed (BENCHMARKS.md), as kernel noise does through proposal top-k and matching. A second
    eager copy (`control`) gives the noise floor the graphed model must stay near."""
    if device.type != "cuda":
        return {"ok": None, "why": "CUDA graphs need a GPU"}
    models = {name: our_model(device, backbone, channels_last="rpn", roi_align=True, fixed_canvas=True,
                              cuda_graphs=name == "graphed") for name in ("eager", "control", "graphed")}
    # lr 0.005: the eager model's weights move ~1e-3 a step (far above the noise floor) and stay
    # finite; at 0.02 its fourth step's losses were not finite
    optimizers = {name: make_optimizer(model, lr=0.005) for name, model in models.items()}
    batches = [to_device(*synthetic_batch(2, "cpu", seed=seed), device) for seed in (123, 3, 2, 11)]  # L, P, L, P
    report = {"steps": []}
    with tf32_off():
        for step in range(steps):
            images, targets = batches[step % len(batches)]
            losses, grads = {}, {}
            weights = {k: v.clone() for k, v in models["eager"].state_dict().items()}
            for name, model in models.items():
                model.load_state_dict(weights)
                model.train()
                torch.manual_seed(step)
                _, parts = train_step(model, optimizers[name], None, images, targets,
                                      lambda: torch.autocast(device.type, enabled=False))
                losses[name] = {k: v.item() for k, v in parts.items()}
                grads[name] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
            entry = {"portrait": images[0].shape[-2] > images[0].shape[-1]}
            for name in ("control", "graphed"):
                entry[name] = {
                    "loss": max(abs(losses[name][k] - e) / max(abs(e), 1e-12) for k, e in losses["eager"].items()),
                    "grad": max(((g - grads["eager"][n]).norm() / grads["eager"][n].norm().clamp_min(1e-12)).item()
                                for n, g in grads[name].items())}
            report["steps"].append(entry)
    graphed = models["graphed"]
    report["graphs"] = {"backbone": len(graphed.backbone._captured), "rpn_head": len(graphed.rpn.head._captured)}
    diffs = {name: [s[name][k] for s in report["steps"] for k in ("loss", "grad")] for name in ("control", "graphed")}
    finite = all(math.isfinite(d) for d in diffs["control"] + diffs["graphed"])
    report["ok"] = (finite and max(diffs["graphed"]) <= max(10 * max(diffs["control"]), 1e-4)
                    and report["graphs"] == {"backbone": 2, "rpn_head": 2})
    return report


def check_greedy_nms(device, groups: int = 80, k: int = 2000) -> dict:
    """object_detection.fast.nms.greedy_nms, both ways (the Triton scan and the compiled fixed point on CUDA),
    against torchvision.ops.nms, group by group, on crowded random boxes of RPN size: 80 groups (16 images
    x 5 levels) of 2000; and each way's time (CUDA events, the fixed point's host waits included)."""
    from torchvision.ops import nms

    from object_detection.fast.nms import fixed_point_nms, greedy_nms

    g = torch.Generator().manual_seed(0)
    centres = torch.rand(groups, 40, 2, generator=g) * 1000
    xy = centres.gather(1, torch.randint(0, 40, (groups, k, 1), generator=g).expand(-1, -1, 2))
    xy = xy + torch.randn(groups, k, 2, generator=g) * 20
    boxes = torch.cat([xy, xy + 30 + torch.rand(groups, k, 2, generator=g) * 150], dim=-1).to(device)
    scores = torch.rand(groups, k, generator=g).to(device).sort(dim=1, descending=True).values
    valid = (torch.rand(groups, k, generator=g) > 0.05).to(device)
    ways = {"scan": lambda: greedy_nms(boxes, valid, 0.7, scan=True),
            "fixed_point": lambda: fixed_point_nms(boxes, valid, 0.7)}
    report = {"groups": groups, "boxes_per_group": k}
    for name, way in ways.items():
        keep = way()
        mismatched = 0
        for i in range(groups):
            idx = valid[i].nonzero()[:, 0]
            want = torch.zeros(k, dtype=torch.bool, device=device)
            want[idx[nms(boxes[i, idx], scores[i, idx], 0.7)]] = True
            mismatched += int((want != keep[i]).sum())
        report[name] = {"kept": int(keep.sum()), "mismatched": mismatched, "ms": _cuda_ms(way) if device.type == "cuda" else None}
    report["ok"] = all(report[name]["mismatched"] == 0 for name in ways)
    return report


def _cuda_ms(fn, repeats: int = 10) -> float:
    """fn's mean time in milliseconds by CUDA events, after one call that compiles."""
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return round(start.elapsed_time(end) / repeats, 3)


def check_fused_training(device, backbone: Path) -> dict:
    """One bf16 training step (forward, backward) of our model with and without the fused biases, same
    weights, batch and sampling seed: losses, the largest gradient differences, and the NMS work
    (fixed-point passes, run eagerly to count them)."""
    from object_detection.fast import nms

    calls = {"relax": 0}

    def counted(*args):
        calls["relax"] += 1
        return nms._relax(*args)

    report, grads = {}, {}
    models = {name: our_model(device, backbone, channels_last="rpn", fuse_bias=fuse)
              for name, fuse in (("unfused", False), ("fused", True))}
    models["fused"].load_state_dict(models["unfused"].state_dict())
    images, targets = to_device(*synthetic_batch(4, "cpu", seed=7), device)
    saved = nms._compiled.get("cuda")
    nms._compiled["cuda"] = (nms._suppresses, counted)
    try:
        for name, model in models.items():
            model.train()
            torch.manual_seed(0)
            calls["relax"] = 0
            with torch.autocast(device.type, dtype=torch.bfloat16):
                losses = model(images, targets)
            sum(losses.values()).backward()
            report[name] = {"losses": {k: round(v.item(), 5) for k, v in losses.items()}, "relax_passes": calls["relax"]}
            grads[name] = {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}
    finally:
        nms._compiled.pop("cuda")
        if saved is not None:
            nms._compiled["cuda"] = saved
    rel = {n: ((g - grads["unfused"][n]).norm() / grads["unfused"][n].norm().clamp_min(1e-12)).item()
           for n, g in grads["fused"].items()}
    report["worst_grad_rel_diff"] = [(n, round(v, 4)) for n, v in sorted(rel.items(), key=lambda kv: -kv[1])[:5]]
    return report


def check_roi_align(device) -> dict:
    """object_detection.fast.roi_align against torchvision's roi_align per level, forward and backward,
    on FPN maps of an 800x1344 batch of 4 (channels_last) with 2000 RoIs of every size, at the box
    (7x7) and mask (14x14, also written channels_last) poolers' sizes; bf16 maps are compared with torchvision's pooling of the
    same values in float32 (what autocast gives it), so the kernel's only rounding is its output's.
    The comparison is the CPU tests' (tests/support/roi_align_checks.py)."""
    from tests.support.roi_align_checks import compare_with_torchvision

    g = torch.Generator().manual_seed(0)
    shapes, scales = [(200, 336), (100, 168), (50, 84), (25, 42)], [1 / 4, 1 / 8, 1 / 16, 1 / 32]
    k = 2000
    corner = torch.rand(k, 2, generator=g) * torch.tensor([1344.0, 800.0])
    size = torch.rand(k, 2, generator=g) ** 3 * 600
    rois = torch.cat([torch.randint(0, 4, (k, 1), generator=g).float(), corner - 20, corner + size], 1).to(device)
    levels = torch.randint(0, 4, (k,), generator=g).to(device)
    worst = {}
    for dtype in (torch.float32, torch.bfloat16):
        maps = [torch.randn(4, 256, h, w, generator=g).to(device, dtype).to(memory_format=torch.channels_last)
                .requires_grad_() for h, w in shapes]
        for out_size, channels_last in ((7, False), (14, False), (14, True)):
            found = compare_with_torchvision(maps, rois, levels, scales, out_size, generator=g,
                                             channels_last=channels_last)
            worst[f"{str(dtype)[6:]}-{out_size}{'-channels_last' if channels_last else ''}"] = {
                "forward": found["forward"], "backward_rel": found["backward_rel"], "layout": found["layout_asked"]}
    ok = (all(v["layout"] for v in worst.values())
          and all(v["forward"] < 1e-5 and v["backward_rel"] < 1e-5 for k, v in worst.items() if k.startswith("float32"))
          and all(v["forward"] < 0.04 and v["backward_rel"] < 1e-2 for k, v in worst.items() if k.startswith("bfloat16")))
    return {"max_diff": worst, "ok": ok}


def check_inputs(device) -> dict:
    """The fast transform's batched normalisation and scaling (fast.transform.SyncFreeTransform.forward)
    against InputTransform's per-image way, bit for bit, on the device, in training with the
    reference's resize and mean, on a COCO-shaped batch of 12 with polygon edges."""
    import copy

    from object_detection.mask_targets import polygon_edges
    from object_detection.transform import InputTransform

    images, targets = synthetic_batch(12, "cpu", seed=5)
    for t in targets:
        corners = [[[x0, y0, x1, y0, x1, y1, x0, y1]] for x0, y0, x1, y1 in t["boxes"].tolist()]
        t["polygon_edges"], t["polygon_owner"] = polygon_edges(corners)
    want_images, want = to_device(images, targets, device)
    differ = []
    fast_transform = build_model(81, backbone_weights=None, recipe=RECIPES["reference"]).transform.train()
    stock_transform = copy.copy(fast_transform)
    stock_transform.__class__ = InputTransform
    results = []
    for transform in (fast_transform, stock_transform):
        torch.manual_seed(0)  # the same draw of the training size
        results.append(transform(want_images, [dict(t) for t in want]))
    (fast_list, fast_targets), (stock_list, stock_targets) = results
    if fast_list.image_sizes != stock_list.image_sizes or not torch.equal(fast_list.tensors, stock_list.tensors):
        differ.append("transform images")
    differ += [f"transform target {n} {k}" for n, (a, b) in enumerate(zip(fast_targets, stock_targets))
               for k in ("boxes", "polygon_edges") if not torch.equal(a[k], b[k])]
    return {"differ": differ, "images": len(images), "ok": not differ}


def check_bias_act(device) -> dict:
    """object_detection.fast.bias_act (the Triton kernel on CUDA) against the separate torch operations,
    forward and backward, in both layouts, fp32 and bf16, on a P2-sized map."""
    from object_detection.fast.bias_act import bias_act

    g = torch.Generator().manual_seed(0)
    worst = {}
    for dtype in (torch.float32, torch.bfloat16):
        for layout in (torch.contiguous_format, torch.channels_last):
            x, residual, grad = (torch.randn(2, 256, 200, 336, generator=g).to(device, dtype).to(memory_format=layout)
                                 for _ in range(3))
            bias = torch.randn(256, generator=g).to(device)
            for with_residual in (False, True):
                a = x.clone().requires_grad_()
                out = bias_act(a, bias, residual if with_residual else None)
                out.backward(grad)
                b = x.float().clone().requires_grad_()
                ref = (b + bias.reshape(1, -1, 1, 1) + (residual.float() if with_residual else 0)).relu()
                ref.backward(grad.float())
                key = f"{str(dtype)[6:]}-{'cl' if layout is torch.channels_last else 'nchw'}-{'res' if with_residual else 'bias'}"
                away_from_kink = ref.detach().abs() > 0.25  # where rounding cannot move the ReLU's switch
                worst[key] = max((out.float() - ref).abs().max().item(),
                                 (a.grad.float() - b.grad)[away_from_kink].abs().max().item())
    tolerance = {"float32": 1e-5, "bfloat16": 0.07}  # bf16: a half ulp is 0.03 at 8, two roundings
    return {"max_abs_diff": worst, "ok": all(v <= tolerance[k.split("-")[0]] for k, v in worst.items())}


VARIANTS_HELP = (
    "stock-fp16: maskrcnn_resnet50_fpn untrained (BatchNorm trains: more work); torchvision-bf16, "
    "torchvision-fp16: torchvision's MaskRCNN with the MLPerf recipe (the same work as ours); ours-*: bf16 "
    "autocast (ref-*: the same, on the closed profile's reference-recipe model), -cl channels_last backbone with contiguous maps to all heads, -clall channels_last everywhere, "
    "-rpncl channels_last backbone and RPN head, -fused fused SGD, -tvsampler torchvision's per-image sampler "
    "(and its sync-heavy heads), -tvsync torchvision's heads with our batched sampler (no "
    "object_detection.fast.sync_free), -nofold keeps FrozenBatchNorm as separate layers, -nofuse adds the "
    "backbone's convolution biases separately (no object_detection.fast.fuse_bias), -compile torch.compile on "
    "the backbone, -roialign multi-scale RoIAlign in one kernel on the channels_last maps (fast.roi_align; "
    "without it torchvision's roi_align per level on NCHW maps), -padheads the RPN's proposals and RoI "
    "heads' samples at fixed sizes, one host wait a forward (fast.Options.padded_heads, with nms_scan), -nmsscan "
    "NMS by a Triton walk per group without host waits (fast.Options.nms_scan; without it a fixed point with a "
    "wait per block of passes), "
    "-pad every batch padded to 800x1344 (fast.Options.fixed_canvas), -graphs backbone, FPN and RPN head "
    "as CUDA graphs in training (fast.Options.cuda_graphs, on that canvas), -cudnnbench "
    "cudnn.benchmark on, -nogc Python's garbage collector off while it runs, -maskbucket the mask branch on its "
    "RoIs padded to a multiple of 64 (fast.Options.mask_roi_bucket), -maskcl the mask branch in channels_last "
    "(fast.Options.mask_channels_last), -cudnnfuse convolution, bias, shortcut and ReLU in one cuDNN call "
    "(fast.Options.cudnn_fusion), -fpnadd the FPN's top-down sums without upsampled maps (fast.Options.fpn_broadcast)")


def make_variant(variant: str, device, backbone: Path, reference_weights: Path | None = None):
    """(model, optimizer, autocast dtype, grad scaler) for a variant name (our_model says what
    reference_weights is)."""
    if variant.startswith("stock"):
        model = stock_model(device)
        optimizer = torch.optim.SGD([{"params": list(model.parameters()), "lr_factor": 1.0}], lr=0.01, momentum=0.9,
                                    weight_decay=1e-4)
        dtype = torch.float16 if device.type == "cuda" else None
    elif variant.startswith("torchvision"):
        model = torchvision_model(backbone).to(device)
        optimizer = make_optimizer(model, lr=0.01)  # torch's default SGD (foreach), the reference's groups
        dtype = amp_dtype("bf16" if "bf16" in variant else "fp16", device)
    else:
        cl = "all" if "-clall" in variant else "rpn" if "-rpncl" in variant else "-cl" in variant
        model = our_model(device, backbone, channels_last=cl, fold_bn="-nofold" not in variant,
                          compile_backbone="-compile" in variant, batched_sampler="-tvsampler" not in variant,
                          sync_free="-tvsync" not in variant and "-tvsampler" not in variant,
                          fuse_bias="-nofuse" not in variant, fixed_canvas="-pad" in variant,
                          roi_align="-roialign" in variant, padded_heads="-padheads" in variant,
                          nms_scan="-nmsscan" in variant or "-padheads" in variant, cuda_graphs="-graphs" in variant,
                          recipe="reference" if variant.startswith("ref-") else "torchvision",
                          reference_weights=reference_weights, mask_roi_bucket="-maskbucket" in variant,
                          mask_channels_last="-maskcl" in variant, cudnn_fusion="-cudnnfuse" in variant,
                          fpn_broadcast="-fpnadd" in variant)
        dtype = amp_dtype("bf16" if "bf16" in variant else "fp16", device)
        optimizer = make_optimizer(model, lr=0.01, fused="-fused" in variant and device.type == "cuda",
                                   loss_scaled=dtype == torch.float16)
    return model, optimizer, dtype, torch.amp.GradScaler("cuda") if dtype == torch.float16 else None


def learning_rates(lr: str, batch: int) -> Schedule:
    """--lr: "schedule", the closed profile's learning rates for `batch` images a step from a run's
    first step (its warm-up, as the trainer's first steps take them), or one rate for every step.
    At a constant 0.01 from the first step every model here, torchvision's too, had non-finite
    losses within ten steps on the noise batches, and a diverged model times NaN boxes, not training
    (BENCHMARKS.md)."""
    if lr == "schedule":
        return PROFILES[CLOSED_PROFILE].schedule_for(batch)
    try:
        rate = float(lr)
    except ValueError:
        raise SystemExit(f"--lr {lr}: give 'schedule' or a learning rate such as 0.01") from None
    return Schedule(batch=batch, lr=rate, decay_steps=(), warmup_steps=0, warmup_factor=1.0, image_candidates=0,
                    source=f"--lr {lr}")


@contextmanager
def switches(variant: str):
    """The process-wide settings a variant asks for, restored after it."""
    saved = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = "-cudnnbench" in variant
    if "-nogc" in variant:
        gc.disable()
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = saved
        gc.enable()


def measure(batch_size: int, variants: list[str], args, device, backbone: Path) -> list[dict]:
    """Every variant on the same batches, interleaved in rounds: the median of the rounds' medians."""
    batches = [synthetic_batch(batch_size, "cpu", seed=s, shapes=args.shapes) for s in range(args.batches)]
    if device.type == "cuda":
        batches = [pinned(b) for b in batches]
    built, rounds, done = {}, {v: [] for v in variants}, dict.fromkeys(variants, 0)
    for variant in variants:
        torch.manual_seed(0)
        built[variant] = make_variant(variant, device, backbone, args.reference_weights)
        with switches(variant):  # (under -cudnnbench the warm-up's sizes are benchmarked too)
            warm_as_the_trainer(built[variant][0], batch_size, built[variant][2])
    schedule = learning_rates(args.lr, batch_size)
    for _ in range(args.rounds):
        for variant in variants:
            with switches(variant):
                try:
                    rounds[variant].append(time_steps(*built[variant][:2], batches, device, *built[variant][2:],
                                                      args.iterations, args.warmup, schedule, done[variant]))
                    done[variant] += rounds[variant][-1]["steps_run"]
                except torch.OutOfMemoryError:
                    rounds[variant].append({"error": "out of memory"})
    runs = []
    for variant, measured in rounds.items():
        ok = [m for m in measured if "error" not in m]
        stats = {"error": "out of memory"} if not ok else {
            "step_ms": round(statistics.median(m["step_ms"] for m in ok), 1),
            "img_per_s": round(statistics.median(m["img_per_s"] for m in ok), 1),
            "rounds_img_per_s": [m["img_per_s"] for m in ok],
            "peak_mem_gib": max((m["peak_mem_gib"] or 0) for m in ok) or None,
            "losses_finite": all(m["losses_finite"] for m in ok),
            "rounds_first_nonfinite_step": [m["first_nonfinite_step"] for m in ok],
            "rounds_mask_rois_per_image": [m["mask_rois_per_image"] for m in ok]}
        runs.append({**stats, "variant": variant, "batch": batch_size})
        print(json.dumps(runs[-1]), flush=True)
    del built
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return runs


CHECKS = {"check": check_same_function, "check_reference": check_reference, "check_nms": check_greedy_nms,
          "check_bias_act": check_bias_act, "check_roi_align": check_roi_align, "check_graphs": check_graphs,
          "check_fused_training": check_fused_training, "check_inputs": check_inputs,
          "check_cudnn_fusion": check_cudnn_fusion}


def print_table(runs: list[dict], baseline: str) -> None:
    # a ratio against or of a model whose loss was not finite compares NaN boxes: none is given
    base = {r["batch"]: r.get("img_per_s") for r in runs if r["variant"] == baseline and r.get("losses_finite", True)}
    print(f"\n{'variant':<30} {'batch':>5} {'img/s':>8} {'step ms':>8} {'peak GiB':>8} {'mask RoIs/img':>14} "
          f"{'vs ' + baseline:>20}")
    for r in runs:
        ratio = r.get("img_per_s", 0) / base[r["batch"]] if base.get(r["batch"]) and r.get("losses_finite", True) \
            else float("nan")
        r[f"ratio_vs_{baseline}"] = round(ratio, 2)
        rois = "/".join(str(x) for x in r.get("rounds_mask_rois_per_image", []))
        print(f"{r['variant']:<30} {r['batch']:>5} {r.get('img_per_s', 0):>8} {r.get('step_ms', 0):>8} "
              f"{str(r.get('peak_mem_gib')):>8} {rois:>14} {ratio:>20.2f}"
              + ("" if r.get("losses_finite", True) else "  (a loss was not finite: it timed NaN boxes)"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-sizes", default="12")
    p.add_argument("--iterations", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--rounds", type=int, default=2, help="times each variant is timed, interleaved")
    p.add_argument("--batches", type=int, default=4, help="distinct synthetic batches cycled through")
    p.add_argument("--shapes", choices=["coco", "legacy"], default="coco")
    p.add_argument("--variants", default="stock-fp16,torchvision-bf16,torchvision-fp16,ours-bf16-rpncl-fused",
                   help=VARIANTS_HELP)
    p.add_argument("--baseline", default="torchvision-bf16", help="the variant ratios are given against")
    p.add_argument("--check", action="store_true", help="also check that our step computes torchvision's function")
    p.add_argument("--checks", help=f"with --check, only these (of {','.join(CHECKS)})")
    p.add_argument("--lr", default="schedule",
                   help="'schedule' (the closed profile's warm-up from the first step, as a run starts) or a rate")
    p.add_argument("--calibrate-on", type=Path, metavar="DIR",
                   help="the random backbones' BatchNorm statistics measured on 16 JPEGs of DIR (as epoch_level's "
                        "trainer gets them), not on random pixels")
    p.add_argument("--output", type=Path)
    args = p.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cudnn.benchmark = False
    args.reference_weights, backbone = calibrated_backbones(args.calibrate_on)
    result = {"date": dt.datetime.now().isoformat(timespec="seconds"), "host": platform.node(),
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "torchvision": torchvision.__version__, "shapes": args.shapes,
              "backbone_statistics": str(args.calibrate_on or "random pixels"), "lr": args.lr,
              "command": "python -m benchmarks.train_throughput " + " ".join(sys.argv[1:] if argv is None else argv),
              "runs": []}
    if args.check:
        for name, check in CHECKS.items():
            if args.checks and name not in args.checks.split(","):
                continue
            takes_backbone = "backbone" in inspect.signature(check).parameters
            result[name] = check(device, backbone) if takes_backbone else check(device)
            print(f"{name}:", json.dumps(result[name]), flush=True)
    for bs in [int(b) for b in args.batch_sizes.split(",")]:
        result["runs"] += measure(bs, args.variants.split(","), args, device, backbone)
    baseline = args.baseline if any(r["variant"] == args.baseline for r in result["runs"]) else \
        result["runs"][0]["variant"]
    print_table(result["runs"], baseline)
    out = args.output or RESULTS / f"train_throughput-{dt.date.today()}.json"
    save_result(result, out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
