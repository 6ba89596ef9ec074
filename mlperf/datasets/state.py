"""Fetch's state record: per archive, its checksum as last computed, the md5 its publisher gave,
and what it was unpacked to.

Its own module because fetch writes the record and verify and the launcher read it: shared, it is
neither command's. <root>/downloads/.state.json, written atomically, keeps per archive the size and
mtime it had when its checksum was last computed, and that checksum. A file whose size and mtime are
unchanged is not hashed again (unless `invoke verify --force`); fetch uses the same record to skip
finished downloads. Where the dataset folder is read-only (a shared vfolder), the record, and
verify's stamp, go to the user's cache instead (`cache_dir()`, keyed by the folder's real path) and
are read from there. A record that is damaged or of the wrong shape counts as missing: the file is
checked again, never trusted.
"""
from __future__ import annotations

import errno
import hashlib
import os
import threading
from pathlib import Path

from mlperf.datasets import Dataset, FileSpec, write_error
from mlperf.files import read_json, stat_key, write_json

STATE_NAME = ".state.json"
_state_lock = threading.Lock()


def cache_dir() -> Path:
    """The user's cache for this tool: $XDG_CACHE_HOME/mlperf-maskrcnn, else ~/.cache/mlperf-maskrcnn."""
    return Path(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")) / "mlperf-maskrcnn"


def elsewhere(ds: Dataset, data_dir: Path, name: str) -> Path:
    """Where a record of a dataset folder that cannot be written goes (a shared read-only vfolder):
    the user's cache, keyed by the folder's real path, so every mount of it finds the same record."""
    real = os.path.realpath(ds.root(data_dir))
    key = hashlib.sha256(real.encode("utf-8", "surrogateescape")).hexdigest()[:16]
    return cache_dir() / "datasets" / f"{ds.name}-{key}" / name


def state_path(ds: Dataset, data_dir: Path) -> Path:
    return ds.downloads(data_dir) / STATE_NAME


def _state_files(ds: Dataset, data_dir: Path) -> list[Path]:
    return [state_path(ds, data_dir), elsewhere(ds, data_dir, STATE_NAME)]


def _section(doc: dict, section: str) -> dict:
    """A section of a state file, {} when it is missing or of the wrong shape (a damaged file is
    not trusted, only re-checked)."""
    value = doc.get(section)
    return value if isinstance(value, dict) else {}


def _records(ds: Dataset, data_dir: Path, section: str, name: str) -> list[dict]:
    """The well-formed records of `name`, from the dataset's state file, then from the cache's."""
    found = [_section(read_json(path), section).get(name) for path in _state_files(ds, data_dir)]
    return [entry for entry in found if isinstance(entry, dict)]


def write_first(paths: list[Path], make_doc, what: str) -> Path:
    """Write JSON to the first of `paths` that can be written (`make_doc(path)` gives its content):
    the dataset folder, else, where it is read-only, the user's cache. Returns the one written."""
    for path in paths:
        try:
            write_json(path, make_doc(path), sort_keys=True)
            return path
        except OSError as exc:
            if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM) and path != paths[-1]:
                continue
            raise write_error(exc, path, what) from None
    raise AssertionError("no paths")


def known_digest(ds: Dataset, data_dir: Path, spec: FileSpec) -> str | None:
    """The digest recorded for this archive if it is unchanged (same size and mtime) since, else None."""
    key = stat_key(ds.downloads(data_dir) / spec.name)
    algo, _ = spec.checksum
    for entry in _records(ds, data_dir, "files", spec.name):
        if key is not None and entry.get("algo") == algo and entry.get("stat") == key \
                and isinstance(entry.get("digest"), str):
            return entry["digest"]
    return None


def _update_state(ds: Dataset, data_dir: Path, section: str, name: str, value: dict | None) -> None:
    """Read-modify-write one entry of the state file under a lock (downloads finish concurrently)."""
    def updated(path: Path) -> dict:
        doc = read_json(path)
        entries = doc[section] = _section(doc, section)
        if value is None:
            entries.pop(name, None)
        else:
            entries[name] = value
        return doc

    with _state_lock:
        write_first(_state_files(ds, data_dir), updated, "recording what was checked")


def with_published(ds: Dataset, data_dir: Path) -> Dataset:
    """`ds` with the md5 of every `md5_url` file that fetch has read from its publisher (state
    section "published", trusted only for the same URL); files whose md5 was not read yet keep
    none (their checksum is ("md5", None): nothing matches it)."""
    import dataclasses

    specs = []
    for spec in ds.files:
        if spec.md5_url and not spec.md5:
            for entry in _records(ds, data_dir, "published", spec.name):
                md5 = entry.get("md5")
                if entry.get("url") == spec.md5_url and isinstance(md5, str) and len(md5) == 32 \
                        and all(c in "0123456789abcdef" for c in md5):
                    spec = dataclasses.replace(spec, md5=md5)
                    break
        specs.append(spec)
    return dataclasses.replace(ds, files=tuple(specs))


def record_published(ds: Dataset, data_dir: Path, spec: FileSpec, md5: str) -> None:
    """Remember the md5 read from `spec.md5_url` (verify and train then need no network)."""
    _update_state(ds, data_dir, "published", spec.name, {"url": spec.md5_url, "md5": md5})


def record_digest(ds: Dataset, data_dir: Path, spec: FileSpec, digest: str) -> None:
    """Remember the digest of the archive as it is on disk now (keyed by its size and mtime)."""
    path = ds.downloads(data_dir) / spec.name
    _update_state(ds, data_dir, "files", spec.name,
                  {"algo": spec.checksum[0], "digest": digest, "stat": stat_key(path)})


def extracted_entries(ds: Dataset, data_dir: Path, spec: FileSpec, *, present: bool = True) -> list[str] | None:
    """Top-level names an archive was unpacked into, if that was this very archive and (`present`)
    they still exist."""
    root = ds.root(data_dir)
    for entry in _records(ds, data_dir, "extracted", spec.name):
        names = entry.get("entries")
        if entry.get("digest") != spec.checksum[1] or not isinstance(names, list) \
                or not all(isinstance(n, str) and n and "/" not in n and n not in (".", "..") for n in names):
            continue
        if not present or all((root / n).exists() or (root / n).is_symlink() for n in names):
            return names
    return None


def record_extracted(ds: Dataset, data_dir: Path, spec: FileSpec, entries: list[str]) -> None:
    """The extraction stamp: written only after the unpacked tree was renamed into place."""
    _update_state(ds, data_dir, "extracted", spec.name,
                  {"digest": spec.checksum[1], "entries": sorted(entries)})
