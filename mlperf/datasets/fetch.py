"""`invoke fetch`: resumable, parallel, checksummed downloads and safe extraction of a dataset.

Per file: stream into `<name>.part` while hashing the bytes as they arrive (no second pass), rename
to `<name>` only when the checksum matches, then unpack it (mlperf.datasets.extract) if the manifest says so.
Finished work is recorded in the state file shared with `invoke verify` (mlperf.datasets.verify), keyed by
size and mtime, so a second run neither transfers, hashes nor extracts anything.

What a server sends is not trusted beyond the manifest: a body is read up to the manifest's size
(or the Content-Length) and no further, a length that disagrees with the manifest fails at once,
an attempt slower than MLPERF_FETCH_MIN_RATE over MLPERF_FETCH_RATE_WINDOW seconds is retried,
redirects may lead to http(s) only, and nothing is kept that the checksum did not match. One
fetch of a dataset runs at a time (a lock in downloads/). URLs are shown with their secrets hidden.
"""
from __future__ import annotations

import collections
import contextlib
import hashlib
import math
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

from mlperf.datasets import Dataset, FileSpec, redact_url, url_problem, write_error
from mlperf.datasets import extract as extracting
from mlperf.datasets.verify import (READ_SIZE, extracted_entries, hash_file, hasher_of, known_digest,
                                    record_digest, record_extracted, record_published, with_published)
from mlperf.errors import UserError
from mlperf.files import LockBusy, exclusive_lock, human_size, rename, shown

CHUNK = 1 << 20                  # bytes per read from the socket
CONNECT_TIMEOUT = 15             # seconds
READ_TIMEOUT = 60                # seconds without a byte before the attempt counts as failed
PROGRESS_INTERVAL = 10.0         # seconds between plain progress lines when output is not a terminal
LOCK_NAME = ".fetch.lock"        # in downloads/: held (flock) by the one fetch of a dataset running
MAX_JOBS = 64
MAX_PUBLISHED = 4096             # bytes of a published checksum file read (`<md5>  <name>` is one line)
_stop = threading.Event()        # set on Ctrl-C so worker threads end their transfers
PERMANENT = {"name or service not known", "nodename nor servname provided, or not known"}


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded exponential backoff: attempt n waits min(cap, base * 2**(n-1)), jittered to 50-100%;
    and the slowest an attempt may go: `min_rate` bytes/s averaged over `window` seconds (0: any).

    MLPERF_FETCH_RETRIES, MLPERF_FETCH_BACKOFF (base seconds), MLPERF_FETCH_MIN_RATE and
    MLPERF_FETCH_RATE_WINDOW override the defaults, e.g. for a flaky link (more retries) or for
    tests (short waits).
    """
    retries: int = 6
    base: float = 1.0
    cap: float = 30.0
    min_rate: float = 1024.0
    window: float = 60.0

    @classmethod
    def from_env(cls) -> RetryPolicy:
        def number(var: str, default, kind, positive: bool = False):
            raw = os.environ.get(var, "").strip()
            if not raw:
                return default
            try:
                value = kind(raw)
            except ValueError:
                value = None
            if value is None or not math.isfinite(value) or value < 0 or (positive and value == 0):
                what = "a whole number" if kind is int else "a number of seconds" if "RATE" not in var \
                    or "WINDOW" in var else "a number of bytes per second"
                raise UserError(f"{var}={raw!r}: it must be {what}, {'above' if positive else 'at least'} 0")
            return value

        return cls(retries=number("MLPERF_FETCH_RETRIES", cls.retries, int),
                   base=number("MLPERF_FETCH_BACKOFF", cls.base, float),
                   min_rate=number("MLPERF_FETCH_MIN_RATE", cls.min_rate, float),
                   window=number("MLPERF_FETCH_RATE_WINDOW", cls.window, float, positive=True))

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
        message = redact_url(message)
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


class _TooSlow(_Transient):
    """Slower than the minimum rate: retried, but the bytes it brought do not reset the count."""


class _RateWatch:
    """Fails an attempt that averages less than `min_rate` bytes/s over its last `window` seconds
    (a trickle that READ_TIMEOUT never catches, because a byte arrives now and then)."""

    def __init__(self, policy: RetryPolicy):
        self.min_rate, self.window = policy.min_rate, policy.window
        self.samples = collections.deque([(time.monotonic(), 0)])  # (time, bytes so far), ~20 kept

    def check(self, received: int) -> None:
        if not self.min_rate:
            return
        now = time.monotonic()
        if now - self.samples[-1][0] >= self.window / 20:
            self.samples.append((now, received))
        while len(self.samples) > 1 and self.samples[1][0] <= now - self.window:
            self.samples.popleft()
        since, then = self.samples[0]
        if now - since >= self.window and (received - then) / (now - since) < self.min_rate:
            raise _TooSlow(f"slower than {human_size(self.min_rate)}/s over {self.window:g}s "
                           "(MLPERF_FETCH_MIN_RATE)")


class _TooLong(Exception):
    """The server sent more bytes than the file has."""


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


def _no_follow(path: str, flags: int) -> int:
    """open()'s opener for a .part: never written through a link."""
    return os.open(path, flags | os.O_NOFOLLOW, 0o666)


