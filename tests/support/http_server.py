"""A real HTTP file server on 127.0.0.1 with faults to order, for the fetch tests and benchmark.

Serves the files of one folder. Per file name, `faults` can make it: answer given error statuses
first (`statuses=[503, 503]`), drop the connection after N body bytes (`drop_after`, once per entry
in a list), ignore Range requests (`ranges=False`), send slowly (`rate` bytes/s, in blocks of a
tenth of a second's worth: 2 B/s is a byte every 0.5 s), send no Content-Length and end the body
by closing (`length=False`), or redirect (`redirect`: a Location, answered with 302). It counts
requests and body bytes sent, so tests can assert what went over the wire. Without faults a body
goes out with socket.sendfile, fast enough to benchmark clients against.
"""
from __future__ import annotations

import re
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


@dataclass
class Faults:
    statuses: list[int] = field(default_factory=list)     # answered in turn before serving the file
    drop_after: list[int] = field(default_factory=list)   # per request, in turn: close after N bytes
    ranges: bool = True                                    # False: answer 200 to a Range request
    rate: float | None = None                              # bytes per second, None: as fast as possible
    length: bool = True                                    # False: no Content-Length, close to end the body
    redirect: str | None = None                            # answer 302 with this Location


@dataclass
class Request:
    path: str
    range: str | None
    status: int
    sent: int = 0


class FileServer:
    """`with FileServer(folder) as srv:` then `srv.url(name)`; `srv.requests` lists what came in."""

    def __init__(self, root: Path, faults: dict[str, Faults] | None = None):
        self.root = Path(root)
        self.faults = faults or {}
        self.requests: list[Request] = []
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def do_GET(self):
                server._serve(self)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def url(self, name: str = "") -> str:
        return f"http://127.0.0.1:{self.port}/{name}"

    @property
    def bytes_sent(self) -> int:
        return sum(r.sent for r in self.requests)

    def reset(self) -> None:
        with self.lock:
            self.requests.clear()

    def __enter__(self) -> FileServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def _serve(self, h: BaseHTTPRequestHandler) -> None:
        name = h.path.partition("?")[0].lstrip("/")  # a query (?token=...) names no other file
        fault = self.faults.get(name, Faults())
        rng = h.headers.get("Range")
        record = Request(path=name, range=rng, status=0)
        with self.lock:
            self.requests.append(record)
            status = fault.statuses.pop(0) if fault.statuses else None
            drop = fault.drop_after.pop(0) if fault.drop_after and status is None else None
        path = self.root / name
        if fault.redirect is not None:
            record.status = 302
            h.send_response(302)
            h.send_header("Location", fault.redirect)
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        if status is not None or not path.is_file() or "/" in name:
            record.status = status or 404
            h.send_error(record.status)
            return
        size = path.stat().st_size
        start = 0
        m = re.fullmatch(r"bytes=(\d+)-", rng or "")
        if m and fault.ranges:
            start = int(m.group(1))
            if start >= size:
                record.status = 416
                h.send_response(416)
                h.send_header("Content-Range", f"bytes */{size}")
                h.send_header("Content-Length", "0")
                h.end_headers()
                return
            record.status = 206
            h.send_response(206)
            h.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
        else:
            record.status = 200
            h.send_response(200)
        if fault.length:
            h.send_header("Content-Length", str(size - start))
        h.send_header("Content-Type", "application/octet-stream")
        h.end_headers()
        h.wfile.flush()
        with open(path, "rb") as fh:
            if drop is None and fault.rate is None:
                try:
                    record.sent = h.connection.sendfile(fh, offset=start)
                except OSError:  # the client hung up (it had what it wanted, or refused the rest)
                    pass
                return
            fh.seek(start)
            left = size - start if drop is None else min(size - start, drop)
            block = 64 << 10 if not fault.rate else max(1, min(64 << 10, int(fault.rate / 10)))
            began = time.perf_counter()
            while left > 0:
                data = fh.read(min(block, left))
                try:
                    h.wfile.write(data)
                    h.wfile.flush()
                except OSError:  # the client went away (killed download)
                    return
                record.sent += len(data)
                left -= len(data)
                if fault.rate:  # paced against the clock, so the rate holds however long writes take
                    time.sleep(max(0.0, began + record.sent / fault.rate - time.perf_counter()))
            if drop is not None:  # cut the connection with the body unfinished
                h.close_connection = True
                try:
                    h.connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


def make_file(path: Path, size: int, seed: int = 0) -> bytes:
    """A file of `size` pseudo-random bytes (not compressible, not all zeros); returns its bytes."""
    import random

    data = random.Random(seed).randbytes(size)
    path.write_bytes(data)
    return data


def free_port() -> int:
    """A port nothing listens on (for an unreachable mirror)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


__all__ = ["FileServer", "Faults", "Request", "make_file", "free_port"]
