"""A run's files against what a results folder may hold (issue 27): a hostile or foreign checkpoint
on --resume, a finished log, a second run on the same log, a full disk at checkpoint time, and the
temporaries a killed save left. Each through the entry points a user types: `invoke train`, and
`python -m object_detection.train` (what torchrun starts) where a refusal must be one line: under
`invoke train` the launcher checks the same before it starts torchrun, so it is one line there too.

The refusals happen before any training; the one real training run (two CPU epochs) is shared by
the tests of a new run over a finished log, the full disk and the leftover temporaries.
"""
from __future__ import annotations

import contextlib
import os
import pickle
import resource
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from conftest import ROOT, mllog, one_error_line, run_invoke
from tests.support.mllog_writer import write_log
from object_detection import checkpoint

NO_CLUSTER = {"BACKENDAI_CLUSTER_HOSTS": "", "BACKENDAI_CLUSTER_HOST": "", "BACKENDAI_CLUSTER_SIZE": ""}
DISK = 4 * 2**20  # room for the logs, not for the small model's checkpoint (about 100 MiB)


def trainer(tiny_shapes, log: Path, *extra: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m object_detection.train` with the arguments `invoke train` gives it for the tiny set."""
    root = tiny_shapes["data_dir"] / "tiny"
    args = ["-m", "object_detection.train", f"--data-root={root}", "--dataset=tiny", "--profile=shapes-cpu",
            "--per-gpu-batch=8", "--eval-batch=8", "--workers=1", f"--result-log={log}", "--num-classes=4",
            "--device=cpu", "--eval-images=2", "--seed=1", *extra]
    return subprocess.run([sys.executable, *args], cwd=ROOT, env={**os.environ, **NO_CLUSTER, "PYTHONUNBUFFERED": "1"},
                          capture_output=True, text=True, timeout=timeout)


def invoke_train(tiny_shapes, log: Path, *extra: str, **kw) -> subprocess.CompletedProcess:
    return run_invoke(["train", *tiny_shapes["args"], "--log", str(log), "--device", "cpu", "--seed", "1", *extra],
                      env=NO_CLUSTER, **kw)


def unfinished_log(path: Path, seed: int = 1) -> Path:
    """The log of a run killed in its second epoch (no run_stop)."""
    write_log(path, minutes=5, epochs=2, seed=seed, division="open")
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:-4]))
    return path


def real_checkpoint(path: Path, log: Path, epoch: int = 1) -> Path:
    """A checkpoint as the trainer writes it beside `log` (of a small stand-in model: what binds it
    to its run is not the model)."""
    model = torch.nn.Linear(2, 2)
    checkpoint.save(path, model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                    scaler=None, epoch=epoch, iteration=4, seed=1, log=log)
    assert path.is_file()
    return path


class RunsCode:
    """Unpickling this calls open(marker, 'w'): the marker file appears if the checkpoint's code runs."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


# -- 1: a hostile checkpoint is data, never code -----------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
def test_a_checkpoint_that_would_run_code_is_refused_in_one_line_and_runs_nothing(tiny_shapes, tmp_path, writer):
    log = unfinished_log(tmp_path / "result_0.txt")
    before = log.read_bytes()
    ckpt = tmp_path / "result_0.txt.ckpt"

    def hostile(path: Path, marker: Path) -> None:
        state = {"model": {}, "epoch": RunsCode(marker), "seed": 1}
        if writer == "torch.save":
            torch.save(state, path)
        else:  # a plain pickle (protocol 5: torch warns about it)
            path.write_bytes(pickle.dumps(state, protocol=5))

    hostile(ckpt, tmp_path / "ran")
    probe = tmp_path / "probe.ckpt"  # the same file, loaded the way the trainer did: its code runs
    hostile(probe, tmp_path / "ran-unsafely")
    with warnings.catch_warnings(), contextlib.suppress(RuntimeError):  # a plain pickle: run, then "bad magic"
        warnings.simplefilter("ignore")
        torch.load(probe, weights_only=False)
    assert (tmp_path / "ran-unsafely").exists()

    proc = trainer(tiny_shapes, log, "--resume")
    one_error_line(proc, f"checkpoint {ckpt} is not only tensors and numbers", "could run code: refused")
    assert not (tmp_path / "ran").exists()
    assert log.read_bytes() == before and ckpt.is_file()  # nothing cut, nothing deleted: the user looks

    proc = invoke_train(tiny_shapes, log, "--resume")  # as the user typed it: the launcher says it first
    one_error_line(proc, f"checkpoint {ckpt} is not only tensors and numbers", "could run code: refused")
    assert not (tmp_path / "ran").exists() and log.read_bytes() == before


# -- binding: a checkpoint resumes only the run it was written for -----------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("kind", ["another run's", "unbound"])
def test_a_checkpoint_of_another_run_is_refused_in_one_line(tiny_shapes, tmp_path, kind):
    other = unfinished_log(tmp_path / "other" / "result_0.txt", seed=7)
    log = unfinished_log(tmp_path / "result_0.txt", seed=1)  # another run: its own init_start, seed, ...
    ckpt = tmp_path / "result_0.txt.ckpt"
    if kind == "another run's":  # e.g. copied back from another results folder
        shutil.copy(real_checkpoint(other.with_name("result_0.txt.ckpt"), other), ckpt)
        expected = "belongs to another run"
    else:  # a checkpoint without the run's log digest (an older trainer's)
        state = torch.load(real_checkpoint(ckpt, log), weights_only=True)
        del state["log_digest"]
        torch.save(state, ckpt)
        expected = "is not one of this trainer's (no valid log_digest)"
    before = log.read_bytes()
    proc = trainer(tiny_shapes, log, "--resume")
    one_error_line(proc, f"checkpoint {ckpt} {expected}")
    assert log.read_bytes() == before and ckpt.is_file()


# -- 8: a new run removes the previous run's checkpoint ---------------------------------------------

@pytest.mark.slow
def test_a_new_run_that_dies_early_leaves_no_old_checkpoint_to_resume(tiny_shapes, tmp_path):
    log = unfinished_log(tmp_path / "result_0.txt")
    ckpt = real_checkpoint(tmp_path / "result_0.txt.ckpt", log)  # the killed run's, valid for its log
    # a new run (no --resume), seed 2, dies after run_start, before its first checkpoint
    proc = trainer(tiny_shapes, log, "--seed=2", "--train-annotations=missing.json")
    assert proc.returncode != 0 and "missing.json" in proc.stderr
    assert [e["value"] for e in mllog(log) if e["key"] == "seed"] == [2]
    assert not ckpt.exists()
    proc = trainer(tiny_shapes, log, "--resume", "--train-annotations=missing.json")
    assert "resuming after epoch" not in proc.stdout and f"no checkpoint at {ckpt}" in proc.stdout
    # and had the old checkpoint stayed (today's trainer), the binding refuses it
    other = unfinished_log(tmp_path / "old" / "result_0.txt")
    shutil.copy(real_checkpoint(other.with_name("result_0.txt.ckpt"), other), ckpt)
    one_error_line(trainer(tiny_shapes, log, "--resume"), "belongs to another run")


# -- 7: --resume of a finished run ------------------------------------------------------------------

@pytest.mark.slow
def test_resume_of_a_finished_run_keeps_its_log_and_has_nothing_to_do(tiny_shapes, tmp_path):
    log = write_log(tmp_path / "result_0.txt", minutes=5, epochs=2, status="success", division="open")
    before = log.read_bytes()
    proc = invoke_train(tiny_shapes, log, "--resume")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert f"the run in {log} already finished (run_stop: success): nothing to resume" in proc.stdout
    assert "Traceback" not in proc.stderr and "run_start" not in proc.stdout
    assert log.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result_0.txt"]


# -- 9: one run at a time on a log ------------------------------------------------------------------

@pytest.mark.slow
def test_a_second_run_on_a_log_in_use_is_refused_naming_the_pid(tiny_shapes, tmp_path):
    log = tmp_path / "result_0.txt"
    lock = tmp_path / ".result_0.txt.lock"
    with open(tmp_path / "first.out", "w") as out:
        first = subprocess.Popen([sys.executable, "-m", "invoke", "train", *tiny_shapes["args"], "--log", str(log),
                                  "--device", "cpu", "--seed", "1", "--max-epochs", "50"], cwd=ROOT,
                                 env={**os.environ, **NO_CLUSTER}, stdout=out, stderr=subprocess.STDOUT,
                                 start_new_session=True)
        try:
            deadline = time.monotonic() + 120
            while not (log.exists() and lock.exists() and lock.read_text().strip()) and time.monotonic() < deadline:
                assert first.poll() is None, (tmp_path / "first.out").read_text()
                time.sleep(0.2)
            holder = lock.read_text().strip()
            assert "object_detection.train" in Path(f"/proc/{holder}/cmdline").read_bytes().decode()

            proc = trainer(tiny_shapes, log)
            one_error_line(proc, f"another run (pid {holder}) is writing {log}")
            proc = invoke_train(tiny_shapes, log)  # the second `invoke train` of the issue
            one_error_line(proc, f"another run (pid {holder}) is writing {log}")
            assert first.poll() is None and log.exists()
            assert "init_start" in [e["key"] for e in mllog(log)]  # the first run's log, still written
        finally:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait()


# -- 12, the finished log a new run replaces, leftover temporaries: one real run --------------------

@contextlib.contextmanager
def small_disk(folder: Path):
    """`folder` on a tmpfs of DISK bytes where this process may mount one (root), else the run's
    files limited to DISK bytes (RLIMIT_FSIZE: a write past it fails with EFBIG; Python ignores
    SIGXFSZ). Yields (preexec_fn for the run, the strerror its checkpoint write gets)."""
    folder.mkdir()
    mounted = os.geteuid() == 0 and shutil.which("mount") and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={DISK}", "tmpfs", str(folder)], capture_output=True).returncode == 0
    try:
        if mounted:
            yield None, "No space left on device"
        else:
            yield lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (DISK, DISK)), "File too large"
    finally:
        if mounted:
            subprocess.run(["umount", str(folder)], check=True)


@pytest.fixture(scope="module")
def full_disk_run(tiny_shapes, tmp_path_factory):
    """`invoke train` of two epochs into a folder that holds a finished run's log and the temporaries
    of a save that a kill interrupted, on a disk too small for the checkpoint after epoch 1."""
    base = tmp_path_factory.mktemp("full-disk")
    folder = base / "results"
    with small_disk(folder) as (preexec, strerror):
        log = write_log(folder / "result_0.txt", minutes=5, epochs=2, status="aborted", division="open")
        finished = log.read_bytes()
        for leftover in (".result_0.txt.ckpt.tmp-4242-deadbeef", ".result_0.txt.ckpt.tmp-4243-0badf00d"):
            (folder / leftover).write_bytes(b"PK\x03\x04 cut off by a kill")
        (folder / ".result_1.txt.ckpt.tmp-4244-0000abcd").write_bytes(b"another log's")  # not this run's
        args = [sys.executable, "-m", "invoke", "train", *tiny_shapes["args"], "--log", str(log), "--device", "cpu",
                "--seed", "1", "--max-epochs", "2"]
        proc = subprocess.run(args, cwd=ROOT, env={**os.environ, **NO_CLUSTER, "PYTHONUNBUFFERED": "1"},
                              capture_output=True, text=True, timeout=600, preexec_fn=preexec)
        yield {"proc": proc, "log": log, "folder": folder, "finished": finished, "strerror": strerror,
               "files": sorted(p.name for p in folder.iterdir()),
               "aside": [p.read_bytes() for p in folder.glob("result_0.txt.replaced-*")]}


@pytest.mark.slow
def test_a_full_disk_at_checkpoint_time_is_one_warning_and_the_run_goes_on(full_disk_run):
    proc, log = full_disk_run["proc"], full_disk_run["log"]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stdout + proc.stderr
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning: checkpoint")]
    assert len(warnings) == 1, proc.stderr
    assert warnings[0].startswith(f"warning: checkpoint {log}.ckpt not written after epoch 1 "
                                  f"({full_disk_run['strerror']}; ")
    assert f"MiB free in {log.parent}): training goes on" in warnings[0]
    events = mllog(log)
    assert [e["metadata"]["epoch_num"] for e in events if e["key"] == "eval_accuracy"] == [1, 2]
    assert [e["key"] for e in events].count("run_stop") == 1
    assert not any(name.startswith(".result_0.txt.ckpt") for name in full_disk_run["files"])  # temporary removed


@pytest.mark.slow
def test_a_new_run_moves_a_finished_log_aside_and_removes_leftover_temporaries(full_disk_run):
    files = full_disk_run["files"]
    assert full_disk_run["aside"] == [full_disk_run["finished"]]  # the finished run's log, byte for byte
    assert [name for name in files if name.startswith("result_0.txt.replaced-")]
    assert "is kept as result_0.txt.replaced-" in full_disk_run["proc"].stdout
    # this checkpoint's temporaries went at the start; another log's are not this run's to remove;
    # no lock file, no checkpoint after the last epoch
    assert [name for name in files if name.startswith(".")] == [".result_1.txt.ckpt.tmp-4244-0000abcd"]
    assert len(files) == 3 and "result_0.txt" in files
