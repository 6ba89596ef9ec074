"""Shared fixtures: run the real entry points (`invoke ...`, `python -m ...`) in a sandbox folder."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


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


@pytest.fixture
def sandbox(tmp_path) -> dict:
    """Environment that points the project's data and results folders into tmp_path."""
    return {
        "INVOKE_MLPERF_DATA_DIR": str(tmp_path / "data"),
        "INVOKE_MLPERF_RESULTS_DIR": str(tmp_path / "results"),
    }
