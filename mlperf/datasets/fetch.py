"""`invoke fetch`: resumable, parallel, checksummed downloads and safe extraction of a dataset.

Per file: stream into `<name>.part` while hashing the bytes as they arrive (no second pass), rename
to `<name>` only when the checksum matches, then unpack it (mlperf.datasets.extract) if the manifest says so.
Finished work is recorded in the state file shared with `invoke verify` (mlperf.datasets.verify), keyed by
size and mtime, so a second run neither transfers, hashes nor extracts anything.
"""
from __future__ import annotations

import hashlib
import os
import queue
import random
import shutil
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from mlperf.datasets import Dataset, FileSpec
from mlperf.datasets import extract as extracting
from mlperf.datasets.verify import (READ_SIZE, extracted_entries, hash_file, hasher_of, known_digest,
                                    record_digest, record_extracted)
from mlperf.errors import UserError
from mlperf.files import human_size, rename

CHUNK = 1 << 20                  # bytes per read from the socket
CONNECT_TIMEOUT = 15             # seconds
READ_TIMEOUT = 60                # seconds without a byte before the attempt counts as failed
PROGRESS_INTERVAL = 10.0         # seconds between plain progress lines when output is not a terminal
_stop = threading.Event()        # set on Ctrl-C so worker threads end their transfers
PERMANENT = {"name or service not known", "nodename nor servname provided, or not known"}


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded exponential backoff: attempt n waits min(cap, base * 2**(n-1)), jittered to 50-100%.

    MLPERF_FETCH_RETRIES and MLPERF_FETCH_BACKOFF (base seconds) override the defaults, e.g. for
    a flaky link (more retries) or for tests (short waits).
    """
    retries: int = 6
    base: float = 1.0
    cap: float = 30.0

    @classmethod
    def from_env(cls) -> RetryPolicy:
        try:
            return cls(retries=int(os.environ.get("MLPERF_FETCH_RETRIES", cls.retries)),
                       base=float(os.environ.get("MLPERF_FETCH_BACKOFF", cls.base)))
        except ValueError:
            raise UserError("MLPERF_FETCH_RETRIES must be a whole number and MLPERF_FETCH_BACKOFF "
                            "a number of seconds") from None

    def delay(self, attempt: int, rng=random.random) -> float:
        full = min(self.cap, self.base * 2 ** max(0, attempt - 1))
        return full * (0.5 + 0.5 * rng())


def _duration(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class Progress:
    """A bar per file and one in total (bytes, rate, ETA) on a terminal; plain lines otherwise."""

    def __init__(self, total: int, jobs: int, stream=None):
        self.stream = stream or sys.stderr
        self.interactive = self.stream.isatty()
        self.lock = threading.Lock()
        self.total = total
        self.done = 0
        self.started = time.monotonic()
        self.last_line = self.started
        self.files: dict[str, list] = {}           # name -> [done, size, tqdm bar or None]
        self.free_slots = list(range(jobs, 0, -1))
        self.total_bar = None
        if self.interactive:
            from tqdm import tqdm

            self.tqdm = tqdm
            self.total_bar = tqdm(total=total or None, desc="total", unit="B", unit_scale=True,
                                  unit_divisor=1024, position=0, file=self.stream, dynamic_ncols=True)

    def log(self, message: str) -> None:
        with self.lock:
            if self.interactive:
                self.tqdm.write(message, file=self.stream)
            else:
                print(message, flush=True)

    def begin(self, name: str, size: int | None) -> None:
        with self.lock:
            bar = None
            if self.interactive:
                slot = self.free_slots.pop() if self.free_slots else len(self.files) + 1
                bar = self.tqdm(total=size, desc=name, unit="B", unit_scale=True, unit_divisor=1024,
                                position=slot, leave=False, file=self.stream, dynamic_ncols=True)
                bar.slot = slot
            self.files[name] = [0, size, bar]

    def set_size(self, name: str, size: int) -> None:
        """A size learned from the server (the manifest had none)."""
        with self.lock:
            entry = self.files[name]
            if entry[1] is None:
                entry[1] = size
                self.total += size
                if entry[2] is not None:
                    entry[2].total = size
                    self.total_bar.total = self.total

    def advance(self, name: str, n: int) -> None:
        """Count n more bytes of `name` (negative when a transfer starts over)."""
        with self.lock:
            entry = self.files[name]
            entry[0] += n
            self.done += n
            if self.interactive:
                entry[2].update(n)
                self.total_bar.update(n)
                return
            now = time.monotonic()
            if now - self.last_line >= PROGRESS_INTERVAL:
                self.last_line = now
                print(self._line(now), flush=True)

    def _line(self, now: float) -> str:
        rate = self.done / max(now - self.started, 1e-6)
        pct = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        eta = f", ETA {_duration((self.total - self.done) / rate)}" if self.total and rate > 0 else ""
        running = ", ".join(f"{n} {100 * d / s:.0f}%" if s else f"{n} {human_size(d)}"
                            for n, (d, s, _) in self.files.items())
        return (f"fetch: {human_size(self.done)} of {human_size(self.total)}{pct} at {human_size(rate)}/s{eta}"
                + (f" [{running}]" if running else ""))

    def end(self, name: str) -> None:
        with self.lock:
            entry = self.files.pop(name)
            if entry[2] is not None:
                self.free_slots.append(entry[2].slot)
                entry[2].close()

    def close(self) -> None:
        if self.total_bar is not None:
            self.total_bar.close()


class _Transient(Exception):
    """A failure worth retrying: a 5xx, a short body."""


class _BackgroundHash:
    """Hash chunks on a second thread, so receiving and hashing overlap on two cores."""

    def __init__(self, hasher):
        self.hasher = hasher
        self.chunks: queue.Queue = queue.Queue(maxsize=16)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (chunk := self.chunks.get()) is not None:
            self.hasher.update(chunk)

    def update(self, chunk: bytes) -> None:
        self.chunks.put(chunk)

    def finish(self) -> None:
        self.chunks.put(None)
        self.thread.join()


class _Download:
    """One file from one URL into `<name>.part`, resumed and retried; returns the digest."""

    def __init__(self, spec: FileSpec, url: str, part: Path, progress: Progress, policy: RetryPolicy):
        self.spec, self.url, self.part, self.progress, self.policy = spec, url, part, progress, policy
        self.algo = spec.checksum[0]
        self.hasher = hashlib.new(self.algo)
        self.offset = 0

    def _restart(self) -> None:
        self.progress.advance(self.spec.name, -self.offset)
        self.part.unlink(missing_ok=True)
        self.hasher = hashlib.new(self.algo)
        self.offset = 0

    def _resume_existing(self) -> None:
        """Continue from a `.part` a previous run left: hash the bytes it holds once."""
        if not self.part.is_file():
            return
        size = self.part.stat().st_size
        if self.spec.size is not None and size > self.spec.size:
            self.part.unlink()
            return
        self.hasher = hasher_of(self.part, self.algo)
        self.offset = size
        self.progress.advance(self.spec.name, size)
        self.progress.log(f"fetch: {self.spec.name}: resuming at {human_size(size)}")

    def run(self) -> str:
        import requests
        import urllib3

        self._resume_existing()
        failures = 0
        with requests.Session() as session:
            while True:
                start = self.offset
                try:
                    return self._attempt(session)
                except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError,
                        urllib3.exceptions.HTTPError, _Transient) as exc:  # urllib3's: from raw reads
                    if _stop.is_set():
                        raise
                    if _reason(exc) in PERMANENT:  # waiting will not make an unknown host known
                        raise UserError(f"cannot download {self.spec.name} from {self.url}: "
                                        f"{_reason(exc)}: check the URL or --mirror") from None
                    failures = 1 if self.offset > start else failures + 1  # progress resets the count
                    if failures > self.policy.retries:
                        raise UserError(
                            f"cannot download {self.spec.name} from {self.url}: {_reason(exc)} "
                            f"({failures} attempts): check the URL and the network, or use --mirror "
                            "or --source") from None
                    wait = self.policy.delay(failures)
                    self.progress.log(f"fetch: {self.spec.name}: {_reason(exc)}; retry {failures} of "
                                      f"{self.policy.retries} in {wait:.1f}s")
                    time.sleep(wait)

    def _attempt(self, session) -> str:
        headers = {"Accept-Encoding": "identity"}  # the checksum is of the file's own bytes
        if self.offset:
            headers["Range"] = f"bytes={self.offset}-"
        with session.get(self.url, headers=headers, stream=True,
                         timeout=(CONNECT_TIMEOUT, READ_TIMEOUT)) as resp:
            code = resp.status_code
            if code in (408, 429) or code >= 500:
                raise _Transient(f"HTTP {code} {resp.reason}")
            if code == 416 and self.offset and self.offset == self.spec.size:
                return self.hasher.hexdigest()        # the .part was already complete
            if code == 206 and self.offset and _range_start(resp) == self.offset:
                mode = "ab"
            elif code in (200, 206, 416):
                if self.offset:
                    self.progress.log(f"fetch: {self.spec.name}: server did not resume "
                                      f"(HTTP {code}); starting over")
                    self._restart()
                    if code != 200:
                        raise _Transient(f"HTTP {code} to a range request")
                mode = "wb"
            else:
                raise UserError(f"cannot download {self.spec.name} from {self.url}: HTTP {code} "
                                f"{resp.reason}: check the URL (or --mirror)")
            length = resp.headers.get("Content-Length")
            if self.spec.size is None and length and length.isdigit():
                self.progress.set_size(self.spec.name, self.offset + int(length))
            expected_end = self.offset + int(length) if length and length.isdigit() else self.spec.size
            self._stream(resp, mode)
        if expected_end is not None and self.offset < expected_end:
            raise _Transient(f"connection closed after {human_size(self.offset)}")
        return self.hasher.hexdigest()

    def _stream(self, resp, mode: str) -> None:
        background = _BackgroundHash(self.hasher)
        try:
            with open(self.part, mode) as fh:
                # read1 hands over what has arrived (up to CHUNK): a dropped connection loses nothing
                # already received, unlike iter_content, which discards a partly filled chunk.
                while chunk := resp.raw.read1(CHUNK, decode_content=False):
                    if _stop.is_set():
                        raise KeyboardInterrupt
                    fh.write(chunk)
                    background.update(chunk)
                    self.offset += len(chunk)
                    self.progress.advance(self.spec.name, len(chunk))
        finally:
            background.finish()  # hasher and .part hold the same bytes, even after a failure


def _range_start(resp) -> int | None:
    value = resp.headers.get("Content-Range", "")  # "bytes START-END/TOTAL"
    try:
        return int(value.split()[1].split("-")[0])
    except (IndexError, ValueError):
        return None


def _reason(exc: BaseException) -> str:
    """A short, one-line reason from requests' long nested exception texts."""
    import requests
    import urllib3

    if isinstance(exc, (requests.Timeout, urllib3.exceptions.TimeoutError)):
        return "timed out"
    if isinstance(exc, (requests.exceptions.ChunkedEncodingError, urllib3.exceptions.ProtocolError)):
        return "connection broken mid-transfer"
    if isinstance(exc, requests.ConnectionError):
        text = str(exc)
        for known in ("Connection refused", "Name or service not known", "No route to host",
                      "nodename nor servname provided, or not known",
                      "Temporary failure in name resolution", "Connection reset",
                      "Remote end closed connection", "Network is unreachable"):
            if known in text:
                return known.lower()
        return "connection failed"
    return str(exc).splitlines()[0][:200]


