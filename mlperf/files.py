"""Files the automation writes: one way to put a file or a folder in place, JSON, stat keys.

Every write that a reader could see half done goes to a hidden temporary name beside its target
and is renamed over it (`atomic_write`, `replace_tree`): a killed step leaves the old content or the
new, never a mix. `rename` is the one place a finished file or folder is moved into place.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
import shutil
from pathlib import Path

from mlperf.errors import UserError


class LockBusy(Exception):
    """Another process holds the lock; `holder` is the pid it wrote in the lock file ("unknown")."""

    def __init__(self, holder: str):
        super().__init__(holder)
        self.holder = holder


@contextlib.contextmanager
def exclusive_lock(path: Path):
    """Hold an exclusive flock on `path` (made if missing) while the block runs, or raise LockBusy
    at once. The kernel releases it however the process ends; the file, holding the pid, stays.
    OSError (a full disk, a read-only folder) is the caller's to explain."""
    import fcntl

    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LockBusy(os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown") from None
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError:  # a full disk: the pid is for messages only, the lock holds without it
            pass
        yield
    finally:
        os.close(fd)


def temporary_name(path: Path) -> Path:
    """A hidden, unique name beside `path` (same folder, so a rename never crosses file systems).
    Unique per writer, so two processes or threads writing one target never share a scratch file."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")


def rename(source: Path, target: Path) -> None:
    """Move a finished file or folder to `target` in one step (replacing a file there)."""
    os.replace(source, target)


def atomic_write(path: Path, data: str | bytes, mode: int | None = None) -> None:
    """Write `data` to `path` through a temporary name: readers see the old file or the new one.

    `mode`: the file's permission bits (default: as a new file gets them)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    try:
        with open(tmp, "wb" if isinstance(data, bytes) else "w") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())  # the data is on disk before the rename makes it the file
        if mode is not None:
            os.chmod(tmp, mode)
        rename(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path: Path, obj, *, indent: int | None = 1, sort_keys: bool = False) -> None:
    """`obj` as JSON in `path`, atomically, ending in a newline."""
    atomic_write(path, json.dumps(obj, indent=indent, sort_keys=sort_keys, default=str) + "\n")


def read_json(path: Path) -> dict:
    """A JSON object from `path`, or {} when it is missing, damaged or not an object (for caches
    and stamps, which are made again when unreadable)."""
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return {}
    return doc if isinstance(doc, dict) else {}


def stat_key(path: Path) -> list[int] | None:
    """[size, mtime_ns] of a file, the cheap fingerprint records are keyed by; None if missing."""
    try:
        st = Path(path).stat()
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


