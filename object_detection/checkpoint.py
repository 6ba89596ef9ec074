"""The files of one run: its result log and the checkpoint that --resume continues from.

A checkpoint is written after each epoch (but the last) and holds the model, optimizer and scaler,
the epoch and iteration, the master seed, and how long the result log was then, with a digest of
that much of the log: a resumed run drops what the killed one logged after it, so the finished log
reads as one uninterrupted run (and passes the compliance checker), and a checkpoint resumes only
the run whose log it was written beside (not a later run's, nor a copy's from elsewhere).

A checkpoint is data, never code: it is read with torch's weights-only unpickler, so a file dropped
into a results folder cannot run anything. Rank 0 holds a lock on the log for the whole run, so that
two runs never write one log and checkpoint. A finished log (its last record run_stop) is never
deleted: --resume of it has nothing to do, and a new run moves it aside. The checkpoint only serves
--resume, so a failure to write it (a full disk) is a warning and training goes on.
"""
from __future__ import annotations

import atexit
import contextlib
import glob
import hashlib
import json
import os
import secrets
import shutil
import sys
import time
import warnings
from pathlib import Path

FIELDS = {"model": dict, "optimizer": dict, "epoch": int, "iteration": int, "seed": int, "log_offset": int,
          "log_digest": str}
TAIL_BYTES = 65536      # enough to hold a log's last record (run_stop is a short one)
_held: dict[Path, int] = {}  # lock file -> descriptor: held until close_run or the process ends


class Refused(Exception):
    """This run cannot go on as asked: `message` is the one line to print, `code` the exit status
    (0 where there is nothing to do)."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.message, self.code = message, code


def open_run(log: Path, path: Path, *, resume: bool, main: bool, broadcast) -> dict | None:
    """Before a run logs: lock its log (rank 0, for the whole run), then either load the checkpoint
    that --resume continues and cut the log back to it, or clear the way for a new run. Returns the
    checkpoint's state, or None for a new run. Where the run cannot go on, every rank exits
    (SystemExit) after rank 0 has printed one line. `broadcast` sends rank 0's object to every rank."""
    state, verdict = None, None
    if main:
        try:
            state = _prepare(log, path, resume)
            verdict = ("resume" if state is not None else "new", 0, "")
        except Refused as refused:
            verdict = ("exit", refused.code, refused.message)
    kind, code, message = broadcast(verdict)
    if kind == "exit":
        if main:
            print(message, file=sys.stderr if code else sys.stdout, flush=True)
        raise SystemExit(code)
    if kind == "resume" and not main:
        try:
            state = load(path, log)
        except Refused as refused:
            raise SystemExit(refused.message) from None
    return state


