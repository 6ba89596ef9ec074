"""Training-step throughput: our step against torchvision's stock Mask R-CNN loop, side by side.

Same synthetic COCO-sized batches (480-640 x 640 images, 3-12 instances with masks, resized by the
model to 800/1333) for every variant, in one process, so ratios are comparable on a shared machine.

    python -m benchmarks.train_throughput --batch-sizes 8,16,32 --iterations 20
    invoke bench   (the same, through torchrun on --gpus N)

Writes JSON to benchmarks/results/ and prints a table. `--check` also compares, in fp32 on the
same weights and batch, the losses of our step and of the stock model (must agree within 1e-3).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import sys
import time
from pathlib import Path

import torch
import torchvision
from torchvision.models import resnet50
from torchvision.models.detection import MaskRCNN, maskrcnn_resnet50_fpn
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.ops import FrozenBatchNorm2d

from benchmarks import save_result
from object_detection import fast
from object_detection.engine import amp_dtype, make_optimizer, to_device, train_step
from object_detection.fast.sampler import use_batched_sampler
from object_detection.model import build_model

RESULTS = Path(__file__).resolve().parent / "results"


def synthetic_batch(n: int, device, seed: int):
    """COCO-sized images (uint8 like the loader gives) and targets with boxes, labels and masks."""
    g = torch.Generator().manual_seed(seed)
    images, targets = [], []
    for _ in range(n):
        h = int(torch.randint(480, 641, (1,), generator=g))
        w = 640
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


def our_model(device, backbone: Path, channels_last: bool | str, fold_bn: bool = True, compile_backbone: bool = False,
              batched_sampler: bool = True, sync_free: bool = True, fuse_bias: bool = True):
    """channels_last: "rpn" (what the trainer runs), True (backbone only), "all" (every module)."""
    speed = fast.Options(fold_bn=fold_bn, fuse_bias=fuse_bias, batched_sampler=batched_sampler, sync_free=sync_free,
                         channels_last=channels_last in (True, "rpn"), rpn_channels_last=channels_last == "rpn")
    model = build_model(81, backbone_weights=backbone, image_candidates=1000, speed=speed).to(device)
    if channels_last == "all":
        model = model.to(memory_format=torch.channels_last)
    if compile_backbone:
        model.backbone = torch.compile(model.backbone, dynamic=True)
    return model


def time_steps(model, optimizer, batches, device, dtype, scaler, iterations: int, warmup: int) -> dict:
    """Median and mean step time over `iterations` steps after `warmup`, with CUDA sync per step."""
    model.train()
    times = []
    autocast = ((lambda: torch.autocast(device.type, dtype=dtype)) if dtype is not None
                else (lambda: torch.autocast(device.type, enabled=False)))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for i in range(warmup + iterations):
        images, targets = batches[i % len(batches)]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        images, targets = to_device(images, targets, device)
        train_step(model, optimizer, scaler, images, targets, autocast)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    times.sort()
    n = len(batches[0][0])
    median = times[len(times) // 2]
    return {"step_ms": round(median * 1000, 1), "img_per_s": round(n / median, 1),
            "mean_img_per_s": round(n * len(times) / sum(times), 1),
            "peak_mem_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None}


def check_same_function(device, backbone: Path) -> dict:
    """fp32, same weights, same batch, same sampling seed: our step's losses against the stock model's.

    TF32 is off for the check: with it, the two memory layouts pick different convolution kernels
    whose 10-bit-mantissa products differ by about 1e-3 through fifty layers of random weights."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    ours = our_model(device, backbone, channels_last=device.type == "cuda")
    # What maskrcnn_resnet50_fpn builds from an ImageNet backbone: frozen BN, layer2-4 trainable.
    body = resnet50(norm_layer=FrozenBatchNorm2d)
    stock = MaskRCNN(_resnet_fpn_extractor(body, 3), num_classes=81, rpn_post_nms_top_n_train=1000).to(device)
    # The sampler draws its random subsets differently (same distribution): give both the same one.
    use_batched_sampler(stock)
    stock.load_state_dict(ours.state_dict())
    images, targets = synthetic_batch(2, "cpu", seed=123)
    images, targets = to_device(images, targets, device)
    losses = {}
    for name, model in (("ours", ours), ("stock", stock)):
        model.train()
        torch.manual_seed(0)
        with torch.autocast(device.type, enabled=False):
            losses[name] = {k: v.item() for k, v in model(images, targets).items()}
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    rel = {k: abs(losses["ours"][k] - losses["stock"][k]) / max(abs(losses["stock"][k]), 1e-12) for k in losses["ours"]}
    return {"losses": losses, "max_rel_diff": max(rel.values()), "ok": max(rel.values()) < 1e-3}


