"""The real Backend.AI client (`backend.ai` CLI and `ai.backend.common`) for tests, in its own venv.

The client packages pin one Python minor each (23.09 needs 3.11), and they bring aiohttp and friends
that the project itself must not depend on: so they live in .cache/backendai-client-<version>/, made
once (about 20 s from PyPI) and reused by later test sessions. Where it cannot be installed (no
network), the tests that need it skip and say why.
"""
from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CLIENT_VERSION = "23.9.10"      # the last release for Python 3.11, the Python these tests run on


def client_venv() -> Path:
    """The venv's folder, made if it is not there yet (one maker at a time: pytest-xdist safe)."""
    venv = ROOT / ".cache" / f"backendai-client-{CLIENT_VERSION}"
    ready = venv / ".ready"
    if ready.exists():
        return venv
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(venv.parent / f"{venv.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if ready.exists():
            return venv
        shutil.rmtree(venv, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q",
                              "--disable-pip-version-check", f"backend.ai-client=={CLIENT_VERSION}",
                              # yarl 1.17.1+ breaks the 23.9 client's request signing ('tuple' object has
                              # no attribute 'netloc'); fixed upstream in lablup/backend.ai#3544, after 23.9.10
                              "yarl<1.17.1"],
                             capture_output=True, text=True, timeout=900)
        if pip.returncode != 0:
            shutil.rmtree(venv, ignore_errors=True)
            lines = [ln for ln in pip.stderr.splitlines() if ln.strip() and "is ignored" not in ln]
            pytest.skip(f"backend.ai-client=={CLIENT_VERSION} does not install here: "
                        f"{lines[-1] if lines else 'pip failed'}")
        ready.touch()
    return venv


@pytest.fixture(scope="session")
def backendai_client() -> Path:
    """Path of the real `backend.ai` executable (its venv's bin/ also has that venv's python)."""
    venv = client_venv()
    exe = venv / "bin" / "backend.ai"
    assert os.access(exe, os.X_OK), f"{exe} missing after installing backend.ai-client"
    return exe