def preflight(log: Path, path: Path, resume: bool) -> None:
    """What open_run would refuse, checked before a launcher starts the trainer (whose refusal a
    launcher such as torchrun buries under its own report): a log another run holds, and, for
    --resume of an unfinished run, a checkpoint that is not this run's. Refused, or None; nothing
    is changed (the trainer checks again: a run may start in between)."""
    import fcntl

    lock = _lock_path(log)
    if lock.exists():
        with contextlib.suppress(FileNotFoundError):
            fd = os.open(lock, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
                raise Refused(f"error: another run (pid {holder if holder.isdigit() else 'unknown'}) is writing "
                              f"{log} and its checkpoint: wait for it or stop it, or give this run another log "
                              "(--log)") from None
            finally:
                os.close(fd)
    if resume and not _finished_status(log):
        load(path, log)


def _prepare(log: Path, path: Path, resume: bool) -> dict | None:
    """Rank 0's part of open_run (see there)."""
    try:
        log.parent.mkdir(parents=True, exist_ok=True)
        _lock(log)
        finished = _finished_status(log)
        if resume and finished:
            raise Refused(f"the run in {log} already finished (run_stop: {finished}): nothing to resume, and its log "
                          "is kept as it is; leave out --resume to train a new run (the finished log is then "
                          "moved aside, not deleted)", code=0)
        _remove_temporaries(path)
        state = load(path, log) if resume else None
        if state is not None:
            with open(log, "r+b") as handle:
                handle.truncate(state["log_offset"])
            return state
        if resume:
            print(f"no checkpoint at {path}: the run starts from the beginning", flush=True)
        if finished:
            aside = _move_aside(log)
            print(f"the finished run's log {log} is kept as {aside.name}", flush=True)
        path.unlink(missing_ok=True)  # a previous run's: it must not resume into this one's log
        log.unlink(missing_ok=True)   # an unfinished run's, not continued (--resume continues it)
        return None
    except OSError as failure:
        raise Refused(f"error: cannot prepare {failure.filename or log} for the run: {failure.strerror or failure}"
                      f"{_free_text(log.parent)}: free space or fix the folder, then run again") from None


def load(path: Path, log: Path) -> dict | None:
    """The checkpoint at `path` (None where there is none), read as data only, and checked to be
    one this trainer wrote beside `log` for the run logged there. Refused: anything else."""
    import pickle

    import torch

    if not path.exists():
        return None
    try:
        with warnings.catch_warnings():  # e.g. torch on a pickle protocol it did not write: the refusal says it
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise Refused(f"error: checkpoint {path} is not only tensors and numbers (torch's weights-only reader "
                      "refused it), so this trainer did not write it, and loading it whole could run code: refused; "
                      "delete it to train the run from its start") from None
    except (OSError, RuntimeError, EOFError, ValueError) as failure:
        raise Refused(f"error: checkpoint {path} cannot be read ({_said(failure)}): delete it to train the run from "
                      "its start, or resume from a copy of it") from None
    wrong = [key for key, kind in FIELDS.items() if not isinstance(state, dict) or not isinstance(state.get(key), kind)]
    if wrong:
        raise Refused(f"error: checkpoint {path} is not one of this trainer's (no valid {', '.join(wrong)}): delete "
                      "it to train the run from its start")
    if min(state["epoch"], state["iteration"], state["log_offset"]) < 0:
        raise Refused(f"error: checkpoint {path} is not one of this trainer's (a negative epoch, iteration or log "
                      "length): delete it to train the run from its start")
    if _log_digest(log, state["log_offset"]) != state["log_digest"]:
        raise Refused(f"error: checkpoint {path} belongs to another run than the one in {log} (the log it was "
                      "written beside is not this one): resume with that run's log, or leave out --resume to "
                      "train a new run")
    return state


def save(path: Path, *, model, optimizer, scaler, epoch: int, iteration: int, seed: int, log: Path) -> None:
    """Write to a temporary name, then rename: a kill leaves the old checkpoint or the new one.
    A failed write (a full disk) is one warning: the run goes on, --resume has the previous one."""
    import torch

    offset = log.stat().st_size if log.exists() else 0
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "scaler": scaler.state_dict() if scaler is not None else None,
             "epoch": epoch, "iteration": iteration, "seed": seed,
             "log_offset": offset, "log_digest": _log_digest(log, offset)}
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        with open(tmp, "wb") as handle:  # a file object: its OSError stays visible behind torch's RuntimeError
            torch.save(state, handle)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as failure:
        cause = _os_error(failure)
        if cause is None:
            raise
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        previous = "continue from the previous checkpoint" if path.exists() else "train the run from its start"
        print(f"warning: checkpoint {path} not written after epoch {epoch} ({cause.strerror or cause}"
              f"{_free_text(path.parent)}): training goes on; --resume would {previous}",
              file=sys.stderr, flush=True)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def restore(state: dict, *, model, optimizer, scaler) -> tuple[int, int]:
    """Load a checkpoint's weights and optimizer; returns (first epoch to run, iteration)."""
    try:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
    except (RuntimeError, KeyError, ValueError, TypeError) as failure:
        raise SystemExit(f"error: the checkpoint does not fit this model ({_said(failure)}): "
                         "resume with the settings the run started with") from None
    return state["epoch"] + 1, state["iteration"]


def close_run(log: Path, path: Path) -> None:
    """After run_stop (rank 0): the checkpoint only serves --resume of an unfinished run (a finished
    one would leave hundreds of MB per run in the results folder); then the lock goes."""
    path.unlink(missing_ok=True)
    _unlock(log)


