"""MLPerf Mask R-CNN training: `python -m object_detection.train ...`, usually via `invoke train`.

One loop, top to bottom: set up (seed, data, model, optimizer), then epochs of training, each
followed by COCO evaluation (engine.py), until the quality target or the epoch cap. Logs in the
MLPerf format (mllog.py) to stdout and to --result-log; rank 0 logs, every rank trains and
evaluates; checkpoint.py keeps what --resume needs.
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
from mlperf_logging.mllog import constants as C

from object_detection import checkpoint, fast
from object_detection import data as D
from object_detection.console import Console
from object_detection.engine import (Diverged, Trainer, amp_dtype, evaluate, freeze_setup, make_optimizer,
                                     train_one_epoch, warm_up)
from object_detection.evaluate import CocoEvaluator, StockEvaluation
from object_detection.fast.scoring import PARALLEL_MIN_RESULTS, FastEvaluation, default_workers
from object_detection.mllog import MLLogger
from object_detection.model import NUM_CLASSES_COCO, build_model
from object_detection.reference import BackboneFileError
from object_detection.recipe import EVAL_BATCH, LOADER_WORKERS, PROFILES, Profile, division
from object_detection.run_request import RunRequest


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m object_detection.train", description=__doc__.splitlines()[0])
    p.add_argument("--data-root", type=Path, required=True, help="dataset folder (<data_dir>/<dataset>)")
    p.add_argument("--dataset", default="coco2017", help="dataset name: coco2017 logs division closed")
    p.add_argument("--train-images", default="train2017")
    p.add_argument("--train-annotations", default="annotations/instances_train2017.json")
    p.add_argument("--val-images", default="val2017")
    p.add_argument("--val-annotations", default="annotations/instances_val2017.json")
    p.add_argument("--backbone", type=Path, help="ImageNet ResNet-50 state dict; none: random init")
    p.add_argument("--num-classes", type=int, default=NUM_CLASSES_COCO,
                   help="categories + 1 (background): the model is built before the run reads any data")
    p.add_argument("--eval-images", type=int, help="validation images, as the manifest counts them (without "
                                                   "reading the data): decides whether scoring starts workers")
    p.add_argument("--profile", default="coco", choices=sorted(PROFILES))
    p.add_argument("--per-gpu-batch", type=int, default=2, help="images per process per step")
    p.add_argument("--eval-batch", type=int, default=EVAL_BATCH, help="images per process per evaluation step")
    p.add_argument("--workers", type=int, default=LOADER_WORKERS, help="data-loader workers per process")
    p.add_argument("--bbox-target", type=float, help="box mAP target (default: the profile's)")
    p.add_argument("--segm-target", type=float, help="mask mAP target (default: the profile's)")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    p.add_argument("--amp", choices=["auto", "off", "bf16", "fp16"], default="auto")
    p.add_argument("--result-log", dest="log", type=Path, required=True,
                   help="MLPerf result log file (not --log: torchrun would take that as its own --log-dir)")
    p.add_argument("--checkpoint", type=Path, help="checkpoint file (default: <log>.ckpt)")
    p.add_argument("--cache-cleared", action="store_true",
                   help="the page cache of the dataset was cleared before this run (the launcher does it; "
                        "MLPerf's cache_clear record)")
    p.add_argument("--config-name", default="custom", help="system configuration name, for the log")
    p.add_argument("--platform", default="", help="submission_platform (default: from the hardware)")
    p.add_argument("--print-freq", type=int, default=20,
                   help="iterations between loss readings: every rank stops a run whose loss is not finite, "
                        "and the progress display shows them")
    p.add_argument("--verbose", action="store_true", default=os.environ.get("MLPERF_LOG_ECHO") == "1",
                   help="also print every MLPerf log record (MLPERF_LOG_ECHO=1 does the same)")
    p.add_argument("--sources-digest", help="digest of the code that runs, logged as a non-MLPerf record")
    RunRequest.add_arguments(p)  # seed, max epochs, ruleset, submitter, status, speed, resume
    return p.parse_args(argv)


class Run:
    """Process-group facts of this process, and the speed pieces (`speed`: fast.Options) it runs with."""

    def __init__(self, device_arg: str | None, speed: str = "fast"):
        self.world_size = int(os.environ.get("WORLD_SIZE", 1))
        self.rank = int(os.environ.get("RANK", 0))
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        use_cuda = torch.cuda.is_available() if device_arg is None else device_arg == "cuda"
        self.speed = fast.options_for(speed, "cuda" if use_cuda else "cpu")
        if use_cuda and self.speed.cuda_graphs and self.world_size > 1:
            # make_graphed_callables beside DDP's gradient hooks is not measured here: refuse, not guess
            raise SystemExit(f"error: --speed {speed}: cuda_graphs runs on one GPU only so far, not on "
                             f"{self.world_size} processes; leave cuda_graphs out of --speed")
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


def seed_everything(master_seed: int, rank: int, epoch: int) -> None:
    """Every rank and epoch gets its own stream, derived from the master seed: a resumed run draws
    the same numbers as an uninterrupted one would have from that epoch on."""
    seed = D.derive_seed(master_seed, rank, epoch)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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


def data_loaders(args, run: Run, master_seed: int):
    """The training set, its loader and sampler; the validation set and this rank's shard of it,
    as the profile's recipe reads and orders them. Reads the dataset: called after run_start."""
    recipe = PROFILES[args.profile].recipe
    train_set = D.CocoDetection(args.data_root / args.train_images, args.data_root / args.train_annotations,
                                train=True, recipe=recipe)
    val_set = D.CocoDetection(args.data_root / args.val_images, args.data_root / args.val_annotations,
                              train=False, recipe=recipe, masks=False)
    if len(train_set.label_to_category) != args.num_classes:
        raise ValueError(f"{args.train_annotations} has {len(train_set.label_to_category) - 1} categories, but the "
                         f"model was built for {args.num_classes - 1} (--num-classes {args.num_classes})")
    sampler = D.batch_sampler(train_set.aspect_groups(), args.per_gpu_batch, rank=run.rank,
                              world_size=run.world_size, seed=master_seed, recipe=recipe)
    # Each loader draws its workers' base seed from a generator of its own: from the global one, a
    # loader that starts its workers each epoch would shift the model's random draws (the RoI
    # sampler's) against one whose workers persist.
    loader_kw = dict(collate_fn=D.collate, pin_memory=run.device.type == "cuda", num_workers=args.workers,
                     persistent_workers=args.workers > 0 and run.speed.persistent_workers,
                     generator=torch.Generator().manual_seed(D.derive_seed(master_seed, run.rank, D.LOADER_SEEDS)))
    train_loader = torch.utils.data.DataLoader(train_set, batch_sampler=sampler,
                                               worker_init_fn=D.WorkerInit(master_seed, run.rank), **loader_kw)
    val_shard = torch.utils.data.Subset(val_set, D.shard_indices(len(val_set), run.rank, run.world_size))
    val_loader = torch.utils.data.DataLoader(val_shard, batch_size=args.eval_batch, shuffle=False, **loader_kw)
    return train_set, val_set, sampler, train_loader, val_loader