@dataclass
class _Task:
    spec: FileSpec
    have: bool           # the archive is in downloads/ with the right checksum
    extract: bool        # it still needs unpacking


class _Fetcher:
    def __init__(self, ds: Dataset, data_dir: Path, mirror: str | None, source: Path | None,
                 progress: Progress):
        self.ds, self.data_dir, self.mirror, self.source, self.progress = ds, data_dir, mirror, source, progress
        self.downloads = ds.downloads(data_dir)
        self.policy = RetryPolicy.from_env()

    def url(self, spec: FileSpec) -> str:
        return f"{self.mirror.rstrip('/')}/{spec.name}" if self.mirror else spec.url

    def run(self, task: _Task) -> None:
        spec = task.spec
        if not task.have:
            final = self.downloads / spec.name
            self.progress.begin(spec.name, spec.size)
            try:
                if self.source is not None:
                    self._from_source(spec, final)
                else:
                    self._download(spec, final)
            finally:
                self.progress.end(spec.name)
        if task.extract:
            self.progress.log(f"fetch: {spec.name}: extracting into {self.ds.root(self.data_dir)}")
            entries = extracting.extract(self.downloads / spec.name, self.ds.root(self.data_dir))
            record_extracted(self.ds, self.data_dir, spec, entries)
            self.progress.log(f"fetch: {spec.name}: extracted {', '.join(entries) or 'nothing'}")

    def _download(self, spec: FileSpec, final: Path) -> None:
        url = self.url(spec)
        part = final.with_name(final.name + ".part")
        algo, expected = spec.checksum
        for attempt in (1, 2):
            digest = _Download(spec, url, part, self.progress, self.policy).run()
            if digest == expected:
                self._commit(spec, part, final, digest)
                self.progress.log(f"fetch: {spec.name}: done, {algo} ok")
                return
            self.progress.advance(spec.name, -part.stat().st_size)
            part.unlink()
            if attempt == 1:
                self.progress.log(f"fetch: {spec.name}: {algo} {digest} is not the expected {expected}; "
                                  "downloading it once more")
        raise UserError(f"{spec.name}: {algo} mismatch after two downloads from {url}: expected "
                        f"{expected}, got {digest}; the server's file or the manifest is wrong")

    def _from_source(self, spec: FileSpec, final: Path) -> None:
        """Hard-link (else copy) an archive the user has, and check it like a download."""
        src = self.source / spec.name
        if not src.is_file():
            raise UserError(f"{spec.name} is not in --source {self.source}: put it there, or leave out "
                            "--source to download it")
        part = final.with_name(final.name + ".part")
        part.unlink(missing_ok=True)
        algo, expected = spec.checksum
        try:
            os.link(src, part)
            digest = hash_file(part, algo)
            how = "linked"
        except OSError:  # another file system, or links not allowed: copy, hashing on the way
            hasher = hashlib.new(algo)
            with open(src, "rb") as fin, open(part, "wb") as fout:
                while block := fin.read(READ_SIZE):
                    fout.write(block)
                    hasher.update(block)
            digest = hasher.hexdigest()
            how = "copied"
        self.progress.advance(spec.name, part.stat().st_size)
        if digest != expected:
            part.unlink()
            raise UserError(f"{src}: {algo} is {digest}, expected {expected}: it is not the file the "
                            "manifest names (damaged or another version)")
        self._commit(spec, part, final, digest)
        self.progress.log(f"fetch: {spec.name}: {how} from {self.source}, {algo} ok")

    def _commit(self, spec: FileSpec, part: Path, final: Path, digest: str) -> None:
        """A `.part` whose checksum matched becomes the archive, and is recorded as checked."""
        rename(part, final)
        record_digest(self.ds, self.data_dir, spec, digest)


