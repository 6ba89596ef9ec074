"""The refusals that must come before any GPU time, each one line: a dataset not fetched or not
verified, too little /dev/shm for the data loaders (Backend.AI's 64 MB default), no backbone weights,
a log or checkpoint that is not this run's, a closed-division batch the compliance checker rejects.

Separate from planning (mlperf.planning) because `invoke doctor` asks this host the same shared-memory
question without planning a run: one place keeps the launcher's answer and the doctor's the same.
"""
from __future__ import annotations

import sys
from pathlib import Path

from mlperf import host
from mlperf.errors import UserError

# Bytes one decoded training image with its masks takes in shared memory on its way from a worker:
# 640x480 RGB plus about seven 640x480 uint8 masks, the COCO average.
SHM_BYTES_PER_IMAGE = 640 * 480 * (3 + 7)
PREFETCH_FACTOR = 2


def shm_needed(processes: int, workers: int, batch: int, image_scale: float = 1.0) -> int:
    """Bytes of /dev/shm the data-loader workers fill at most: every worker's prefetched batches."""
    return int(processes * workers * PREFETCH_FACTOR * batch * SHM_BYTES_PER_IMAGE * image_scale)


def image_scale(cfg) -> float:
    """A configuration's images in shared memory, relative to COCO's (shapes' are a quarter at most)."""
    from object_detection.recipe import CLOSED_PROFILE

    return 1.0 if cfg.profile == CLOSED_PROFILE else 0.25


def shm_problem(processes: int, workers: int, batch: int, image_scale: float = 1.0) -> str | None:
    """Why the data-loader workers would run out of shared memory mid-epoch (None: they will not)."""
    need = shm_needed(processes, workers, batch, image_scale)
    shm = host.shm_bytes()
    if not need or shm is None or shm[1] >= need:
        return None
    return (f"/dev/shm has {shm[1] / 2**20:.0f} MiB free but {processes} processes x {workers} data-loader "
            f"workers need about {need / 2**20:.0f} MiB: on Backend.AI start the session with more shared "
            f"memory (e.g. --resource-opts shmem={max(1, -(-need // 2**30))}g), or pass fewer workers")


def check_shm(processes: int, workers: int, batch: int, image_scale: float = 1.0) -> None:
    """Refuse to start when data-loader workers would run out of shared memory mid-epoch."""
    problem = shm_problem(processes, workers, batch, image_scale)
    if problem:
        raise UserError(problem)


def dataset_problem(ds, data_dir: Path) -> str | None:
    """Why the dataset cannot be trained on yet (not fetched, not verified), or None."""
    dataset, root = ds.name, ds.root(data_dir)
    missing = [s.annotations for s in ds.splits.values() if not (root / s.annotations).is_file()]
    if not root.is_dir() or missing:
        return (f"dataset {dataset} not found at {root}: run `invoke fetch --dataset {dataset}` "
                f"(and `invoke verify`), or point --data-dir at it")
    from mlperf.datasets.verify import is_verified

    if not is_verified(ds, data_dir):
        return f"dataset {dataset} at {root} is not verified: run `invoke verify --dataset {dataset}`"
    return None


def refuse_rejected_lr(ds, profile: str, global_batch: int, ruleset: str | None, processes: int) -> None:
    """A closed-division batch whose learning rate the compliance checker rejects: every log of the
    series would fail after the GPU time is spent, so it stops here, dry runs included."""
    from object_detection.recipe import RULESET, closed_batch_problem, division

    if division(ds.name, profile) == "closed":
        problem = closed_batch_problem(global_batch, ruleset or RULESET, processes)
        if problem:
            raise UserError(problem)


def warn_without_rcp(ds, profile: str, global_batch: int, ruleset: str | None) -> None:
    """One line before a closed-division run whose global batch the RCP checker cannot judge."""
    from object_detection.recipe import RULESET, division, rcp_position

    if division(ds.name, profile) == "closed":
        where, text = rcp_position(global_batch, ruleset or RULESET)
        if where in ("below", "outside"):
            print(f"warning: {text}", file=sys.stderr, flush=True)


def check_resources(p, lacking) -> None:
    """The dataset, its categories and backbone, and shared memory for the loaders, of `p` (a
    mlperf.planning.Plan); what this host lacks goes to `lacking`, bad input is a UserError."""
    from object_detection.recipe import PROFILES

    problem = dataset_problem(p.ds, p.data_dir)
    if problem:
        lacking(problem)
    from object_detection import checkpoint

    try:  # the trainer's own refusals, said here in one line (torchrun would add its report of the exit)
        checkpoint.preflight(p.log, p.log.with_name(p.log.name + ".ckpt"), p.request.resume)
    except checkpoint.Refused as refused:
        raise UserError(refused.message.removeprefix("error: ")) from None
    if p.ds.categories is None:
        raise UserError(f"manifest of {p.ds.name} does not say how many categories it has (the model is built "
                        "before any data is read): add `categories: N` to it")
    if PROFILES[p.profile].pretrained:
        if not p.ds.backbone:
            raise UserError(f"dataset {p.ds.name} names no backbone weights file: add `backbone:` to its manifest")
        weights = p.ds.downloads(p.data_dir) / p.ds.backbone
        if not weights.is_file() and any(spec.name == p.ds.backbone for spec in p.ds.files):
            lacking(f"backbone weights {weights} missing: run `invoke fetch --dataset {p.ds.name}`")
        elif not weights.is_file():  # a generated set's backbone is the user's own file
            lacking(f"backbone weights {weights} missing: put " + (
                "Detectron's MSRA R-50 (R-50.pkl, the reference's) there" if PROFILES[p.profile].recipe.backbone
                == "msra-r50" else "an ImageNet ResNet-50 state dict (torchvision's format) there"))
    problem = shm_problem(p.nproc, p.workers, p.cfg.per_gpu_batch, image_scale(p.cfg))
    if problem:
        lacking(problem)