def scores_in_workers(args, run: Run, profile: Profile) -> bool:
    """Whether rank 0 scores in worker processes (COCO: 500k results): decided from the manifest's
    count, before any data is read, so that the workers can start in initialisation."""
    return (run.main and run.speed.evaluation and default_workers() > 1
            and args.eval_images is not None
            and args.eval_images * profile.detections_per_image >= PARALLEL_MIN_RESULTS)


def evaluation_speed(args) -> FastEvaluation | StockEvaluation:
    """Evaluation's half of --speed, kept for the run (a FastEvaluation's worker processes)."""
    return FastEvaluation() if fast.options_for(args.speed, "cpu").evaluation else StockEvaluation()


def trainer_for(args, run: Run, profile: Profile, schedule) -> Trainer:
    """The model (with the speed code for this device), warmed up on synthetic batches of the run's
    shapes where there is something to compile (GPUs), its optimizer, scaler and autocast."""
    model = build_model(args.num_classes, backbone_weights=args.backbone if profile.pretrained else None,
                        min_size=profile.min_size, max_size=profile.max_size,
                        proposals_per_image=profile.proposals_per_image, rois_per_image=profile.rois_per_image,
                        test_candidates=profile.test_candidates, detections_per_image=profile.detections_per_image,
                        speed=run.speed,
                        model=profile.model,
                        recipe=profile.recipe).to(run.device)
    dtype = amp_dtype(args.amp, run.device)
    autocast = (lambda: torch.autocast("cuda", dtype=dtype)) if dtype else nullcontext
    if run.device.type == "cuda":
        torch.backends.cudnn.benchmark = False  # detection shapes vary every step: re-tuning costs more
        seconds = warm_up(model, autocast, batch=args.per_gpu_batch, eval_batch=args.eval_batch,
                          size=(profile.min_size, profile.max_size), device=run.device)
        if run.main:
            print(f"warmed up in {seconds:.1f} s (synthetic batches; compiled the NMS kernels)", flush=True)
    ddp_model = model
    if run.world_size > 1:
        # broadcast_buffers off: the only buffers are the frozen norms' statistics, equal on every
        # rank; broadcasting them each forward costs a collective and, by writing them, drops
        # fast.fold_bn's kept constants every step
        ddp_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[run.local_rank] if run.device.type == "cuda" else None, gradient_as_bucket_view=True,
            broadcast_buffers=False)
    return Trainer(model=ddp_model, optimizer=make_optimizer(model, schedule.lr, fused=run.device.type == "cuda",
                                                             loss_scaled=dtype == torch.float16),
                   scaler=torch.amp.GradScaler("cuda") if dtype == torch.float16 else None, schedule=schedule,
                   autocast=autocast, device=run.device, world_size=run.world_size,
                   console=Console(run.main), check_every=args.print_freq,
                   prefetch=run.speed.prefetch)


