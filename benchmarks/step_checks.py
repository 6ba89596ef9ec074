"""The step benchmark's checks (`python -m benchmarks.train_throughput --check [--checks NAME,...]`): that
each speed piece computes the function it replaces, on the GPU it is timed on, before its speed counts.
Each returns a JSON-able dict with "ok"; CHECKS names them for --checks.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from pathlib import Path

import torch

from benchmarks import random_msra_backbone
from benchmarks.conv_fusion import check_cudnn_fusion
from benchmarks.train_throughput import our_model, synthetic_batch, torchvision_model
from object_detection import fast
from object_detection.engine import make_optimizer, to_device, train_step
from object_detection.fast.sampler import use_batched_sampler
from object_detection.model import build_model
from object_detection.recipe import RECIPES


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


CHECKS = {"check": check_same_function, "check_reference": check_reference, "check_nms": check_greedy_nms,
          "check_bias_act": check_bias_act, "check_roi_align": check_roi_align, "check_graphs": check_graphs,
          "check_fused_training": check_fused_training, "check_inputs": check_inputs,
          "check_cudnn_fusion": check_cudnn_fusion}
