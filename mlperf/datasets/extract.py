"""Safe, all-or-nothing unpacking of zip and tar archives into a dataset folder.

Every entry is checked before anything is written: an absolute path, a `..` component, a link that
points outside, or a device file refuses the whole archive. The archive is unpacked into a hidden
temporary folder beside the destination, and only then are its top-level entries renamed into
place, so a killed extraction leaves a `.extract-*.tmp` folder (removed by the next run), never a
half tree that looks complete.
"""
from __future__ import annotations

import os
import posixpath
import shutil
import stat
import tarfile
import zipfile
from pathlib import Path

from mlperf.errors import UserError
from mlperf.files import replace_tree

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
COPY_BUFFER = 4 << 20


def is_supported(name: str) -> bool:
    return name.endswith(".zip") or name.endswith(TAR_SUFFIXES)


def unsafe_reason(name: str, link_target: str | None = None, hard_link: bool = False) -> str | None:
    """Why an archive entry may not be written (None when it is safe). Purely lexical, so testable.

    `link_target` is a symbolic link's target, relative to the entry's folder; a hard link's
    target (`hard_link=True`) is relative to the archive root, as tar stores it.
    """
    if not name:
        return "empty name"
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        return "absolute path"
    if "\\" in name:
        return "backslash in path"
    if ".." in name.split("/"):
        return "'..' in path"
    if link_target is not None:
        if link_target.startswith("/") or (len(link_target) > 1 and link_target[1] == ":"):
            return f"link to absolute path {link_target!r}"
        base = "" if hard_link else posixpath.dirname(name.rstrip("/"))
        resolved = posixpath.normpath(posixpath.join(base, link_target))
        if resolved == ".." or resolved.startswith("../"):
            return f"link to {link_target!r}, outside the destination"
    return None


def _refuse(archive: Path, entry: str, reason: str) -> UserError:
    return UserError(f"refusing to extract {archive.name}: entry {entry!r} is unsafe ({reason}); "
                     "nothing was written. The archive is damaged or malicious: get it from a trusted source")


def _zip_members(zf: zipfile.ZipFile, archive: Path) -> list[tuple[zipfile.ZipInfo, str | None]]:
    members = []
    for info in zf.infolist():
        target = None
        if stat.S_ISLNK(info.external_attr >> 16):
            target = zf.read(info).decode("utf-8", "replace")
        reason = unsafe_reason(info.filename, target)
        if reason:
            raise _refuse(archive, info.filename, reason)
        members.append((info, target))
    return members


def _check_tar(tf: tarfile.TarFile, archive: Path) -> None:
    for m in tf.getmembers():
        if m.ischr() or m.isblk() or m.isfifo() or m.isdev():
            raise _refuse(archive, m.name, "device or pipe")
        target = m.linkname if (m.issym() or m.islnk()) else None
        reason = unsafe_reason(m.name, target, hard_link=m.islnk())
        if reason:
            raise _refuse(archive, m.name, reason)


def unpacked_size(archive: Path) -> int | None:
    """Bytes an archive unpacks to, from a zip's central directory (cheap); None if unknown."""
    if archive.name.endswith(".zip"):
        try:
            with zipfile.ZipFile(archive) as zf:
                return sum(i.file_size for i in zf.infolist())
        except (OSError, zipfile.BadZipFile):
            return None
    if archive.name.endswith(".tar"):
        try:
            with tarfile.open(archive) as tf:
                return sum(m.size for m in tf.getmembers())
        except (OSError, tarfile.TarError):
            return None
    return None


def _inside(root: str, path: str) -> bool:
    real = os.path.realpath(path)
    return real == root or real.startswith(root + os.sep)


def _unpack_zip(archive: Path, tmp: Path) -> None:
    real_tmp = os.path.realpath(tmp)
    with zipfile.ZipFile(archive) as zf:
        for info, link_target in _zip_members(zf, archive):
            dest = tmp / info.filename
            # Belt and braces: the parent, with any links already made, must resolve inside.
            if not _inside(real_tmp, str(dest.parent)):
                raise _refuse(archive, info.filename, "path leads outside through a link")
            if info.is_dir():
                dest.mkdir(parents=True, exist_ok=True)
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            if link_target is not None:
                os.symlink(link_target, dest)
                continue
            with zf.open(info) as src, open(dest, "wb") as out:
                shutil.copyfileobj(src, out, COPY_BUFFER)


def _unpack_tar(archive: Path, tmp: Path) -> None:
    with tarfile.open(archive) as tf:
        _check_tar(tf, archive)
        # The 'data' filter re-checks every member as it is written (Python 3.11.4+, 3.12).
        tf.extractall(tmp, filter="data")


def extract(archive: Path, dest: Path) -> list[str]:
    """Unpack `archive` into `dest`; returns the top-level names it created or replaced."""
    if not is_supported(archive.name):
        raise UserError(f"cannot extract {archive.name}: only .zip and .tar(.gz/.bz2/.xz) archives are "
                        "supported; set `extract: false` for it in the manifest")
    dest.mkdir(parents=True, exist_ok=True)
    tmp = dest / f".extract-{archive.name}.tmp"
    if tmp.exists():  # left by a killed run: never part of the dataset
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        try:
            if archive.name.endswith(".zip"):
                _unpack_zip(archive, tmp)
            else:
                _unpack_tar(archive, tmp)
        except (zipfile.BadZipFile, tarfile.TarError, EOFError) as exc:
            raise UserError(f"{archive} is not a readable archive ({exc}): delete it and run "
                            "`invoke fetch` again") from None
        names = sorted(os.listdir(tmp))
        for name in names:
            replace_tree(tmp / name, dest / name)
        return names
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
