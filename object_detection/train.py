"""MLPerf Mask R-CNN training: `python -m object_detection.train ...`, usually via `invoke train`.

One loop, top to bottom: set up (seed, data, model, optimizer), then epochs of training, each
followed by COCO evaluation, until the quality target or the epoch cap. Logs in the MLPerf format
(mlperf_logging.mllog) to stdout and to --log; rank 0 logs, every rank trains and evaluates.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import secrets
import signal
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from mlperf_logging import mllog
from mlperf_logging.mllog import constants as C

from object_detection import data as D
from object_detection.evaluate import (PARALLEL_MIN_RESULTS, CocoEvaluator, default_workers,
                                       start_scoring_workers)
from object_detection.model import build_model, use_channels_last
from object_detection.recipe import PROFILES, schedule_for


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m object_detection.train", description=__doc__.splitlines()[0])
    p.add_argument("--data-root", type=Path, required=True, help="dataset folder (<data_dir>/<dataset>)")
    p.add_argument("--dataset", default="coco2017", help="dataset name: coco2017 logs division closed")
    p.add_argument("--train-images", default="train2017")
    p.add_argument("--train-annotations", default="annotations/instances_train2017.json")
    p.add_argument("--val-images", default="val2017")
    p.add_argument("--val-annotations", default="annotations/instances_val2017.json")
    p.add_argument("--backbone", type=Path, help="ImageNet ResNet-50 state dict; none: random init")
    p.add_argument("--profile", default="coco", choices=sorted(PROFILES))
    p.add_argument("--per-gpu-batch", type=int, default=2, help="images per process per step")
    p.add_argument("--eval-batch", type=int, default=8, help="images per process per evaluation step")
    p.add_argument("--workers", type=int, default=4, help="data-loader workers per process")
    p.add_argument("--seed", type=int, help="master seed (default: drawn and logged)")
    p.add_argument("--max-epochs", type=int, help="epoch cap (default: the profile's)")
    p.add_argument("--bbox-target", type=float, help="box mAP target (default: the profile's)")
    p.add_argument("--segm-target", type=float, help="mask mAP target (default: the profile's)")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    p.add_argument("--amp", choices=["auto", "off", "bf16", "fp16"], default="auto")
    p.add_argument("--result-log", dest="log", type=Path, required=True,
                   help="MLPerf result log file (not --log: torchrun would take that as its own --log-dir)")
    p.add_argument("--checkpoint", type=Path, help="checkpoint file (default: <log>.ckpt)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint if there is one")
    p.add_argument("--config-name", default="custom", help="system configuration name, for the log")
    p.add_argument("--platform", default="", help="submission_platform (default: from the hardware)")
    p.add_argument("--submitter", default="Backend.AI MLPerf", help="submission_org")
    p.add_argument("--status", default="cloud", choices=["cloud", "onprem", "preview", "research"])
    p.add_argument("--print-freq", type=int, default=20, help="iterations between loss lines")
    return p.parse_args(argv)


class Run:
    """Process-group facts of this process."""

    def __init__(self, device_arg: str | None):
        self.world_size = int(os.environ.get("WORLD_SIZE", 1))
        self.rank = int(os.environ.get("RANK", 0))
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        use_cuda = torch.cuda.is_available() if device_arg is None else device_arg == "cuda"
        if use_cuda:
            torch.cuda.set_device(self.local_rank)
            self.device = torch.device("cuda", self.local_rank)
        else:
            self.device = torch.device("cpu")
        if self.world_size > 1:
            dist.init_process_group("nccl" if use_cuda else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def broadcast(self, obj):
        if self.world_size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


def amp_dtype(mode: str, device: torch.device):
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


def log_offset(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def save_checkpoint(path: Path, state: dict) -> None:
    """Write to a temporary name, then rename: a kill leaves the old checkpoint or the new one."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def seed_everything(master_seed: int, rank: int, epoch: int) -> None:
    """Every rank and epoch gets its own stream, derived from the master seed: a resumed run draws
    the same numbers as an uninterrupted one would have from that epoch on."""
    seed = D.derive_seed(master_seed, rank, epoch)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@torch.no_grad()