def _ensure_writable(folder: Path, data_dir: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"data dir {data_dir} is not writable ({exc.strerror or exc}): pass --data-dir "
                        "with a folder you can write to") from None


def _plan(ds: Dataset, data_dir: Path, *, hash_unknown: bool = True) -> list[_Task]:
    """What is left to do: files not yet fetched and checked, archives not yet unpacked.

    An archive on disk that the state file does not know is hashed once (`hash_unknown`), or, for
    an estimate that reads nothing (doctor), taken as fetched when its size is the manifest's.
    """
    tasks = []
    for spec in ds.files:
        final = ds.downloads(data_dir) / spec.name
        algo, expected = spec.checksum
        if spec.extract and not final.exists() and extracted_entries(ds, data_dir, spec) is not None:
            continue  # unpacked after its checksum matched, then deleted to save space: done
        digest = known_digest(ds, data_dir, spec)
        if digest is None and final.is_file() and hash_unknown:  # there, but not recorded: hash once
            digest = hash_file(final, algo)
            record_digest(ds, data_dir, spec, digest)
        have = digest == expected or (digest is None and not hash_unknown and final.is_file()
                                      and final.stat().st_size == spec.size)
        needs_extract = spec.extract and (not have or extracted_entries(ds, data_dir, spec) is None)
        if not have or needs_extract:
            tasks.append(_Task(spec, have, needs_extract))
    return tasks


