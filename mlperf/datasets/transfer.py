"""The transfer engine under `invoke fetch`: one file from one URL into its `.part`, resumed,
retried, watched for stalls and hashed as its bytes arrive (no second pass).

Its own module because moving bytes across a network that fails is one job, apart from what a
dataset needs fetched and in what order (mlperf.datasets.fetch): a server is not trusted beyond the
manifest. A body is read up to the manifest's size (or the Content-Length) and no further, a length
that disagrees with the manifest fails at once, an attempt slower than MLPERF_FETCH_MIN_RATE over
MLPERF_FETCH_RATE_WINDOW seconds is retried, redirects may lead to http(s) only. URLs are shown
with their secrets hidden.
"""
from __future__ import annotations

import collections
import contextlib
import hashlib
import math
import os
import queue
import random
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from mlperf.datasets import FileSpec, redact_url, write_error
from mlperf.datasets.hashing import hasher_of
from mlperf.errors import UserError
from mlperf.files import human_size

CHUNK = 1 << 20                  # bytes per read from the socket
CONNECT_TIMEOUT = 15             # seconds
READ_TIMEOUT = 60                # seconds without a byte before the attempt counts as failed
PROGRESS_INTERVAL = 10.0         # seconds between plain progress lines when output is not a terminal
_stop = threading.Event()        # set on Ctrl-C so worker threads end their transfers
PERMANENT = {"name or service not known", "nodename nor servname provided, or not known"}


def stop_all() -> None:
    """Make every running transfer end (Ctrl-C: worker threads cannot be interrupted otherwise)."""
    _stop.set()


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


class Transient(Exception):
    """A failure worth retrying: a 5xx, a short body."""


class _TooSlow(Transient):
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


def no_follow(path: str, flags: int) -> int:
    """open()'s opener for a .part: never written through a link."""
    return os.open(path, flags | os.O_NOFOLLOW, 0o666)


class Download:
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
                        urllib3.exceptions.HTTPError, Transient) as exc:  # urllib3's: from raw reads
                    if _stop.is_set():
                        raise
                    if reason(exc) in PERMANENT:  # waiting will not make an unknown host known
                        raise self._fail(reason(exc)) from None
                    progressed = self.offset > start and not isinstance(exc, _TooSlow)
                    failures = 1 if progressed else failures + 1  # progress resets the count
                    if failures > self.policy.retries:
                        raise self._fail(f"{reason(exc)} ({failures} attempts)", "check the URL and the "
                                         "network, or use --mirror or --source") from None
                    wait = self.policy.delay(failures)
                    self.progress.log(f"fetch: {self.spec.name}: {reason(exc)}; retry {failures} of "
                                      f"{self.policy.retries} in {wait:.1f}s")
                    time.sleep(wait)
                except (requests.RequestException, ValueError) as exc:  # a URL or redirect that cannot work
                    raise self._fail(reason(exc)) from None
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
                raise Transient(f"HTTP {code} {resp.reason}")
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
                        raise Transient(f"HTTP {code} to a range request")
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
            raise Transient(f"connection closed after {human_size(self.offset)}")
        return self.hasher.hexdigest()

    def _stream(self, resp, mode: str, limit: int | None) -> None:
        """Append the body to the .part up to `limit` bytes in all; a byte more is _TooLong."""
        background = _BackgroundHash(self.hasher)
        watch = _RateWatch(self.policy)
        received = 0
        try:
            with self._writing(), open(self.part, mode, opener=no_follow) as fh:
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


def reason(exc: BaseException) -> str:
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
    if isinstance(exc, Transient):
        return str(exc)
    return redact_url(f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}" if str(exc) else type(exc).__name__)
