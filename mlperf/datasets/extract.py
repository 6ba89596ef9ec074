"""Safe, all-or-nothing unpacking of zip and tar archives into a dataset folder.

Two guards, each enough on its own against an archive that tries to write outside the folder:
- Before anything is written, every entry is checked by name (`unsafe_reason`, `_check_entries`),
  with `./` and `//` removed first: an absolute path, a `..`, a link whose target climbs out or
  climbs after descending (`a/../b`, which a link named `a` would redirect), a name listed twice, an
  entry below a file or a link of the same archive, a device file, or a top-level name the tool
  keeps for itself (`downloads`, anything starting with `.`) refuses the whole archive.
- While writing, no entry is ever written through a link (`_Tree`): each folder on the way is
  opened relative to its parent's file descriptor with O_NOFOLLOW, and each file or link is
  created beside it with O_EXCL|O_NOFOLLOW, so a link made by an earlier entry cannot send a later
  one anywhere else, whatever the names say (and on case-insensitive disks too).
Tar members also pass Python's own 'data' filter. Everything is unpacked into a hidden temporary
folder beside the destination, checked against free space first (the entries' exact sizes), and
only then are its top-level entries renamed into place, so a killed or refused extraction leaves a
`.extract-*.tmp` folder (removed by the next run), never a half tree that looks complete.
"""
from __future__ import annotations

import errno
import lzma
import os
import shutil
import stat
import tarfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from mlperf.datasets import write_error
from mlperf.errors import UserError
from mlperf.files import human_size, replace_tree

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
COPY_BUFFER = 4 << 20
RESERVED_TOP = ("downloads",)   # and every name starting with "." (.verified.json, .extract-*)
MAX_LINK = 4096                 # bytes of a zip symlink's target; more is not a path
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | _CLOEXEC
_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | _CLOEXEC
_THROUGH_LINK = (errno.ELOOP, errno.ENOTDIR, errno.EEXIST, errno.EMLINK)


def is_supported(name: str) -> bool:
    return name.endswith(".zip") or name.endswith(TAR_SUFFIXES)


def parts_of(name: str) -> tuple[str, ...]:
    """An entry name as path components, with `.` and empty ones dropped: `a/./b//c` is a/b/c."""
    return tuple(p for p in name.split("/") if p not in ("", "."))


def unsafe_reason(name: str, link_target: str | None = None, hard_link: bool = False) -> str | None:
    """Why an archive entry may not be written (None when it is safe). Purely lexical, so testable.

    `link_target` is a symbolic link's target, relative to the entry's folder; a hard link's
    target (`hard_link=True`) is relative to the archive root, as tar stores it. A symbolic link
    may climb only with leading `..` and no higher than the archive root, and never climb after a
    name (`x/../y`): `x` might itself be a link, so only this form stays inside however links chain.
    """
    if not name or not parts_of(name):
        return "empty name"
    if "\0" in name:
        return "NUL in name"
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        return "absolute path"
    if "\\" in name:
        return "backslash in path"
    if ".." in name.split("/"):
        return "'..' in path"
    if link_target is None:
        return None
    if not link_target or "\0" in link_target or "\\" in link_target:
        return f"link to {link_target!r}: empty, or a NUL or backslash in it"
    if link_target.startswith("/") or (len(link_target) > 1 and link_target[1] == ":"):
        return f"link to absolute path {link_target!r}"
    target = parts_of(link_target)
    ups = next((i for i, p in enumerate(target) if p != ".."), len(target))
    if ".." in target[ups:]:
        return f"link to {link_target!r}: '..' after a folder name, which another link could redirect"
    if ups > (0 if hard_link else len(parts_of(name)) - 1):
        return f"link to {link_target!r}, outside the destination"
    return None


def _refuse(archive: Path, entry: str, reason: str) -> UserError:
    return UserError(f"refusing to extract {archive.name}: entry {entry!r} is unsafe ({reason}); "
                     "nothing was written. The archive is damaged or malicious: get it from a trusted source")


@dataclass(frozen=True)
class Entry:
    """One archive member as it will be written."""
    name: str                 # as the archive spells it (for messages)
    parts: tuple[str, ...]    # normalised path components
    kind: str                 # "file", "dir", "link" or "hardlink"
    target: str | None        # a link's target as stored (hard link: relative to the archive root)
    size: int                 # bytes of a file's content
    member: object            # the ZipInfo or TarInfo


