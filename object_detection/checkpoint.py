"""Checkpoints for --resume: written after each epoch, read back, and the result log cut to match.

A checkpoint holds the model, optimizer and scaler, the epoch and iteration, the master seed, and
how long the result log was when it was written: a resumed run drops what the killed one logged
after it, so the finished log reads as one uninterrupted run (and passes the compliance checker).
"""
from __future__ import annotations

import os
import secrets
from pathlib import Path

import torch


def load(path: Path) -> dict | None:
    """The checkpoint at `path`, or None where there is none."""
    if not path.exists():
        return None
    return torch.load(path, map_location="cpu", weights_only=False)


def prepare_log(log: Path, state: dict | None) -> None:
    """Before a run logs: cut the log back to the checkpoint's length, or, for a new run, remove it."""
    log.parent.mkdir(parents=True, exist_ok=True)
    if state is not None:
        with open(log, "r+b") as handle:
            handle.truncate(state["log_offset"])
    elif log.exists():
        log.unlink()


def save(path: Path, *, model, optimizer, scaler, epoch: int, iteration: int, seed: int, log: Path) -> None:
    """Write to a temporary name, then rename: a kill leaves the old checkpoint or the new one."""
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "scaler": scaler.state_dict() if scaler is not None else None,
             "epoch": epoch, "iteration": iteration, "seed": seed,
             "log_offset": log.stat().st_size if log.exists() else 0}
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def restore(state: dict, *, model, optimizer, scaler) -> tuple[int, int]:
    """Load a checkpoint's weights and optimizer; returns (first epoch to run, iteration)."""
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    return state["epoch"] + 1, state["iteration"]
