"""Clearing the page cache that holds the dataset before each run, as MLPerf's `cache_clear`
record says was done (NVIDIA's run scripts: `sync && sysctl vm.drop_caches=3`).

Where /proc/sys/vm/drop_caches is writable (root on a host), the whole cache is dropped. In a
container (a Backend.AI session: /proc/sys is read-only, no privilege) the dataset's own files are
evicted instead with posix_fadvise(POSIX_FADV_DONTNEED), which needs no privilege: what the next
run reads of them then comes from the disk, as it would on a cold machine.

`python -m mlperf.pagecache FOLDER...` does it on a host of a multi-node run before torchrun starts.
"""
from __future__ import annotations

import errno
import os
import sys
from pathlib import Path

DROP_CACHES = Path("/proc/sys/vm/drop_caches")


def method() -> str:
    """How `clear` will do it on this host: "drop_caches" or "fadvise"."""
    return "drop_caches" if os.access(DROP_CACHES, os.W_OK) else "fadvise"


def clear(folders: list[Path]) -> str:
    """Write back dirty pages, then drop the page cache or evict every file under `folders` (links
    not followed). Returns the method used. OSError where a folder cannot be walked."""
    for folder in folders:
        if not Path(folder).is_dir():
            raise FileNotFoundError(errno.ENOENT, "no such folder", str(folder))
    os.sync()
    if method() == "drop_caches":
        try:
            DROP_CACHES.write_text("3\n")
            return "drop_caches"
        except OSError:  # writable by mode, refused by the kernel (a user namespace): evict instead
            pass
    for folder in folders:
        _evict_tree(Path(folder))
    return "fadvise"


def _evict_tree(folder: Path) -> None:
    def fail(error: OSError):
        raise error

    for directory, _, names in os.walk(folder, onerror=fail):
        for name in names:
            try:
                fd = os.open(os.path.join(directory, name), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
            except OSError:  # a link, a socket, a file gone since the walk: nothing cached to drop
                continue
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: python -m mlperf.pagecache FOLDER...", file=sys.stderr)
        return 2
    try:
        clear([Path(a) for a in argv])
    except OSError as error:
        print(f"error: could not clear the page cache of {error.filename or argv[0]}: {error.strerror}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