class _Download:
    """One file from one URL into `<name>.part`, resumed and retried; returns the digest."""

    def __init__(self, spec: FileSpec, url: str, part: Path, progress: Progress, policy: RetryPolicy):
        self.spec, self.url, self.part, self.progress, self.policy = spec, url, part, progress, policy
        self.algo = spec.checksum[0]
        self.hasher = hashlib.new(self.algo)
        self.offset = 0

    def _fail(self, why: str, todo: str = "check the URL (or --mirror)") -> UserError:
        return UserError(f"cannot download {self.spec.name} from {self.url}: {why}: {todo}")

    def _restart(self) -> None:
        self.progress.advance(self.spec.name, -self.offset)
        self.part.unlink(missing_ok=True)
        self.hasher = hashlib.new(self.algo)
        self.offset = 0

    def _resume_existing(self) -> None:
        """Continue from a `.part` a previous run left: hash the bytes it holds once."""
        if self.part.is_symlink() or (self.part.exists() and not self.part.is_file()):
            raise UserError(f"{self.part} is not a plain file: remove it and run `invoke fetch` again")
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
            session.max_redirects = 10
            while True:
                start = self.offset
                try:
                    return self._attempt(session)
                except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError,
                        urllib3.exceptions.HTTPError, _Transient) as exc:  # urllib3's: from raw reads
                    if _stop.is_set():
                        raise
                    if _reason(exc) in PERMANENT:  # waiting will not make an unknown host known
                        raise self._fail(_reason(exc)) from None
                    progressed = self.offset > start and not isinstance(exc, _TooSlow)
                    failures = 1 if progressed else failures + 1  # progress resets the count
                    if failures > self.policy.retries:
                        raise self._fail(f"{_reason(exc)} ({failures} attempts)", "check the URL and the "
                                         "network, or use --mirror or --source") from None
                    wait = self.policy.delay(failures)
                    self.progress.log(f"fetch: {self.spec.name}: {_reason(exc)}; retry {failures} of "
                                      f"{self.policy.retries} in {wait:.1f}s")
                    time.sleep(wait)
                except (requests.RequestException, ValueError) as exc:  # a URL or redirect that cannot work
                    raise self._fail(_reason(exc)) from None
                except _TooLong:
                    self._restart()
                    raise self._fail(f"the server sent more than the manifest's {self.spec.size} bytes",
                                     "check the URL (or --mirror) and the manifest's size") from None

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
                raise self._fail(f"HTTP {code} {resp.reason}")
            length = resp.headers.get("Content-Length", "").strip()
            end = self.offset + int(length) if length.isdigit() else None
            if end is not None and self.spec.size is not None and end != self.spec.size:
                raise self._fail(f"the server's file is {end} bytes (Content-Length), the manifest says "
                                 f"{self.spec.size}", "check the URL (or --mirror) and the manifest's size")
            if self.spec.size is None and end is not None:
                self.progress.set_size(self.spec.name, end)
            limit = self.spec.size if self.spec.size is not None else end
            self._stream(resp, mode, limit)
        if limit is not None and self.offset < limit:
            raise _Transient(f"connection closed after {human_size(self.offset)}")
        return self.hasher.hexdigest()

    def _stream(self, resp, mode: str, limit: int | None) -> None:
        """Append the body to the .part up to `limit` bytes in all; a byte more is _TooLong."""
        background = _BackgroundHash(self.hasher)
        watch = _RateWatch(self.policy)
        received = 0
        try:
            with self._writing(), open(self.part, mode, opener=_no_follow) as fh:
                # read1 hands over what has arrived (up to CHUNK): a dropped connection loses nothing
                # already received, unlike iter_content, which discards a partly filled chunk.
                while True:
                    want = CHUNK if limit is None else min(CHUNK, limit - self.offset)
                    chunk = resp.raw.read1(max(want, 1), decode_content=False)
                    if not chunk:
                        return
                    if want <= 0:
                        raise _TooLong
                    if _stop.is_set():
                        raise KeyboardInterrupt
                    fh.write(chunk)
                    background.update(chunk)
                    self.offset += len(chunk)
                    received += len(chunk)
                    self.progress.advance(self.spec.name, len(chunk))
                    watch.check(received)
        finally:
            background.finish()  # hasher and .part hold the same bytes, even after a failure

    @contextlib.contextmanager
    def _writing(self):
        """A failed write into the .part (a full disk, a quota) is one line; the bytes written are
        kept, and the next fetch resumes from them."""
        try:
            yield
        except OSError as exc:
            if exc.errno is None:
                raise
            left = (self.spec.size - self.offset) if self.spec.size else None
            raise write_error(exc, self.part, f"downloading {self.spec.name}", f"the {human_size(self.offset)} "
                              "downloaded so far are kept, and the next `invoke fetch` resumes there",
                              need=left) from None