def master_seed_of(args, run: Run, resume_state: dict | None) -> int:
    """The run's master seed: the resumed run's, the one given, or one drawn by rank 0 for all."""
    seed = resume_state["seed"] if resume_state else args.seed
    return run.broadcast(secrets.randbelow(2**31) if run.main else None) if seed is None else seed


def announce(args, run: Run, schedule) -> None:
    """One JSON line of what runs (configuration, schedule, precision, processes), from rank 0."""
    if run.main:
        print(json.dumps({"config": args.config_name, "schedule": schedule.source,
                          "amp": str(amp_dtype(args.amp, run.device)), "world_size": run.world_size,
                          "device": str(run.device), "speed": args.speed}), flush=True)


def begin_log(log: MLLogger, args, run: Run) -> None:
    """A new run's first records: the cache, init_start, who submits what, the code that runs."""
    log.event(C.CACHE_CLEAR, args.cache_cleared)  # true only where the launcher cleared it
    log.start(C.INIT_START)
    log.submission(org=args.submitter, division=division(args.dataset, args.profile), status=args.status,
                   platform=args.platform or platform_name(run))
    if args.sources_digest:
        log.event("sources_digest", args.sources_digest)  # read by mlperf.results.logs (SOURCES_KEY)


def evaluate_epoch(epoch: int, log: MLLogger, run: Run, trainer: Trainer, val_set, val_loader, profile: Profile,
                   targets: dict, evaluation) -> dict:
    """The evaluation after an epoch, its records and its console line; every rank gets the scores.
    `evaluation`: evaluation_speed(args), the same for every epoch (a FastEvaluation keeps its workers)."""
    model = trainer.model.module if run.world_size > 1 else trainer.model
    log.start(C.EVAL_START, epoch_num=epoch)
    started = time.time()
    evaluator = CocoEvaluator(val_set.coco, val_set.label_to_category, box_offset=profile.recipe.box_offset,
                              speed=evaluation)
    scores = run.broadcast(evaluate(model, val_loader, evaluator, run.device, trainer.autocast, run.main))
    log.end(C.EVAL_STOP, epoch_num=epoch)
    trainer.console.evaluation(epoch, scores, targets, time.time() - started)
    log.event(C.EVAL_ACCURACY, {"BBOX": scores["bbox"], "SEGM": scores["segm"]}, epoch_num=epoch)
    log.end(C.BLOCK_STOP, first_epoch_num=epoch)
    return scores