def _lock_path(log: Path) -> Path:
    return log.with_name(f".{log.name}.lock")


def _lock(log: Path) -> None:
    """Hold an exclusive flock on the log's lock file until close_run or the process ends, or be
    refused naming the pid that holds it (the behaviour of mlperf.files.exclusive_lock, which this
    package may not import). The kernel releases it however the process ends."""
    import fcntl

    lock = _lock_path(log)
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            os.close(fd)
            holder = holder if holder.isdigit() else "unknown"
            raise Refused(f"error: another run (pid {holder}) is writing {log} and its checkpoint: wait for it or "
                          "stop it, or give this run another log (--log)") from None
        try:
            same = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # a run that ended removed the file after this one opened it: lock the new one
    with contextlib.suppress(OSError):  # a full disk: the pid is for messages only, the lock holds
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _held[lock] = fd
    atexit.register(_unlock, log)


def _unlock(log: Path) -> None:
    """Remove the lock file while still holding it (a run that opened it meanwhile sees it gone and
    locks a new one: _lock), then release it. Also at exit, however rank 0 ends but a kill."""
    lock = _lock_path(log)
    fd = _held.pop(lock, None)
    if fd is not None:
        with contextlib.suppress(OSError):
            lock.unlink(missing_ok=True)
        os.close(fd)


def _finished_status(log: Path) -> str | None:
    """run_stop's status where the log's last record is run_stop (a finished run), else None."""
    if not log.is_file():
        return None
    with open(log, "rb") as handle:
        handle.seek(max(0, log.stat().st_size - TAIL_BYTES))
        tail = handle.read().decode("utf-8", "replace")
    records = [line.split(":::MLLOG ", 1)[1] for line in tail.splitlines() if ":::MLLOG " in line]
    try:
        last = json.loads(records[-1]) if records else None
    except ValueError:
        return None
    if not isinstance(last, dict) or last.get("key") != "run_stop":
        return None
    metadata = last.get("metadata")
    status = metadata.get("status") if isinstance(metadata, dict) else None
    return status if isinstance(status, str) and status.isidentifier() else "status unknown"


def _move_aside(log: Path) -> Path:
    """Rename a finished log to <log>.replaced-<time> (never over another file)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for n in range(1000):
        target = log.with_name(f"{log.name}.replaced-{stamp}" + (f"-{n}" if n else ""))
        if not target.exists():
            os.replace(log, target)
            return target
    raise Refused(f"error: {log} could not be moved aside (too many {log.name}.replaced-{stamp}* files): move it "
                  "yourself, then run again")


def _remove_temporaries(path: Path) -> None:
    """Temporaries of this checkpoint that a kill during a save left behind (the lock is held: no
    save of this checkpoint is under way)."""
    for leftover in path.parent.glob(f".{glob.escape(path.name)}.tmp-*"):
        leftover.unlink(missing_ok=True)


def _log_digest(log: Path, length: int) -> str:
    """sha256 of the log's first `length` bytes ('' where the log is shorter or missing)."""
    digest = hashlib.sha256()
    try:
        with open(log, "rb") as handle:
            while length > 0:
                block = handle.read(min(length, 1 << 20))
                if not block:
                    return ""
                digest.update(block)
                length -= len(block)
    except FileNotFoundError:
        return ""
    return digest.hexdigest()


def _os_error(failure: BaseException) -> OSError | None:
    """The OSError behind a failure: torch.save reports a failed write of its file as a RuntimeError
    whose context is the OSError."""
    seen = failure
    while seen is not None and not isinstance(seen, OSError):
        seen = seen.__cause__ or seen.__context__
    return seen


def _free_text(folder: Path) -> str:
    try:
        return f"; {shutil.disk_usage(folder).free / 2**20:.1f} MiB free in {folder}"
    except OSError:
        return ""


def _said(failure: BaseException) -> str:
    """An exception's first line, capped and printable (it may quote a damaged file)."""
    lines = str(failure).strip().splitlines() or [type(failure).__name__]
    text = "".join(c if c.isprintable() else "?" for c in lines[0])
    return text if len(text) <= 160 else text[:157] + "..."