def check_greedy_nms(device, groups: int = 80, k: int = 2000) -> dict:
    """object_detection.fast.nms.greedy_nms (the compiled fixed point on CUDA) against torchvision.ops.nms, group by
    group, on crowded random boxes of RPN size: 80 groups (16 images x 5 levels) of 2000."""
    from torchvision.ops import nms

    from object_detection.fast.nms import greedy_nms

    g = torch.Generator().manual_seed(0)
    centres = torch.rand(groups, 40, 2, generator=g) * 1000
    xy = centres.gather(1, torch.randint(0, 40, (groups, k, 1), generator=g).expand(-1, -1, 2))
    xy = xy + torch.randn(groups, k, 2, generator=g) * 20
    boxes = torch.cat([xy, xy + 30 + torch.rand(groups, k, 2, generator=g) * 150], dim=-1).to(device)
    scores = torch.rand(groups, k, generator=g).to(device).sort(dim=1, descending=True).values
    valid = (torch.rand(groups, k, generator=g) > 0.05).to(device)
    keep = greedy_nms(boxes, valid, 0.7)
    mismatched = 0
    for i in range(groups):
        idx = valid[i].nonzero()[:, 0]
        want = torch.zeros(k, dtype=torch.bool, device=device)
        want[idx[nms(boxes[i, idx], scores[i, idx], 0.7)]] = True
        mismatched += int((want != keep[i]).sum())
    return {"groups": groups, "boxes_per_group": k, "kept": int(keep.sum()), "mismatched": mismatched,
            "ok": mismatched == 0}


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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-sizes", default="8,16,32")
    p.add_argument("--iterations", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--variants", default="stock-fp16,ours-bf16-rpncl-fused-tvsync,ours-bf16-rpncl-fused",
                   help="stock-fp16: torchvision's loop; ours-*: bf16 autocast, -cl channels_last backbone "
                        "with contiguous maps to all heads, -clall channels_last everywhere, -rpncl "
                        "channels_last backbone and RPN head, -fused fused SGD, -tvsampler torchvision's "
                        "per-image sampler (and its sync-heavy heads), -tvsync torchvision's heads with our "
                        "batched sampler (no object_detection.sync_free), -nofold keeps FrozenBatchNorm as "
                        "separate layers, -nofuse adds the backbone's convolution biases separately "
                        "(no object_detection.fast.fuse_bias), -compile torch.compile on the backbone")
    p.add_argument("--check", action="store_true", help="also check that our step computes the stock function")
    p.add_argument("--output", type=Path)
    args = p.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cudnn.benchmark = False
    backbone = Path("/tmp/bench_resnet50.pth")
    if not backbone.exists():  # random ImageNet-shaped weights: throughput does not depend on their values
        torch.save(torchvision.models.resnet50().state_dict(), backbone)
    result = {"date": dt.datetime.now().isoformat(timespec="seconds"), "host": platform.node(),
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "torchvision": torchvision.__version__, "runs": []}
    if args.check:
        result["check"] = check_same_function(device, backbone)
        print("same-function check:", json.dumps(result["check"]), flush=True)
        result["check_nms"] = check_greedy_nms(device)
        print("greedy NMS check:", json.dumps(result["check_nms"]), flush=True)
        result["check_bias_act"] = check_bias_act(device)
        print("fused bias-ReLU check:", json.dumps(result["check_bias_act"]), flush=True)
        result["check_fused_training"] = check_fused_training(device, backbone)
        print("fused training step:", json.dumps(result["check_fused_training"]), flush=True)

    for bs in [int(b) for b in args.batch_sizes.split(",")]:
        batches = [synthetic_batch(bs, "cpu", seed=s) for s in range(3)]
        if device.type == "cuda":
            batches = [pinned(b) for b in batches]
        for variant in args.variants.split(","):
            torch.manual_seed(0)
            if variant.startswith("stock"):
                model = stock_model(device)
                optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
                dtype = torch.float16 if device.type == "cuda" else None
                scaler = torch.amp.GradScaler("cuda") if dtype is not None else None
            else:
                cl = "all" if "-clall" in variant else "rpn" if "-rpncl" in variant else "-cl" in variant
                model = our_model(device, backbone, channels_last=cl, fold_bn="-nofold" not in variant,
                                  compile_backbone="-compile" in variant, batched_sampler="-tvsampler" not in variant,
                                  sync_free="-tvsync" not in variant and "-tvsampler" not in variant,
                                  fuse_bias="-nofuse" not in variant)
                optimizer = make_optimizer(model, lr=0.01, fused="-fused" in variant and device.type == "cuda")
                dtype = amp_dtype("bf16" if "bf16" in variant else "fp16", device)
                scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
            try:
                stats = time_steps(model, optimizer, batches, device, dtype, scaler, args.iterations, args.warmup)
            except torch.OutOfMemoryError:
                stats = {"error": "out of memory"}
            stats.update(variant=variant, batch=bs)
            result["runs"].append(stats)
            print(json.dumps(stats), flush=True)
            del model, optimizer
            if device.type == "cuda":
                torch.cuda.empty_cache()

    base = {r["batch"]: r.get("img_per_s") for r in result["runs"] if r["variant"].startswith("stock")}
    print(f"\n{'variant':<22} {'batch':>5} {'img/s':>8} {'step ms':>8} {'peak GiB':>8} {'vs stock':>8}")
    for r in result["runs"]:
        ratio = r.get("img_per_s", 0) / base[r["batch"]] if base.get(r["batch"]) else float("nan")
        r["ratio_vs_stock"] = round(ratio, 2)
        print(f"{r['variant']:<22} {r['batch']:>5} {r.get('img_per_s', 0):>8} {r.get('step_ms', 0):>8} "
              f"{str(r.get('peak_mem_gib')):>8} {ratio:>8.2f}")
    out = args.output or RESULTS / f"train_throughput-{dt.date.today()}.json"
    save_result(result, out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
