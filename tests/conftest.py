"""Shared fixtures: run the real entry points (`invoke ...`, `python -m ...`) in a sandbox folder."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


SLOW_SECONDS = 5  # what a `slow` test takes unless its marker says: @pytest.mark.slow(seconds=N)


def idle_openmp_threads_sleep_under_xdist() -> None:
    """Under pytest-xdist, OpenMP threads with nothing to do sleep instead of spinning. Two workers on
    two cores, each running a CPU trainer at two threads (mlperf.planning gives a process its host's
    cores), spun on each other's cores: a training step took four times as long as at one thread each.
    With sleeping threads most of that loss goes, and a worker running alone still gets both cores. A
    value set outside wins."""
    if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # read when torch loads OpenMP: before any test


idle_openmp_threads_sleep_under_xdist()


def pytest_collection_modifyitems(config, items):
    """The modules whose slow tests take longest first, each module kept together: under
    pytest-xdist (.ci/run's -n 2) the long runs then start at once and the quick tests fill the
    workers' ends, instead of a pipeline run starting last and holding one worker alone (counting
    slow tests put the two-test pipeline module last: 650 s instead of about 570 on two cores);
    kept together, a module's fixtures are made once a worker."""
    weight: dict[str, float] = {}
    for item in items:
        marker = item.get_closest_marker("slow")
        seconds = marker.kwargs.get("seconds", SLOW_SECONDS) if marker is not None else 0
        weight[item.module.__name__] = weight.get(item.module.__name__, 0) + seconds
    items.sort(key=lambda item: -weight[item.module.__name__])  # stable: the order within a module stays


def run_invoke(args: list[str], *, env: dict | None = None, cwd: Path = ROOT, timeout: float = 600,
               check: bool = False) -> subprocess.CompletedProcess:
    """`invoke <args>` as a user types it, from the project root; output captured as text."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "invoke", *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"invoke {' '.join(args)} exited {proc.returncode}\n"
                             f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def mllog(path: Path) -> list[dict]:
    """The events of an MLPerf result log, in order (every :::MLLOG line must be JSON)."""
    return [json.loads(line.split(":::MLLOG ", 1)[1]) for line in path.read_text().splitlines()
            if ":::MLLOG " in line]


def one_error_line(proc, *fragments: str) -> str:
    """Exit 1 with stderr exactly one `error:` line (beside any `warning:` lines; no traceback
    anywhere), holding each fragment; returns that line. The promise every task makes about bad input."""
    lines = [line for line in proc.stderr.strip().splitlines() if not line.startswith("warning: ")]
    assert proc.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: "), (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stdout + proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def sandbox(tmp_path) -> dict:
    """Environment that points the project's data and results folders into tmp_path."""
    return {
        "INVOKE_MLPERF_DATA_DIR": str(tmp_path / "data"),
        "INVOKE_MLPERF_RESULTS_DIR": str(tmp_path / "results"),
    }


TINY_SHAPES_MANIFEST = """\
name: tiny
generator: shapes
generator_options: {train_images: 8, val_images: 2, image_size: 96, seed: 0}
categories: 3
splits:
  train: {images: train2017, annotations: annotations/instances_train2017.json, count: 8}
  val: {images: val2017, annotations: annotations/instances_val2017.json, count: 2}
files: []
"""


@pytest.fixture(scope="session")
def tiny_shapes(tmp_path_factory) -> dict:
    """The smallest shapes set a CPU training run needs (8 train, one CPU batch; 2 val images), made and verified
    once per session through `invoke fetch` and `invoke verify`. Keys: manifest, data_dir, args."""
    folder = tmp_path_factory.mktemp("tiny-shapes")
    manifest = folder / "tiny.yaml"
    manifest.write_text(TINY_SHAPES_MANIFEST)
    data_dir = folder / "data"
    args = ["--manifest", str(manifest), "--data-dir", str(data_dir)]
    run_invoke(["fetch", *args], check=True, timeout=120)
    run_invoke(["verify", *args], check=True, timeout=120)
    return {"manifest": manifest, "data_dir": data_dir, "args": args}