def _entry(archive: Path, name: str, kind: str, target: str | None, size: int, member) -> Entry:
    reason = unsafe_reason(name, target, hard_link=kind == "hardlink")
    if reason:
        raise _refuse(archive, name, reason)
    return Entry(name, parts_of(name), kind, target, size, member)


def _zip_entries(zf: zipfile.ZipFile, archive: Path) -> list[Entry]:
    entries = []
    for info in zf.infolist():
        if info.flag_bits & 0x1:
            raise _refuse(archive, info.filename, "encrypted")
        target = None
        if stat.S_ISLNK(info.external_attr >> 16):
            if info.file_size > MAX_LINK:
                raise _refuse(archive, info.filename, "a link target longer than a path")
            target = zf.read(info).decode("utf-8", "replace")
        kind = "link" if target is not None else "dir" if info.is_dir() else "file"
        entries.append(_entry(archive, info.filename, kind, target, info.file_size if kind == "file" else 0,
                              info))
    return entries


def _tar_entries(tf: tarfile.TarFile, archive: Path) -> list[Entry]:
    entries = []
    for m in tf.getmembers():
        kind = ("dir" if m.isdir() else "file" if m.isreg() else "link" if m.issym()
                else "hardlink" if m.islnk() else None)
        if kind is None:
            raise _refuse(archive, m.name, "device, pipe or other special file")
        target = m.linkname if kind in ("link", "hardlink") else None
        entries.append(_entry(archive, m.name, kind, target, m.size if kind == "file" else 0, m))
    return entries


def _check_entries(archive: Path, entries: list[Entry]) -> None:
    """The checks across entries: reserved top-level names, duplicates, a file or link used as a
    folder, hard links to anything but an earlier file. All before a byte is written."""
    kinds: dict[tuple[str, ...], str] = {}
    for e in entries:
        top = e.parts[0]
        if top in RESERVED_TOP or top.startswith("."):
            raise _refuse(archive, e.name, f"'{top}' at the top is reserved for fetch's own files: "
                                           "downloads/ and names starting with '.'")
        if e.kind == "hardlink" and kinds.get(parts_of(e.target)) != "file":
            raise _refuse(archive, e.name, f"hard link to {e.target!r}, which is not an earlier file")
        if kinds.get(e.parts, "dir") != "dir" or (e.parts in kinds and e.kind != "dir"):
            raise _refuse(archive, e.name, "listed twice (names compared without './' and '//')")
        kinds[e.parts] = e.kind
    for e in entries:
        for n in range(1, len(e.parts)):
            kind = kinds.get(e.parts[:n], "dir")
            if kind != "dir":
                raise _refuse(archive, e.name, f"{'/'.join(e.parts[:n])!r} is a {kind} in the archive, "
                                               "not a folder")


class _Tree:
    """Writes entries below one folder without ever following a link (see the module's doc)."""

    def __init__(self, root: Path):
        self.root_fd = os.open(root, _DIR_FLAGS)
        self.cached: tuple[tuple[str, ...], int] | None = None  # the last folder written into

    def _open(self, parts: tuple[str, ...]) -> int:
        """A new descriptor of folder `parts`, made where missing; a link or file on the way raises."""
        fd = os.dup(self.root_fd)
        try:
            for part in parts:
                try:
                    os.mkdir(part, 0o777, dir_fd=fd)
                except FileExistsError:
                    pass
                fd, parent = os.open(part, _DIR_FLAGS, dir_fd=fd), fd
                os.close(parent)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def folder(self, parts: tuple[str, ...]) -> int:
        if self.cached is None or self.cached[0] != parts:
            fd = self._open(parts)
            if self.cached is not None:
                os.close(self.cached[1])
            self.cached = (parts, fd)
        return self.cached[1]

    def put(self, entry: Entry, open_member: Callable) -> None:
        if entry.kind == "dir":
            self.folder(entry.parts)
            return
        parent, leaf = self.folder(entry.parts[:-1]), entry.parts[-1]
        if entry.kind == "link":
            os.symlink(entry.target, leaf, dir_fd=parent)
        elif entry.kind == "hardlink":
            self._hard_link(parts_of(entry.target), parent, leaf)
        else:
            with open_member(entry.member) as src, \
                    os.fdopen(os.open(leaf, _FILE_FLAGS, 0o666, dir_fd=parent), "wb") as out:
                shutil.copyfileobj(src, out, COPY_BUFFER)

    def _hard_link(self, source: tuple[str, ...], parent: int, leaf: str) -> None:
        fd = self._open(source[:-1])
        try:
            if not stat.S_ISREG(os.stat(source[-1], dir_fd=fd, follow_symlinks=False).st_mode):
                raise OSError(errno.ELOOP, "hard link to something that is not a file")
            os.link(source[-1], leaf, src_dir_fd=fd, dst_dir_fd=parent, follow_symlinks=False)
        finally:
            os.close(fd)

    def close(self) -> None:
        if self.cached is not None:
            os.close(self.cached[1])
        os.close(self.root_fd)


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


