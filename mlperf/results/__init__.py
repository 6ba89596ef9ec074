"""MLPerf results: reading logs (logs), scoring a series (score), showing it (report), running and
keeping series of runs (series), packaging them (package), and the system description (system_desc)."""
from __future__ import annotations

import contextlib
import errno
import re
import shutil
from pathlib import Path

from mlperf.errors import UserError


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
    from mlperf.files import human_size

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
