"""`invoke fetch`: what a dataset's manifest still needs (downloads, checksums, unpacking), done on
parallel threads.

Per file: download it into `<name>.part` (mlperf.datasets.transfer), rename it to `<name>` only when
the checksum matches, then unpack it (mlperf.datasets.extract) if the manifest says so. Finished work
is recorded in the state file shared with `invoke verify` (mlperf.datasets.state), keyed by size and
mtime, so a second run neither transfers, hashes nor extracts anything. Nothing is kept that the
checksum did not match. One fetch of a dataset runs at a time (a lock in downloads/). URLs are shown
with their secrets hidden.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from mlperf.datasets import Dataset, FileSpec, redact_url, url_problem, write_error
from mlperf.datasets import extract as extracting
from mlperf.datasets.hashing import hash_file
from mlperf.datasets.state import (extracted_entries, known_digest, record_digest, record_extracted,
                                   record_published, with_published)
from mlperf.datasets.transfer import (CONNECT_TIMEOUT, PERMANENT, READ_TIMEOUT, Download, Progress, RetryPolicy,
                                      Transient, no_follow, reason, stop_all)
from mlperf.errors import UserError
from mlperf.files import LockBusy, exclusive_lock, human_size, rename, shown

LOCK_NAME = ".fetch.lock"        # in downloads/: held (flock) by the one fetch of a dataset running
MAX_JOBS = 64
MAX_PUBLISHED = 4096             # bytes of a published checksum file read (`<md5>  <name>` is one line)
READ_SIZE = 8 << 20              # big reads: hashing runs at memory speed, syscalls stay rare


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
            digest = Download(spec, url, part, self.progress, self.policy).run()
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
                with open(src, "rb") as fin, open(part, "wb", opener=no_follow) as fout:
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
                        raise Transient(f"HTTP {resp.status_code} {resp.reason}")
                    if resp.status_code != 200:
                        why = f"HTTP {resp.status_code} {resp.reason}"
                        break
                    body = resp.raw.read(MAX_PUBLISHED, decode_content=False)
            except (requests.ConnectionError, requests.Timeout, Transient) as exc:
                why = reason(exc)
                if attempt > policy.retries or reason(exc) in PERMANENT:
                    break
                time.sleep(policy.delay(attempt))
                continue
            except (requests.RequestException, ValueError) as exc:
                why = reason(exc)
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
        stop_all()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        fetcher.progress.close()
    if errors:
        more = f" ({len(errors) - 1} more files failed)" if len(errors) > 1 else ""
        raise UserError(f"{errors[0]}{more}")
