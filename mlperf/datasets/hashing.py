"""Digests of large files at memory speed and on every core: how archives are checksummed.

Its own module because fetch (a resumed `.part`, an archive on disk it has no record of, --source),
verify (every archive at once) and `invoke all` (what its steps were given) all hash files, and
hashing fast (a memory map, the longest file first across cores) is a job none of them owns.
"""
from __future__ import annotations

import hashlib
import mmap
import os
import threading
from pathlib import Path

HASH_STEP = 16 << 20         # bytes hashed between scheduling decisions (~30 ms of md5)


class _FileHash:
    """A file being hashed: its digest so far and where it got to, hashed a slice at a time."""

    def __init__(self, path: str | Path, algo: str):
        self.hasher = hashlib.new(algo)
        self.file = open(path, "rb", buffering=0)
        try:
            self.mapped = mmap.mmap(self.file.fileno(), 0, access=mmap.ACCESS_READ)
        except (ValueError, OSError):  # empty files, some special file systems: read() instead
            self.mapped = None
            self.buffer = bytearray(HASH_STEP)
        else:
            if hasattr(self.mapped, "madvise"):
                self.mapped.madvise(mmap.MADV_SEQUENTIAL)  # read ahead hard when it comes from disk
        self.size = os.fstat(self.file.fileno()).st_size
        self.offset = 0
        self.done = False

    @property
    def remaining(self) -> int:
        return self.size - self.offset

    def step(self) -> None:
        """Hash the next HASH_STEP bytes (hashlib releases the GIL meanwhile)."""
        if self.mapped is not None:
            with memoryview(self.mapped) as view:
                piece = view[self.offset:self.offset + HASH_STEP]
                self.hasher.update(piece)
                piece.release()
            self.offset = min(self.size, self.offset + HASH_STEP)
            self.done = self.offset >= self.size
        else:
            n = self.file.readinto(self.buffer)
            with memoryview(self.buffer) as view:
                self.hasher.update(view[:n])
            self.offset += n
            self.done = n == 0

    def close(self) -> None:
        if self.mapped is not None:
            self.mapped.close()
        self.file.close()


def hasher_of(path: str | Path, algo: str = "md5"):
    """The hashlib object after hashing a whole file, straight from a memory map of it (fetch keeps
    updating it when it resumes a download).

    Mapping skips the copy from the page cache into a buffer that read() makes: on 2 GiB this cut
    the kernel's CPU time from 1.3 s to 0.25 s (benchmarks/fetch_verify.py).
    """
    state = _FileHash(path, algo)
    try:
        while not state.done:
            state.step()
    finally:
        state.close()
    return state.hasher


def hash_file(path: str | Path, algo: str = "md5") -> str:
    """Hex digest of a file (see hasher_of)."""
    return hasher_of(path, algo).hexdigest()


def hash_files(jobs: list[tuple[Path, str]], workers: int | None = None) -> list[str]:
    """Digests of several (path, algo) pairs, on one thread per core.

    A file's hash is sequential, so a file cannot be split across cores, but it can be paused: each
    thread repeatedly takes the file with the most bytes left that nobody is hashing and hashes one
    slice of it. That is "longest remaining first", which finishes at max(total / cores, largest
    file): 1 GiB + 2 x 512 MiB ends with the 1 GiB, and three equal files share two cores instead
    of hashing two and then the third alone (1.5x slower, as a plain per-core pool does).
    Threads, not processes: hashlib releases the GIL, so threads scale and share the pause points.
    """
    if not jobs:
        return []
    states: list[_FileHash] = []
    try:
        for path, algo in jobs:
            states.append(_FileHash(path, algo))
    except BaseException:
        for s in states:
            s.close()
        raise
    busy: set[int] = set()
    lock = threading.Lock()
    failure: list[BaseException] = []

    def work() -> None:
        while not failure:
            with lock:
                idle = [i for i, s in enumerate(states) if not s.done and i not in busy]
                if not idle:
                    return
                i = max(idle, key=lambda k: states[k].remaining)
                busy.add(i)
            try:
                states[i].step()
            except BaseException as exc:  # an I/O error: stop every thread, raise it once
                failure.append(exc)
            finally:
                with lock:
                    busy.discard(i)

    workers = max(1, min(len(jobs), workers or os.cpu_count() or 1))
    try:
        threads = [threading.Thread(target=work, daemon=True) for _ in range(workers - 1)]
        for t in threads:
            t.start()
        work()
        for t in threads:
            t.join()
    finally:
        for s in states:
            s.close()
    if failure:
        raise failure[0]
    return [s.hasher.hexdigest() for s in states]
