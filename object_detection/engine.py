"""One epoch of training and one evaluation, and the optimizer they step (as torchvision's
references/detection/engine.py keeps them: the loop a reader looks for, in one place)."""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

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
    """The reference's groups: biases at twice the learning rate and without weight decay."""
    weights, biases = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (biases if name.endswith(".bias") else weights).append(p)
    return [{"params": weights, "lr": lr, "weight_decay": weight_decay, "lr_factor": 1.0},
            {"params": biases, "lr": 2 * lr, "weight_decay": 0.0, "lr_factor": 2.0}]


def make_optimizer(model: torch.nn.Module, lr: float, *, fused: bool = False) -> torch.optim.SGD:
    """SGD with momentum 0.9 and weight decay 1e-4; fused into one kernel per step on the GPU."""
    return torch.optim.SGD(param_groups(model, lr, 1e-4), lr=lr, momentum=0.9, weight_decay=1e-4,
                           fused=True if fused else None)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_factor"]


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
    """A loader's batch on the device: uint8 images as floats in [0, 1], target tensors as they are."""
    images = [img.to(device, non_blocking=True).float().div_(255) for img in images]
    targets = [{k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in t.items()}
               for t in targets]
    return images, targets


@dataclass
class Trainer:
    """What every step of a run uses: the model (DDP-wrapped where several processes train), its
    optimizer and scaler, the schedule, autocast, and where and how often to report."""
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: object
    schedule: Schedule
    autocast: object
    device: torch.device
    world_size: int
    main: bool
    print_freq: int


def train_one_epoch(t: Trainer, loader, epoch: int, iteration: int) -> int:
    """Train on every batch of the loader; returns the iteration count after the epoch.

    Every print_freq iterations, and at the epoch's last, rank 0 reads the loss (the one host
    synchronisation) and prints it; a non-finite loss stops the run."""
    t.model.train()
    started, seen, steps = time.time(), 0, len(loader)
    for step, (images, targets) in enumerate(loader, start=1):
        set_lr(t.optimizer, t.schedule.lr_at(iteration))
        images, targets = to_device(images, targets, t.device)
        loss, losses = train_step(t.model, t.optimizer, t.scaler, images, targets, t.autocast)
        iteration += 1
        seen += len(images) * t.world_size
        if t.main and (iteration % t.print_freq == 0 or step == steps):
            value = loss.item()
            if not np.isfinite(value):
                raise FloatingPointError(f"loss is {value} at iteration {iteration}")
            parts = " ".join(f"{k}={v.item():.4f}" for k, v in losses.items())
            print(f"epoch {epoch} iter {iteration} loss={value:.4f} {parts} "
                  f"lr={t.schedule.lr_at(iteration):.5f} {seen / (time.time() - started):.1f} img/s", flush=True)
    if t.main:
        elapsed = time.time() - started
        print(f"epoch {epoch}: {seen} images in {elapsed:.1f} s ({seen / elapsed:.1f} img/s)", flush=True)
    return iteration


@torch.no_grad()
def evaluate(model, loader, evaluator: CocoEvaluator, device: torch.device, autocast, main: bool) -> dict | None:
    """Every rank runs its shard; rank 0 gathers and scores. Masks leave the GPU as RLE text."""
    model.eval()
    for images, targets in loader:
        images = [img.to(device, non_blocking=True).float().div_(255) for img in images]
        with autocast():
            outputs = model(images)
        # The evaluator copies boxes and scores off the device and writes the masks' RLE text there.
        evaluator.update(outputs, [t["image_id"] for t in targets])
    evaluator.gather()
    return evaluator.summarize() if main else None