def _range_start(resp) -> int | None:
    value = resp.headers.get("Content-Range", "")  # "bytes START-END/TOTAL"
    try:
        return int(value.split()[1].split("-")[0])
    except (IndexError, ValueError):
        return None


def _reason(exc: BaseException) -> str:
    """A short, one-line reason from requests' long nested exception texts (URLs redacted)."""
    import requests
    import urllib3

    if isinstance(exc, (requests.Timeout, urllib3.exceptions.TimeoutError)):
        return "timed out"
    if isinstance(exc, (requests.exceptions.ChunkedEncodingError, urllib3.exceptions.ProtocolError)):
        return "connection broken mid-transfer"
    if isinstance(exc, requests.exceptions.InvalidSchema):
        return "redirected to a URL that is not http(s)"  # file://, ftp://: never followed
    if isinstance(exc, requests.TooManyRedirects):
        return "too many redirects (a redirect loop?)"
    if isinstance(exc, (requests.exceptions.InvalidURL, requests.exceptions.MissingSchema, ValueError)):
        return "the URL (or one it redirected to) is malformed"
    if isinstance(exc, requests.exceptions.SSLError):
        return "TLS error (certificate or protocol)"
    if isinstance(exc, requests.ConnectionError):
        text = str(exc)
        for known in ("Connection refused", "Name or service not known", "No route to host",
                      "nodename nor servname provided, or not known",
                      "Temporary failure in name resolution", "Connection reset",
                      "Remote end closed connection", "Network is unreachable"):
            if known in text:
                return known.lower()
        return "connection failed"
    if isinstance(exc, _Transient):
        return str(exc)
    return redact_url(f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}" if str(exc) else type(exc).__name__)


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
        self.claimed: dict[str, str] = {}   # top-level name -> the archive unpacked to it in this run
        self.claim_lock = threading.Lock()

    def url(self, spec: FileSpec) -> str:
        return f"{self.mirror.rstrip('/')}/{spec.name}" if self.mirror else spec.url

    def claim(self, spec: FileSpec, names: list[str]) -> None:
        """Reserve the top-level names an archive unpacks to, or refuse them when another archive
        of the dataset unpacked (or is unpacking) to one: its files would be replaced, and a
        second fetch or verify could not tell. COCO's archives share none."""
        with self.claim_lock:
            owners = dict(self.claimed)
            for other in self.ds.files:
                if other.extract and other.name != spec.name:
                    for name in extracted_entries(self.ds, self.data_dir, other, present=False) or []:
                        owners.setdefault(name, other.name)
            for name in names:
                if owners.get(name, spec.name) != spec.name:
                    raise UserError(f"{spec.name} and {owners[name]} both unpack to {name!r} in "
                                    f"{self.ds.root(self.data_dir)}: one would replace the other's files, so "
                                    f"{spec.name} was not unpacked; give each archive its own top-level folder "
                                    "(or unpack them by hand with `extract: false`)")
            self.claimed.update(dict.fromkeys(names, spec.name))

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
            entries = extracting.extract(self.downloads / spec.name, self.ds.root(self.data_dir),
                                         claim=lambda names: self.claim(spec, names))
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
            part.unlink(missing_ok=True)
            hasher = hashlib.new(algo)
            try:
                with open(src, "rb") as fin, open(part, "wb", opener=_no_follow) as fout:
                    while block := fin.read(READ_SIZE):
                        fout.write(block)
                        hasher.update(block)
            except OSError as exc:
                part.unlink(missing_ok=True)
                raise write_error(exc, part, f"copying {spec.name} from --source", need=src.stat().st_size) from None
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
    ds = with_published(ds, data_dir)
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


def parse_jobs(value) -> int:
    """--jobs as a number of parallel downloads, 1 to MAX_JOBS; anything else is one UserError."""
    try:
        jobs = int(str(value).strip()) if not isinstance(value, bool) else None
    except ValueError:
        jobs = None
    if jobs is None or not 1 <= jobs <= MAX_JOBS:
        raise UserError(f"--jobs {value!r} is not a number of parallel downloads: give a whole number "
                        f"from 1 to {MAX_JOBS}")
    return jobs