def _check_room(archive: Path, dest: Path, entries: list[Entry]) -> None:
    """The exact unpacked size against free space, just before writing (the estimate made before
    the download may have been the archive's own size)."""
    need = sum(e.size for e in entries)
    free = shutil.disk_usage(dest).free
    if need > free:
        raise UserError(f"not enough free disk space in {dest} to unpack {archive.name}: need {human_size(need)}, "
                        f"free {human_size(free)}; free some space or pass --data-dir on a larger disk (the "
                        "archive is kept, checked, and unpacked by the next `invoke fetch`)")


def _unpack(archive: Path, dest: Path, tmp: Path, entries: list[Entry], open_member: Callable,
            claim: Callable | None, tar: bool) -> list[str]:
    _check_entries(archive, entries)
    names = sorted({e.parts[0] for e in entries})
    if claim is not None:
        claim(names)
    _check_room(archive, dest, entries)
    tmp.mkdir()
    tree = _Tree(tmp)
    data_filter = getattr(tarfile, "data_filter", None) if tar else None
    try:
        for e in entries:
            try:
                if data_filter is not None:
                    data_filter(e.member, str(tmp))   # Python's own check, on the tree as written so far
                tree.put(e, open_member)
            except tarfile.FilterError as exc:
                raise _refuse(archive, e.name, str(exc)) from None
            except OSError as exc:
                if exc.errno in _THROUGH_LINK:
                    raise _refuse(archive, e.name, "its path leads through a link or a file "
                                                   f"({exc.strerror})") from None
                if exc.errno == errno.ENAMETOOLONG:
                    raise _refuse(archive, e.name, "a name too long for this file system") from None
                raise
    finally:
        tree.close()
    for name in names:
        replace_tree(tmp / name, dest / name)
    return names


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


def extract(archive: Path, dest: Path, claim: Callable[[list[str]], None] | None = None) -> list[str]:
    """Unpack `archive` into `dest`; returns the top-level names it created or replaced.

    `claim(names)` is called with those names once every check passed, before anything is written,
    and may raise to refuse them (fetch: a name another archive of the dataset unpacked to).
    """
    if not is_supported(archive.name):
        raise UserError(f"cannot extract {archive.name}: only .zip and .tar(.gz/.bz2/.xz) archives are "
                        "supported; set `extract: false` for it in the manifest")
    dest.mkdir(parents=True, exist_ok=True)
    tmp = dest / f".extract-{archive.name}.tmp"
    _remove(tmp)  # left by a killed run: never part of the dataset
    try:
        if archive.name.endswith(".zip"):
            with zipfile.ZipFile(archive) as zf:
                return _unpack(archive, dest, tmp, _zip_entries(zf, archive), zf.open, claim, tar=False)
        with tarfile.open(archive) as tf:
            return _unpack(archive, dest, tmp, _tar_entries(tf, archive), tf.extractfile, claim, tar=True)
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error, lzma.LZMAError,
            NotImplementedError) as exc:
        raise UserError(f"{archive} is not a readable archive ({exc}): delete it and run "
                        "`invoke fetch` again") from None
    except OSError as exc:
        if exc.errno is None:  # gzip's BadGzipFile and the like: the archive, not the disk
            raise UserError(f"{archive} is not a readable archive ({exc}): delete it and run "
                            "`invoke fetch` again") from None
        raise write_error(exc, dest, f"unpacking {archive.name}",
                          "the archive is kept, checked, and unpacked by the next `invoke fetch`") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