def space_needed(ds: Dataset, data_dir: Path, tasks: list[_Task] | None = None) -> tuple[int, int]:
    """(bytes still to download, bytes still to unpack) for `tasks` (default: an estimate of the
    plan that hashes nothing). A `.part` counts as downloaded as far as it goes; an archive unpacks
    to its zip directory's total where it is here, else to about its own size."""
    download = unpack = 0
    for task in _plan(ds, data_dir, hash_unknown=False) if tasks is None else tasks:
        spec = task.spec
        final = ds.downloads(data_dir) / spec.name
        if not task.have:
            part = final.with_name(final.name + ".part")
            have = part.stat().st_size if part.is_file() else 0
            download += max(0, (spec.size or 0) - have)
        if task.extract:
            exact = extracting.unpacked_size(final) if task.have else None
            unpack += exact if exact is not None else (spec.size or 0)  # the archive size as an estimate
    return download, unpack


def _check_space(ds: Dataset, data_dir: Path, tasks: list[_Task]) -> int:
    """Refuse to start without room for the downloads plus what they unpack to; returns bytes to fetch."""
    download, unpack = space_needed(ds, data_dir, tasks)
    free = shutil.disk_usage(ds.downloads(data_dir)).free
    if download + unpack > free:
        raise UserError(f"not enough free disk space in {ds.root(data_dir)}: need {human_size(download + unpack)} "
                        f"({human_size(download)} to download, {human_size(unpack)} to unpack), free {human_size(free)}; "
                        "free some space or pass --data-dir on a larger disk")
    return download


