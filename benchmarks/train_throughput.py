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

Writes JSON to benchmarks/results/ and prints a table. `--check` first runs the checks that each
speed piece computes the function it replaces (benchmarks/step_checks.py; `--checks` picks some),
e.g. in fp32 on the same weights and batch, the losses of our step and of torchvision's (within 1e-3).
"""
from __future__ import annotations

import argparse
import datetime as dt
import gc
import inspect
import json
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
from object_detection import fast
from object_detection.engine import amp_dtype, make_optimizer, set_lr, to_device, train_step
from object_detection.fast.mask_branch import warm_mask_branch
from object_detection.mask_targets import polygon_edges
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


def with_polygons(targets: list[dict]) -> list[dict]:
    """The closed profile's targets: each (rectangular) synthetic mask as its polygon, as the loader
    ships them (object_detection.data), instead of the full mask."""
    out = []
    for target in targets:
        polygons = [[[x0, y0, x1, y0, x1, y1, x0, y1]] for x0, y0, x1, y1 in target["boxes"].tolist()]
        edges, owner = polygon_edges(polygons)
        out.append({"boxes": target["boxes"], "labels": target["labels"], "polygon_edges": edges,
                    "polygon_owner": owner, "polygons": 1})
    return out


def pinned(batch):
    """A CPU batch in page-locked memory, as the trainer's DataLoader(pin_memory=True) hands it."""
    images, targets = batch
    return [i.pin_memory() for i in images], [{k: v.pin_memory() if isinstance(v, torch.Tensor) else v
                                               for k, v in t.items()} for t in targets]


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
              cuda_graphs: bool = False, reference_weights: Path | None = None, levers: tuple[str, ...] = ()):
    """channels_last: "rpn" (what the trainer runs), True (backbone only), "all" (every module).
    recipe: "torchvision" (the open profiles') or "reference" (the closed profile's model), whose
    backbone is `reference_weights` (an R-50.pkl) or else random_msra_backbone's. levers: more
    fast.Options fields turned on (SWITCHED_LEVERS' names)."""
    speed = fast.Options(fold_bn=fold_bn, fuse_bias=fuse_bias, batched_sampler=batched_sampler, sync_free=sync_free,
                         channels_last=channels_last in (True, "rpn"), rpn_channels_last=channels_last == "rpn",
                         fixed_canvas=fixed_canvas, roi_align=roi_align, padded_heads=padded_heads, nms_scan=nms_scan,
                         cuda_graphs=cuda_graphs, **dict.fromkeys(levers, True))
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


# a variant's suffix (and profile_step's flag) -> the fast.Options lever it turns on, and what that does
SWITCHED_LEVERS = {
    "maskbucket": ("mask_roi_bucket", "the mask branch on its RoIs padded to a multiple of 64"),
    "maskcl": ("mask_channels_last", "the mask branch in channels_last"),
    "cudnnfuse": ("cudnn_fusion", "convolution, bias, shortcut and ReLU in one cuDNN call"),
    "fpnadd": ("fpn_broadcast", "the FPN's top-down sums without upsampled maps"),
    "rpnone": ("rpn_one_output_conv", "the RPN head's two output convolutions as one"),
    "polys": ("mask_targets_kernel", "the closed profile's mask targets as its trainer makes them on a GPU: "
                                     "polygons from the loader, drawn at 28x28 by one kernel (with_polygons; "
                                     "without it full-image masks, which torchvision's models take)"),
    "headbias": ("head_bias_act", "the FPN's, RPN head's and mask head's convolution biases and ReLUs in one "
                                  "vectorised pass (fast.bias_act)"),
    "dsconv1": ("downsample_with_conv1", "each stage's first block reading its input with one convolution for "
                                         "conv1 and the downsample"),
}

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
    "cudnn.benchmark on, -nogc Python's garbage collector off while it runs, "
    + ", ".join(f"-{suffix} {what} (fast.Options.{lever})" for suffix, (lever, what) in SWITCHED_LEVERS.items()))


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
                          reference_weights=reference_weights,
                          levers=tuple(lever for suffix, (lever, _) in SWITCHED_LEVERS.items() if f"-{suffix}" in variant))
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
    masks = [synthetic_batch(batch_size, "cpu", seed=s, shapes=args.shapes) for s in range(args.batches)]
    if device.type == "cuda":
        masks = [pinned(b) for b in masks]
    # the same images (pinned once: pin_memory keeps a pinned tensor) with the closed profile's targets
    polygons = ([(images, with_polygons(targets)) for images, targets in masks]
                if any("-polys" in v for v in variants) else [])
    if device.type == "cuda":
        polygons = [pinned(b) for b in polygons]
    batches = {v: polygons if "-polys" in v else masks for v in variants}
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
                    rounds[variant].append(time_steps(*built[variant][:2], batches[variant], device, *built[variant][2:],
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
    from benchmarks.step_checks import CHECKS  # they build their models with this module's helpers

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
    unpolygoned = [v for v in args.variants.split(",") if "-polys" in v and not v.startswith("ref-")]
    if unpolygoned:
        p.error(f"--variants: -polys is the closed profile's targets, for ref- variants only, not {unpolygoned[0]}")

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