def main(argv=None) -> int:
    die_with_launcher()
    args = parse_args(argv)
    run = Run(args.device, args.speed)
    profile = PROFILES[args.profile]
    global_batch = args.per_gpu_batch * run.world_size
    schedule = profile.schedule_for(global_batch, args.ruleset)
    max_epochs = args.max_epochs or profile.max_epochs
    targets = profile.targets(args.bbox_target, args.segm_target)
    checkpoint_path = args.checkpoint or args.log.with_name(args.log.name + ".ckpt")
    resume_state = checkpoint.open_run(args.log, checkpoint_path, resume=args.resume, main=run.main,
                                       broadcast=run.broadcast)
    log = MLLogger(args.log, run.main, echo=args.verbose)
    if resume_state is None:
        begin_log(log, args, run)
    master_seed = master_seed_of(args, run, resume_state)
    seed_everything(master_seed, run.rank, 0)  # model initialisation
    trainer = trainer_for(args, run, profile, schedule)
    model = trainer.model.module if run.world_size > 1 else trainer.model
    evaluation = evaluation_speed(args)
    if scores_in_workers(args, run, profile):
        evaluation.start()  # the processes only: they may not read the ground truth yet
    first_epoch, iteration = 1, 0
    if resume_state is not None:
        first_epoch, iteration = checkpoint.restore(resume_state, model=model, optimizer=trainer.optimizer,
                                                    scaler=trainer.scaler)
        if run.main:
            print(f"resuming after epoch {first_epoch - 1} (iteration {iteration})", flush=True)
    else:
        log.hyperparameters(seed=master_seed, global_batch=global_batch, schedule=schedule, profile=profile,
                            per_gpu_batch=args.per_gpu_batch, targets=targets, config_name=args.config_name)
        announce(args, run, schedule)
        log.end(C.INIT_STOP)
        run.barrier()
        log.start(C.RUN_START)
    # The timed run: from here on the dataset is read (MLPerf: nothing of it before run_start).
    train_set, val_set, sampler, train_loader, val_loader = data_loaders(args, run, master_seed)
    if resume_state is None:
        log.event(C.TRAIN_SAMPLES, len(train_set))
        log.event(C.EVAL_SAMPLES, len(val_set))
    if scores_in_workers(args, run, profile):
        evaluation.start(val_set.coco)  # the workers index the ground truth while epoch 1 trains
    if run.speed.freeze_setup:
        freeze_setup()  # before the first epoch forks the loader workers

    status, diverged = C.ABORTED, None
    for epoch in range(first_epoch, max_epochs + 1):
        log.start(C.BLOCK_START, first_epoch_num=epoch, epoch_count=1)
        log.start(C.EPOCH_START, epoch_num=epoch)
        sampler.set_epoch(epoch)
        seed_everything(master_seed, run.rank, epoch)
        try:
            iteration = train_one_epoch(trainer, train_loader, epoch, iteration)
        except Diverged as stop:  # every rank raises it at the same step
            diverged = stop
            log.end(C.EPOCH_STOP, epoch_num=epoch)
            log.end(C.BLOCK_STOP, first_epoch_num=epoch)
            break
        log.end(C.EPOCH_STOP, epoch_num=epoch)
        scores = evaluate_epoch(epoch, log, run, trainer, val_set, val_loader, profile, targets, evaluation)
        if scores["bbox"] >= targets["BBOX"] and scores["segm"] >= targets["SEGM"]:
            status = C.SUCCESS
            break
        if run.main and epoch < max_epochs:
            checkpoint.save(checkpoint_path, model=model, optimizer=trainer.optimizer, scaler=trainer.scaler,
                            epoch=epoch, iteration=iteration, seed=master_seed, log=args.log)
        run.barrier()

    log.end(C.RUN_STOP, status=status)
    if run.main:
        print(f"run_stop: {status}", flush=True)
        if diverged is not None:
            print(f"error: training diverged: {diverged} in epoch {epoch}; the log ends with run_stop "
                  "aborted (a series counts it as a failed run)", file=sys.stderr, flush=True)
        checkpoint.close_run(args.log, checkpoint_path)
    if run.world_size > 1:
        dist.destroy_process_group()
    return 0 if diverged is None else 1


def platform_name(run: Run) -> str:
    """e.g. '1xNVIDIA H200' or 'cpu', the way MLPerf logs name a platform."""
    if run.device.type == "cuda":
        return f"{run.world_size}x{torch.cuda.get_device_name(run.device)}"
    return f"{run.world_size}xCPU"


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BackboneFileError as bad:  # a file the user gave: one line, no traceback
        print(f"error: {bad}", file=sys.stderr)
        sys.exit(1)
