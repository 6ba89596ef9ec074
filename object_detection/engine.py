"""One epoch of training and one evaluation, and the optimizer they step (as torchvision's
references/detection/engine.py keeps them: the loop a reader looks for, in one place)."""
from __future__ import annotations

import gc
import math
import time
from dataclasses import dataclass

import torch

from object_detection.console import Console
from object_detection.evaluate import CocoEvaluator
from object_detection.recipe import Schedule


def amp_dtype(mode: str, device: torch.device):
    """The autocast dtype for --amp: bf16 where the GPU has it (auto), fp16 otherwise; None on a CPU."""
    if device.type != "cuda" or mode == "off":
        return None
    if mode == "bf16" or (mode == "auto" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float16


def param_groups(model: torch.nn.Module, lr: float, weight_decay: float) -> list[dict]:
    """The reference's groups: biases at twice the base learning rate (lr_factor, which the
    schedule's warmup takes as the group's base) and without weight decay."""
    weights, biases = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (biases if name.endswith(".bias") else weights).append(p)
    return [{"params": weights, "lr": lr, "weight_decay": weight_decay, "lr_factor": 1.0},
            {"params": biases, "lr": 2 * lr, "weight_decay": 0.0, "lr_factor": 2.0}]


def make_optimizer(model: torch.nn.Module, lr: float, *, fused: bool = False,
                   loss_scaled: bool = False) -> torch.optim.SGD:
    """SGD with momentum 0.9 and weight decay 1e-4; fused into one kernel per step (`fused`) unless
    a GradScaler scales the loss (fp16). torch's fused SGD makes its momentum buffers with
    empty_like on its first step and leaves them so when the scaler skips that step, as it usually
    does (fp16 gradients overflow at the initial scale): the next step adds uninitialised memory
    and the weights are not finite a few steps later (BENCHMARKS.md, "A run that stops with a non-finite loss"). The
    unfused optimizer is never called on a skipped step."""
    return torch.optim.SGD(param_groups(model, lr, 1e-4), lr=lr, momentum=0.9, weight_decay=1e-4,
                           fused=True if fused and not loss_scaled else None)


def set_lr(optimizer: torch.optim.Optimizer, schedule: Schedule, steps_done: int) -> None:
    """Each group's learning rate for the step after `steps_done`: per group, because mlperf_linear
    warms the biases up from a different start than twice the weights' rate."""
    for group in optimizer.param_groups:
        group["lr"] = schedule.lr_of_step(steps_done, group["lr_factor"])


def train_step(model, optimizer, scaler, images, targets, autocast):
    """One SGD step on a batch already on the device; returns the summed loss and its parts.
    No host synchronisation: the caller reads the loss only when it prints it."""
    with autocast():
        losses = model(images, targets)
    loss = sum(losses.values())
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()
    return loss, losses


def to_device(images, targets, device: torch.device):
    """A loader's batch on the device: uint8 images as floats in [0, 1], target tensors as they are.
    Boxes still on the host are checked here, where it costs no wait (the model's padded heads,
    fast.sync_free, do not check them on the device)."""
    from object_detection.fast.sync_free import check_boxes

    on_host = [t["boxes"] for t in targets if "boxes" in t and not t["boxes"].is_cuda]
    if on_host:
        check_boxes(torch.cat(on_host))
    images = images_to_device(images, device)
    targets = [{k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in t.items()}
               for t in targets]
    return images, targets


def images_to_device(images, device: torch.device) -> list[torch.Tensor]:
    """A loader's uint8 images on the device as floats in [0, 1]. (Copying a batch's small target
    tensors in one buffer and casting with one division kernel launched fewer operators but made
    the training step slower on an H100, 10-15% by a bisection: BENCHMARKS.md, tenth session.)"""
    return [img.to(device, non_blocking=True).float().div_(255) for img in images]


def on_device(loader, device: torch.device, prefetch: bool = False):
    """The loader's batches on the device (to_device). With `prefetch` on a GPU, each batch is
    copied on a side stream while the step before it computes: on the step's own stream the copy
    (20-40 MB of pinned images and masks at COCO's shapes) would wait for that step, then hold up
    the next one."""
    if not (prefetch and device.type == "cuda"):
        for images, targets in loader:
            yield to_device(images, targets, device)
        return
    side, batches = torch.cuda.Stream(device), iter(loader)

    def copied():
        batch = next(batches, None)
        if batch is None:
            return None
        with torch.cuda.stream(side):
            return to_device(*batch, device)

    ahead = copied()
    while ahead is not None:
        step_stream = torch.cuda.current_stream(device)
        step_stream.wait_stream(side)
        images, targets = ahead
        for tensor in [*images, *(v for t in targets for v in t.values() if torch.is_tensor(v))]:
            tensor.record_stream(step_stream)  # made on the side stream, freed after the step's use
        yield ahead
        ahead = copied()  # after the consumer queued its step: the copy overlaps that step


def freeze_setup() -> None:
    """Move everything set-up made (the annotations: millions of objects for COCO, the model, the
    loaders) into the collector's permanent generation: a full collection then walks only what
    training makes, and forked loader workers do not copy the pages a collection would touch."""
    gc.collect()
    gc.freeze()


@dataclass
class Trainer:
    """What every step of a run uses: the model (DDP-wrapped where several processes train), its
    optimizer and scaler, the schedule, autocast, and what rank 0 shows of it (the console)."""
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: object
    schedule: Schedule
    autocast: object
    device: torch.device
    world_size: int
    console: Console
    check_every: int = 20            # steps between loss readings (the host synchronisation they cost)
    prefetch: bool = False           # batches copied on a side stream (on_device)


GC_EVERY = 100                   # training steps between full garbage collections


class Diverged(Exception):
    """Some rank's loss is not finite: the run cannot converge and stops (run_stop aborted)."""

    def __init__(self, iteration: int, reading: dict[str, float]):
        parts = ", ".join(f"{k} {v:g}" for k, v in reading.items() if not math.isfinite(v))
        super().__init__(f"the loss is not finite at iteration {iteration} ({parts or 'on another rank'})")
        self.iteration = iteration


def read_losses(loss, losses: dict, world_size: int) -> tuple[dict[str, float], bool]:
    """The loss and its parts as numbers, and whether every rank's are finite: one host
    synchronisation (and, across processes, one all-reduce of a flag, so every rank stops at the
    same step instead of some waiting in the next gradient all-reduce)."""
    values = torch.stack([loss.detach().float(), *(v.detach().float() for v in losses.values())])
    flag = (~torch.isfinite(values)).any().float().reshape(1)
    if world_size > 1:
        import torch.distributed as dist

        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    *numbers, bad = torch.cat([values, flag]).tolist()
    return dict(zip(["loss", *losses], numbers)), bad == 0


def train_one_epoch(t: Trainer, loader, epoch: int, iteration: int) -> int:
    """Train on every batch of the loader; returns the iteration count after the epoch. Every
    `t.check_every` steps and at the epoch's end each rank reads the loss (the one host
    synchronisation) and the console shows it; a non-finite loss on any rank raises Diverged on all."""
    t.model.train()
    steps = len(loader)
    t.console.epoch_start(epoch, steps, loader.batch_sampler.batch_size * t.world_size)
    # The cyclic garbage collector's automatic passes cost ~10% of a GPU step fed by the loader
    # (BENCHMARKS.md): off for the epoch, with one full collection every GC_EVERY steps instead, so
    # whatever cycles a step leaves (and the device memory they hold) stay bounded.
    gc.disable()
    try:
        for step, (images, targets) in enumerate(on_device(loader, t.device, t.prefetch), start=1):
            set_lr(t.optimizer, t.schedule, iteration)
            loss, losses = train_step(t.model, t.optimizer, t.scaler, images, targets, t.autocast)
            iteration += 1
            reading = None
            if step % t.check_every == 0 or step == len(loader):
                reading, healthy = read_losses(loss, losses, t.world_size)
                if not healthy:
                    raise Diverged(iteration, reading)
            t.console.step(iteration, step, reading, t.schedule.lr_of_step(iteration - 1))
            if step % GC_EVERY == 0:
                gc.collect()
    finally:
        gc.enable()
    t.console.epoch_end()
    return iteration


def synthetic_batch(batch: int, size: tuple[int, int], classes: int, device: torch.device, portrait: bool):
    """Random images of a run's largest input size (turned for portrait) with a few random
    instances each: the shapes a run meets, none of its data."""
    height, width = size[::-1] if portrait else size
    images = [torch.rand(3, height, width, device=device) for _ in range(batch)]
    targets = []
    for _ in range(batch):
        corner = torch.rand(3, 2, device=device) * torch.tensor([width / 2, height / 2], device=device)
        boxes = torch.cat([corner, corner + torch.tensor([width / 3, height / 3], device=device)], dim=1)
        masks = torch.zeros(3, height, width, dtype=torch.uint8, device=device)
        for mask, (x0, y0, x1, y1) in zip(masks, boxes.round().int().tolist()):
            mask[y0:y1, x0:x1] = 1
        targets.append({"boxes": boxes, "labels": torch.randint(1, classes, (3,), device=device), "masks": masks})
    return images, targets


def warm_up(model, autocast, *, batch: int, eval_batch: int, size: tuple[int, int], device: torch.device) -> float:
    """Training and evaluation passes on synthetic batches of the run's shapes, both orientations,
    before run_start (MLPerf lets initialisation compile and warm up on synthetic data): the NMS
    kernels compile and cuDNN and the allocator settle outside the timed run, and with
    fast.Options.mask_roi_bucket the mask branch meets each of its sizes. Gradients are dropped
    and no optimizer steps: the weights stay as they are. Returns the seconds it took."""
    from object_detection.fast.mask_branch import warm_mask_branch
    from object_detection.fast.nms import precompile

    started = time.time()
    classes = model.roi_heads.box_predictor.cls_score.out_features
    for portrait in (False, True):
        images, targets = synthetic_batch(batch, size, classes, device, portrait)
        model.train()
        with autocast():
            losses = model(images, targets)
        sum(losses.values()).backward()
        model.zero_grad(set_to_none=True)
        model.eval()
        with torch.no_grad(), autocast():
            model(images[:eval_batch])
    model.train()
    warm_mask_branch(model.roi_heads, batch, autocast)
    precompile(device)
    return time.time() - started


@torch.no_grad()
def evaluate(model, loader, evaluator: CocoEvaluator, device: torch.device, autocast, main: bool) -> dict | None:
    """Every rank runs its shard; rank 0 gathers and scores. Masks leave the GPU as RLE text (with
    the evaluator's fast.scoring.FastEvaluation). Rank 0's scores carry "seconds": {"inference": ...,
    "scoring": ...} (the log has only the sum)."""
    model.eval()
    started = time.perf_counter()
    for images, targets in loader:
        images = images_to_device(images, device)
        with autocast():
            outputs = model(images)
        # The evaluator copies boxes and scores off the device (and, fast, writes the masks' RLE text there).
        evaluator.update(outputs, [t["image_id"] for t in targets])
    evaluator.gather()
    if not main:
        return None
    inferred = time.perf_counter()
    scores = evaluator.summarize()
    return {**scores, "seconds": {"inference": inferred - started, "scoring": time.perf_counter() - inferred}}