@contextlib.contextmanager
def _locked(ds: Dataset, data_dir: Path):
    """Hold the dataset's fetch lock (downloads/.fetch.lock) for the whole fetch, so a second fetch
    of it stops at once instead of writing the same .part files."""
    path = ds.downloads(data_dir) / LOCK_NAME
    with contextlib.ExitStack() as held:
        try:
            held.enter_context(exclusive_lock(path))
        except LockBusy as busy:
            raise UserError(f"another fetch of {ds.name} is running (pid {busy.holder}) in {ds.root(data_dir)}: "
                            "wait for it to finish, or stop it, and run `invoke fetch` again") from None
        except OSError as exc:
            raise write_error(exc, path, "taking the fetch lock") from None
        yield


def fetch_dataset(ds: Dataset, data_dir: Path, *, mirror: str | None = None, source: str | Path | None = None,
                  jobs: int | str = 4) -> None:
    """Fetch (or make) a dataset into <data_dir>/<name>: the body of `invoke fetch`.

    Every error line has the secrets of the URLs in it hidden (redact_url)."""
    try:
        _fetch_dataset(ds, Path(data_dir), mirror, source, parse_jobs(jobs))
    except UserError as exc:
        exc.args = (redact_url(str(exc)),)
        raise


def _fetch_dataset(ds: Dataset, data_dir: Path, mirror: str | None, source: str | Path | None, jobs: int) -> None:
    if ds.generator:
        _generate(ds, data_dir)
        return
    if mirror is not None and (problem := url_problem(mirror)) is not None:
        raise UserError(f"--mirror {mirror!r} {problem}: give the http(s) URL of a folder with the same file names")
    if source is not None:
        source = Path(source)
        if not source.is_dir():
            raise UserError(f"--source {source} is not a folder")
    _ensure_writable(ds.downloads(data_dir), data_dir)
    with _locked(ds, data_dir):
        ds = _read_published(ds, data_dir)
        tasks = _plan(ds, data_dir)
        if not tasks:
            print(f"fetch: {ds.name}: all {len(ds.files)} files present and checked; nothing to do", flush=True)
            return
        total = _check_space(ds, data_dir, tasks)
        _run_tasks(_Fetcher(ds, data_dir, mirror, source, Progress(total, jobs)), tasks, jobs)
    print(f"fetch: {ds.name} ready in {ds.root(data_dir)}", flush=True)


def _read_published(ds: Dataset, data_dir: Path) -> Dataset:
    """`ds` with the md5 of each `md5_url` file read from where its publisher keeps it (Detectron:
    `<url>.md5sum`, what its own download checks), once, then recorded in the state file. The
    reply is read up to MAX_PUBLISHED bytes and must start with 32 hex digits."""
    import requests

    policy = RetryPolicy.from_env()
    for spec in with_published(ds, data_dir).files:
        if spec.md5 or not spec.md5_url:  # checked by its own md5 or sha256
            continue
        why = None
        for attempt in range(1, policy.retries + 2):
            try:
                with requests.get(spec.md5_url, headers={"Accept-Encoding": "identity"}, stream=True,
                                  timeout=(CONNECT_TIMEOUT, READ_TIMEOUT)) as resp:
                    if resp.status_code in (408, 429) or resp.status_code >= 500:
                        raise _Transient(f"HTTP {resp.status_code} {resp.reason}")
                    if resp.status_code != 200:
                        why = f"HTTP {resp.status_code} {resp.reason}"
                        break
                    body = resp.raw.read(MAX_PUBLISHED, decode_content=False)
            except (requests.ConnectionError, requests.Timeout, _Transient) as exc:
                why = _reason(exc)
                if attempt > policy.retries or _reason(exc) in PERMANENT:
                    break
                time.sleep(policy.delay(attempt))
                continue
            except (requests.RequestException, ValueError) as exc:
                why = _reason(exc)
                break
            token = body.split()[0].decode("ascii", "replace").lower() if body.split() else ""
            if len(token) != 32 or any(c not in "0123456789abcdef" for c in token):
                why = f"its first word {shown(token)} is not an md5 (32 hex digits)"
                break
            record_published(ds, data_dir, spec, token)
            why = None
            break
        if why is not None:
            raise UserError(f"cannot read the md5 of {spec.name} published at {spec.md5_url}: {why}; check "
                            "the network, or give `md5:` for it in your own copy of the manifest (--manifest)")
    return with_published(ds, data_dir)


def _run_tasks(fetcher: _Fetcher, tasks: list[_Task], jobs: int) -> None:
    """Every task on `jobs` threads; the first failure is the error, with how many more failed."""
    errors: list[BaseException] = []
    pool = ThreadPoolExecutor(max_workers=jobs)
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
        fetcher.progress.close()
    if errors:
        more = f" ({len(errors) - 1} more files failed)" if len(errors) > 1 else ""
        raise UserError(f"{errors[0]}{more}")
