"""mlperf.files: a write killed at any moment leaves the old content or the new, never a mix."""
from __future__ import annotations

import random
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT
from mlperf.files import atomic_write, read_json, replace_tree, write_json

KILLED_BEFORE_RENAME = """
import os, signal, sys
from pathlib import Path
from mlperf import files
files.rename = lambda source, target: os.kill(os.getpid(), signal.SIGKILL)  # dies after the write
files.atomic_write(Path(sys.argv[1]), "new content " * 100000)
"""

WRITES_FOREVER = """
import sys
from pathlib import Path
from mlperf.files import atomic_write
target, n = Path(sys.argv[1]), 0
print("ready", flush=True)
while True:
    atomic_write(target, ("ab"[n % 2]) * 2_000_000)
    n += 1
"""


def test_a_writer_killed_between_write_and_rename_leaves_the_old_content(tmp_path):
    target = tmp_path / "state.json"
    atomic_write(target, "old content")
    proc = subprocess.run([sys.executable, "-c", KILLED_BEFORE_RENAME, str(target)], cwd=ROOT)
    assert proc.returncode == -signal.SIGKILL
    assert target.read_text() == "old content"
    leftovers = [p.name for p in tmp_path.iterdir() if p != target]
    assert len(leftovers) == 1 and leftovers[0].startswith(".state.json.tmp-")  # hidden, never the name


@pytest.mark.slow
def test_writers_killed_at_random_moments_never_leave_a_torn_file(tmp_path):
    target = tmp_path / "big.txt"
    atomic_write(target, "a" * 2_000_000)
    rng = random.Random(0)
    for _ in range(6):
        proc = subprocess.Popen([sys.executable, "-c", WRITES_FOREVER, str(target)], cwd=ROOT,
                                stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.05, 0.4))
        proc.kill()
        proc.wait()
        proc.stdout.close()
        content = target.read_text()
        assert content in ("a" * 2_000_000, "b" * 2_000_000)


def test_json_round_trip_and_damaged_files_read_as_empty(tmp_path):
    write_json(tmp_path / "x.json", {"b": 1, "a": [1, 2]}, sort_keys=True)
    assert read_json(tmp_path / "x.json") == {"a": [1, 2], "b": 1}
    (tmp_path / "bad.json").write_bytes(b"\xff{not json")
    (tmp_path / "list.json").write_text("[1, 2]")
    assert read_json(tmp_path / "bad.json") == {} and read_json(tmp_path / "list.json") == {}
    assert read_json(tmp_path / "missing.json") == {}


def test_replace_tree_swaps_a_folder_for_a_folder_and_a_file_for_a_folder(tmp_path):
    old, new = tmp_path / "data", tmp_path / "new"
    (old / "sub").mkdir(parents=True)
    (old / "sub" / "old.txt").write_text("old")
    (new / "sub").mkdir(parents=True)
    (new / "sub" / "new.txt").write_text("new")
    replace_tree(new, old)
    assert [p.name for p in (old / "sub").iterdir()] == ["new.txt"] and not new.exists()
    (tmp_path / "f").write_text("a file")
    (tmp_path / "g").mkdir()
    replace_tree(tmp_path / "g", tmp_path / "f")
    assert (tmp_path / "f").is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "f"]  # nothing set aside is left