def _generate(ds: Dataset, data_dir: Path) -> None:
    if ds.generator != "shapes":
        raise UserError(f"manifest {ds.source}: unknown generator {ds.generator!r}; the one known is 'shapes'")
    from mlperf.datasets.shapes import make_shapes

    root = ds.root(data_dir)
    _ensure_writable(data_dir, data_dir)  # not root itself: make_shapes renames a finished set into it
    print(f"fetch: making the synthetic {ds.name} dataset in {root}", flush=True)
    try:
        make_shapes(root, **ds.generator_options)
    except TypeError as exc:
        raise UserError(f"manifest {ds.source}: generator_options do not fit the shapes generator ({exc})") \
            from None
    print(f"fetch: {ds.name} ready in {root}", flush=True)


def fetch_dataset(ds: Dataset, data_dir: Path, *, mirror: str | None = None, source: str | Path | None = None,
                  jobs: int = 4) -> None:
    """Fetch (or make) a dataset into <data_dir>/<name>: the body of `invoke fetch`."""
    data_dir = Path(data_dir)
    if ds.generator:
        _generate(ds, data_dir)
        return
    if mirror is not None and not mirror.startswith(("http://", "https://")):
        raise UserError(f"--mirror {mirror!r} is not an http(s) URL")
    if source is not None:
        source = Path(source)
        if not source.is_dir():
            raise UserError(f"--source {source} is not a folder")
    _ensure_writable(ds.downloads(data_dir), data_dir)
    tasks = _plan(ds, data_dir)
    if not tasks:
        print(f"fetch: {ds.name}: all {len(ds.files)} files present and checked; nothing to do", flush=True)
        return
    total = _check_space(ds, data_dir, tasks)
    progress = Progress(total, max(1, jobs))
    fetcher = _Fetcher(ds, data_dir, mirror, source, progress)
    errors: list[BaseException] = []
    pool = ThreadPoolExecutor(max_workers=max(1, jobs))
    try:
        futures = [pool.submit(fetcher.run, task) for task in tasks]
        for future in futures:
            try:
                future.result()
            except UserError as exc:
                errors.append(exc)
    except KeyboardInterrupt:
        _stop.set()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        progress.close()
    if errors:
        more = f" ({len(errors) - 1} more files failed)" if len(errors) > 1 else ""
        raise UserError(f"{errors[0]}{more}")
    print(f"fetch: {ds.name} ready in {ds.root(data_dir)}", flush=True)