def human_size(n: float) -> str:
    """Bytes as a person reads them: 512 B, 1.5 KiB, 20.3 GiB."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def replace_tree(new: Path, target: Path) -> None:
    """Put the finished folder (or file) `new` at `target`, replacing what is there.

    A folder at `target` is moved aside first and removed after, so at every moment `target` is
    the old tree or the new one. A file or link where a folder now goes is removed first.
    """
    new, target = Path(new), Path(target)
    if target.is_dir() and not target.is_symlink():
        old = temporary_name(target)
        rename(target, old)
        rename(new, target)
        shutil.rmtree(old, ignore_errors=True)
        return
    if new.is_dir() and (target.exists() or target.is_symlink()):
        target.unlink()
    rename(new, target)


class UnsafeName(ValueError):
    """A name from a file, a log or a server that would not stay a plain name inside its folder."""


_BIDI_AND_CONTROL = {chr(c) for c in range(0x20)} | {"\x7f"} | set("\u200e\u200f\u202a\u202b\u202c\u202d\u202e"
                                                                   "\u2066\u2067\u2068\u2069")


def shown(value, limit: int = 80) -> str:
    """A value from outside for an error message: its type where it is not text or a number, else its
    text cut to `limit` characters with control and bidi characters escaped (repr of a shared YAML
    list can expand to gigabytes; a U+202E turns the rest of a terminal line around)."""
    if isinstance(value, bool) or value is None or isinstance(value, (int, float)):
        text = str(value) if not isinstance(value, int) or value.bit_length() < 200 else f"<a {value.bit_length()}-bit integer>"
        return text[:limit]
    if not isinstance(value, str):
        return f"<{type(value).__name__}>"
    cut = value[:limit]
    escaped = "".join(ch.encode("unicode_escape").decode("ascii") if ch in _BIDI_AND_CONTROL else ch for ch in cut)
    return repr(escaped + ("..." if len(value) > limit else ""))


def plain_name(name, what: str = "name") -> str:
    """`name` if it is one plain path component (no separator, not '.'/'..', no control or bidi
    characters, at most 255 bytes); else UnsafeName saying why."""
    if not isinstance(name, str) or not name:
        raise UnsafeName(f"{what} {shown(name)} is not a non-empty text")
    if "/" in name or "\\" in name or name in (".", "..") or "\x00" in name:
        raise UnsafeName(f"{what} {shown(name)} is not a plain file name (it has a path separator or is . or ..)")
    if any(ch in _BIDI_AND_CONTROL for ch in name):
        raise UnsafeName(f"{what} {shown(name)} has control or bidirectional-override characters")
    if len(name.encode("utf-8", "surrogateescape")) > 255:
        raise UnsafeName(f"{what} {shown(name)} is longer than a file name may be")
    return name


def inside(folder: Path, relative, what: str = "path") -> Path:
    """`folder / relative` for a relative path from outside (a listing, a log, a manifest): every
    component plain (see plain_name), and the result, with symbolic links resolved, still inside
    `folder`. The one check for every outside name that becomes a local path; UnsafeName otherwise."""
    if not isinstance(relative, str) or not relative:
        raise UnsafeName(f"{what} {shown(relative)} is not a non-empty text")
    if relative.startswith("/"):
        raise UnsafeName(f"{what} {shown(relative)} is absolute: it must be relative to {folder}")
    parts = [p for p in relative.split("/") if p not in ("", ".")]
    for part in parts:
        try:
            plain_name(part, "component")
        except UnsafeName as bad:
            raise UnsafeName(f"{what} {shown(relative)}: {bad}") from None
    if not parts:
        raise UnsafeName(f"{what} {shown(relative)} names no file")
    base = Path(folder).resolve()
    target = base.joinpath(*parts)
    resolved = target.resolve()
    if resolved != base and base not in resolved.parents:
        raise UnsafeName(f"{what} {shown(relative)} leads outside {folder} (through a symbolic link)")
    return target


@contextlib.contextmanager
def writing(flag: str, folder: Path):
    """A results or output folder that cannot be written (read-only, a full disk, a quota) as one
    line naming the file, why and the free space there, and the flag that chooses another folder.
    What was written before stays: every file here is put in place whole (mlperf.files)."""
    try:
        yield
    except OSError as exc:
        raise write_error(exc, flag, folder) from None


def write_error(exc: OSError, flag: str, folder: Path) -> UserError:
    """`folder`: where the writing happened, named when the error has no file (a write() that failed)."""

    path = Path(exc.filename) if isinstance(exc.filename, (str, Path)) else None
    if path is not None:  # a write through a temporary name (mlperf.files.temporary_name): name its target
        m = re.fullmatch(r"\.(.+)\.tmp-\d+-[0-9a-f]+", path.name)
        path = path.with_name(m.group(1)) if m else path
    where = f"cannot write {path}" if path is not None else f"cannot write in {folder}"
    free = _free(path if path is not None else Path(folder))
    free_text = f"; {human_size(free)} free there" if free is not None else ""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        todo = f"free some space there, or pass {flag} on a larger disk"
    else:
        todo = f"make the folder writable, or pass {flag} with one that is"
    return UserError(f"{where} ({exc.strerror or exc}{free_text}): {todo}; what was written before is kept")


def _free(path: Path | None) -> int | None:
    """Free bytes on the file system of `path` (its nearest existing folder), None if unknown."""
    while path is not None:
        try:
            return shutil.disk_usage(path).free
        except OSError:
            path = path.parent if path.parent != path else None
    return None