def evaluate(model, loader, evaluator: CocoEvaluator, run: Run, autocast) -> dict | None:
    """Every rank runs its shard; rank 0 gathers and scores. Masks leave the GPU as RLE text."""
    model.eval()
    for images, targets in loader:
        images = [img.to(run.device, non_blocking=True).float().div_(255) for img in images]
        with autocast():
            outputs = model(images)
        # The evaluator copies boxes and scores off the device and writes the masks' RLE text there.
        evaluator.update(outputs, [t["image_id"] for t in targets])
    evaluator.gather()
    return evaluator.summarize() if run.main else None


def die_with_launcher() -> None:
    """Get SIGKILL when torchrun, our parent, dies (Linux).

    torchrun starts each trainer in a session of its own, so killing the launcher's process group
    (kill -9, a job manager) would leave the trainers running on, still writing the log and the
    checkpoint that a --resume of the same log then writes too. Armed once main() starts: a kill
    while the trainer still imports torch can still orphan it.
    """
    if "TORCHELASTIC_RUN_ID" not in os.environ or not sys.platform.startswith("linux"):
        return
    import ctypes

    parent = os.getppid()
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() != parent:  # torchrun died before the call
        os.kill(os.getpid(), signal.SIGKILL)


def main(argv=None) -> int:
    die_with_launcher()
    args = parse_args(argv)
    run = Run(args.device)
    profile = PROFILES[args.profile]
    global_batch = args.per_gpu_batch * run.world_size
    # A profile's own schedule is written for its batch; other batches follow the linear scaling rule.
    schedule = profile.schedule.scaled_to(global_batch) if profile.schedule else schedule_for(global_batch)
    max_epochs = args.max_epochs or profile.max_epochs
    bbox_target = args.bbox_target if args.bbox_target is not None else profile.bbox_target
    segm_target = args.segm_target if args.segm_target is not None else profile.segm_target
    checkpoint_path = args.checkpoint or args.log.with_name(args.log.name + ".ckpt")
    resume_state = None
    if args.resume and checkpoint_path.exists():
        resume_state = torch.load(checkpoint_path, map_location="cpu", weights_only=False)

    logger = mllog.get_mllogger()
    if run.main:
        args.log.parent.mkdir(parents=True, exist_ok=True)
        if resume_state is not None:  # drop what the killed run logged after its last checkpoint
            with open(args.log, "r+b") as fh:
                fh.truncate(resume_state["log_offset"])
        elif args.log.exists():
            args.log.unlink()
        mllog.config(filename=str(args.log), root_dir=str(Path(__file__).resolve().parent.parent))
    else:
        logger.logger.setLevel("ERROR")

    def log(key, value=None, **metadata):
        if run.main:
            logger.event(key=key, value=value, metadata=metadata or None)

    def start(key, **metadata):
        if run.main:
            logger.start(key=key, metadata=metadata or None)

    def end(key, value=None, **metadata):
        if run.main:
            logger.end(key=key, value=value, metadata=metadata or None)

    if resume_state is None:
        log(C.CACHE_CLEAR, True)
        start(C.INIT_START)
        division = "closed" if args.dataset == "coco2017" and args.profile == "coco" else "open"
        log(C.SUBMISSION_BENCHMARK, "maskrcnn")
        log(C.SUBMISSION_ORG, args.submitter)
        log(C.SUBMISSION_DIVISION, division)
        log(C.SUBMISSION_STATUS, args.status)
        log(C.SUBMISSION_PLATFORM, args.platform or platform_name(run))
    master_seed = resume_state["seed"] if resume_state else args.seed
    if master_seed is None:
        master_seed = run.broadcast(secrets.randbelow(2**31) if run.main else None)
    seed_everything(master_seed, run.rank, 0)  # model initialisation

    autocast_dtype = amp_dtype(args.amp, run.device)
    autocast = (lambda: torch.autocast("cuda", dtype=autocast_dtype)) if autocast_dtype else nullcontext
    scaler = torch.amp.GradScaler("cuda") if autocast_dtype == torch.float16 else None
    if run.device.type == "cuda":
        torch.backends.cudnn.benchmark = False  # detection shapes vary every step: re-tuning costs more

    train_set = D.CocoDetection(args.data_root / args.train_images, args.data_root / args.train_annotations,
                                train=True)
    val_set = D.CocoDetection(args.data_root / args.val_images, args.data_root / args.val_annotations,
                              train=False)
    sampler = D.GroupedBatchSampler(train_set.aspect_groups(), args.per_gpu_batch, rank=run.rank,
                                    world_size=run.world_size, seed=master_seed)
    pin = run.device.type == "cuda"
    loader_kw = dict(collate_fn=D.collate, pin_memory=pin, num_workers=args.workers)
    # Workers start anew each epoch and seed from (master seed, rank, epoch, worker): see seed_everything.
    train_loader = torch.utils.data.DataLoader(train_set, batch_sampler=sampler,
                                               worker_init_fn=D.WorkerInit(master_seed, run.rank, sampler),
                                               **loader_kw)
    if (run.main and len(val_set) * profile.detections_per_image >= PARALLEL_MIN_RESULTS
            and default_workers() > 1):  # COCO: scoring in processes, up while the first epoch trains
        start_scoring_workers(val_set.coco)
    val_shard = torch.utils.data.Subset(val_set, D.shard_indices(len(val_set), run.rank, run.world_size))
    val_loader = torch.utils.data.DataLoader(val_shard, batch_size=args.eval_batch, shuffle=False, **loader_kw)

    num_classes = len(train_set.label_to_category)
    model = build_model(num_classes, backbone_weights=args.backbone if profile.pretrained else None,
                        min_size=profile.min_size, max_size=profile.max_size,
                        image_candidates=schedule.image_candidates, rois_per_image=profile.rois_per_image,
                        test_candidates=profile.test_candidates,
                        detections_per_image=profile.detections_per_image).to(run.device)
    if run.device.type == "cuda":
        use_channels_last(model)
    optimizer = make_optimizer(model, schedule.lr, fused=run.device.type == "cuda")
    ddp_model = model
    if run.world_size > 1:
        ddp_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[run.local_rank] if run.device.type == "cuda" else None, gradient_as_bucket_view=True)

    first_epoch, iteration = 1, 0
    if resume_state is not None:
        model.load_state_dict(resume_state["model"])
        optimizer.load_state_dict(resume_state["optimizer"])
        if scaler is not None and resume_state.get("scaler"):
            scaler.load_state_dict(resume_state["scaler"])
        first_epoch, iteration = resume_state["epoch"] + 1, resume_state["iteration"]
        if run.main:
            print(f"resuming after epoch {resume_state['epoch']} (iteration {iteration})", flush=True)
    else:
        log(C.SEED, master_seed)
        log(C.GLOBAL_BATCH_SIZE, global_batch)
        log(C.GRADIENT_ACCUMULATION_STEPS, 1)
        log(C.NUM_IMAGE_CANDIDATES, schedule.image_candidates)
        log(C.OPT_NAME, "sgd_with_momentum")
        log(C.OPT_BASE_LR, schedule.lr)
        log(C.OPT_LR_WARMUP_STEPS, schedule.warmup_steps)
        log(C.OPT_LR_WARMUP_FACTOR, schedule.warmup_factor)
        log(C.OPT_LR_DECAY_FACTOR, 0.1)
        log(C.OPT_LR_DECAY_STEPS, list(schedule.decay_steps))
        log(C.MIN_IMAGE_SIZE, profile.min_size)
        log(C.MAX_IMAGE_SIZE, profile.max_size)
        # Not MLPerf keys (the checker ignores them): what `invoke time` plots and describes.
        log("quality_target", {"BBOX": bbox_target, "SEGM": segm_target})
        log("config_name", args.config_name)
        if run.main:
            print(json.dumps({"config": args.config_name, "schedule": schedule.source, "amp": str(autocast_dtype),
                              "world_size": run.world_size, "device": str(run.device)}), flush=True)
        end(C.INIT_STOP)
        run.barrier()
        start(C.RUN_START)
        log(C.TRAIN_SAMPLES, len(train_set))
        log(C.EVAL_SAMPLES, len(val_set))

    status = C.ABORTED
    for epoch in range(first_epoch, max_epochs + 1):
        start(C.BLOCK_START, first_epoch_num=epoch, epoch_count=1)
        start(C.EPOCH_START, epoch_num=epoch)
        sampler.set_epoch(epoch)
        seed_everything(master_seed, run.rank, epoch)
        ddp_model.train()
        t0, seen, epoch_start_iteration = time.time(), 0, iteration
        for images, targets in train_loader:
            set_lr(optimizer, schedule.lr_at(iteration))
            images = [img.to(run.device, non_blocking=True).float().div_(255) for img in images]
            targets = [{k: (v.to(run.device, non_blocking=True) if torch.is_tensor(v) else v)
                        for k, v in t.items()} for t in targets]
            loss, losses = train_step(ddp_model, optimizer, scaler, images, targets, autocast)
            iteration += 1
            seen += len(images) * run.world_size
            # Every print_freq iterations, and the epoch's last: short epochs still show their loss.
            last_of_epoch = iteration - epoch_start_iteration == len(sampler)
            if run.main and (iteration % args.print_freq == 0 or last_of_epoch):
                value = loss.item()
                if not np.isfinite(value):
                    raise FloatingPointError(f"loss is {value} at iteration {iteration}")
                parts = " ".join(f"{k}={v.item():.4f}" for k, v in losses.items())
                rate = seen / (time.time() - t0)
                print(f"epoch {epoch} iter {iteration} loss={value:.4f} {parts} "
                      f"lr={schedule.lr_at(iteration):.5f} {rate:.1f} img/s", flush=True)
        end(C.EPOCH_STOP, epoch_num=epoch)
        if run.main:
            print(f"epoch {epoch}: {seen} images in {time.time() - t0:.1f} s "
                  f"({seen / (time.time() - t0):.1f} img/s)", flush=True)

        start(C.EVAL_START, epoch_num=epoch)
        evaluator = CocoEvaluator(val_set.coco, val_set.label_to_category)
        scores = evaluate(model, val_loader, evaluator, run, autocast)
        scores = run.broadcast(scores)
        end(C.EVAL_STOP, epoch_num=epoch)
        log(C.EVAL_ACCURACY, {"BBOX": scores["bbox"], "SEGM": scores["segm"]}, epoch_num=epoch)
        end(C.BLOCK_STOP, first_epoch_num=epoch)
        if scores["bbox"] >= bbox_target and scores["segm"] >= segm_target:
            status = C.SUCCESS
            break
        if run.main and epoch < max_epochs:
            save_checkpoint(checkpoint_path, {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None,
                "epoch": epoch, "iteration": iteration, "seed": master_seed,
                "log_offset": log_offset(args.log),
            })
        run.barrier()

    end(C.RUN_STOP, status=status)
    if run.main:
        print(f"run_stop: {status}", flush=True)
        # The checkpoint only serves --resume of an unfinished run; a finished one would leave
        # hundreds of MB per run in the results folder.
        checkpoint_path.unlink(missing_ok=True)
    if run.world_size > 1:
        dist.destroy_process_group()
    return 0


def platform_name(run: Run) -> str:
    """e.g. '1xNVIDIA H200' or 'cpu', the way MLPerf logs name a platform."""
    if run.device.type == "cuda":
        return f"{run.world_size}x{torch.cuda.get_device_name(run.device)}"
    return f"{run.world_size}xCPU"


if __name__ == "__main__":
    sys.exit(main())
