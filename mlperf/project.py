"""What makes up the project: the files an image holds and whose hash decides a rebuild, and what is
never copied anywhere (data, results, environments, caches)."""
from __future__ import annotations

import fnmatch
import hashlib
import json
from pathlib import Path

from mlperf import PROJECT_ROOT

# What runs the benchmark: the image copies these, and their hash tells `invoke all` that the image
# context is out of date.
RUNTIME_FILES = ("tasks.py", "fabfile.py", "invoke.yaml", "README.md", "requirements.txt")
RUNTIME_DIRS = ("mlperf", "object_detection")
# Never part of a copy of the project (rsync filter syntax: a leading / anchors at the root, a
# trailing / matches folders only): data and results stay where they are made, environments are
# per host.
NOT_PROJECT = ("/data/", "/results/", "/build/", "/.venv/", "/venv/", "/.whl/", "/.cache/", "/image-context/",
               ".git/", "__pycache__/", "*.pyc", ".pytest_cache/", "*.egg-info/")


def _excluded(relative: Path) -> bool:
    """Whether a path (relative to the root) falls under NOT_PROJECT."""
    parts = relative.parts
    folders = parts[:-1]  # a file's path: every part but the last is a folder
    for pattern in NOT_PROJECT:
        name = pattern.strip("/")
        where = folders if pattern.endswith("/") else parts
        if pattern.startswith("/"):
            where = where[:1]
        if any(fnmatch.fnmatch(part, name) for part in where):
            return True
    return False


def runtime_files(root: Path = PROJECT_ROOT) -> list[Path]:
    """Every runtime file, relative to `root`, sorted."""
    found = [Path(name) for name in RUNTIME_FILES if (root / name).is_file()]
    for folder in RUNTIME_DIRS:
        found += [p.relative_to(root) for p in (root / folder).rglob("*") if p.is_file()]
    return sorted(p for p in found if not _excluded(p))


def missing_runtime(root: Path = PROJECT_ROOT) -> list[str]:
    return [name for name in (*RUNTIME_FILES, *RUNTIME_DIRS) if not (root / name).exists()]


def sources(root: Path = PROJECT_ROOT) -> dict[str, str]:
    """Every runtime file's sha256, by its path relative to `root`: what a result series records
    of the code that ran, so that a later package names the files that differ."""
    return {str(relative): hashlib.sha256((root / relative).read_bytes()).hexdigest()
            for relative in runtime_files(root)}


def sources_digest(root: Path = PROJECT_ROOT, files: dict[str, str] | None = None) -> str:
    """Hash of every runtime file's path and content (of `files`, a `sources` mapping, if given)."""
    digest = hashlib.sha256()
    for relative, sha in sorted((files if files is not None else sources(root)).items()):
        digest.update(json.dumps(relative).encode())
        digest.update(bytes.fromhex(sha))
    return digest.hexdigest()


def changed_sources(recorded: dict[str, str], root: Path = PROJECT_ROOT) -> list[str]:
    """The runtime files that differ from a `sources` record: changed, added or removed, sorted."""
    now = sources(root)
    return sorted(name for name in set(now) | set(recorded) if now.get(name) != recorded.get(name))
