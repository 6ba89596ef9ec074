"""`invoke session.results`: a session's results/ copied from its vfolder to <results_dir>/<name>/.

Separate from the lifecycle tasks (mlperf.session) because it is another job with its own dangers: a
batch session is gone when its command ends, so the results come from the vfolder through the storage
proxy, whose listing becomes local paths (each passes mlperf.files.inside) and whose downloads can
stall for minutes (each is watched for a minimum rate instead of a timeout).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from mlperf.errors import UserError
from mlperf.files import UnsafeName, human_size, inside, plain_name, rename, shown
from mlperf.backendai_cli import client_env, client_error, find_client, run_client, said, text_of
from mlperf.session import known_session
from mlperf.session_spec import VFOLDER_NAME, check_name, check_vfolder

DOWNLOAD_BATCH = 50        # files per `vfolder download` call: one client start for many small logs
LIST_THREADS = 8           # `vfolder ls` calls at once
STALL_SECONDS = 60.0       # a download that gains less than MIN_RATE for this long is given up
MIN_RATE = 1024            # bytes per second; a new file begun counts as progress too (many small logs)
CLIENT_START = 20.0        # the client's own start (imports, the greeting) before its first file


@dataclass(frozen=True)
class Entry:
    path: str          # relative to the vfolder's root, each part a plain name (mlperf.files.plain_name)
    size: int
    mtime: float | None


def results(name: str, *, results_dir: Path, vfolder: str | None = None, client: str | None = None,
            stall_seconds: float = STALL_SECONDS) -> Path:
    """Bring the vfolder's results/ into <results_dir>/<name>/: files missing here or changed there
    are downloaded (into a scratch folder, then moved into place); nothing here is deleted. A name
    the listing gives that would not stay inside that folder is not copied and ends in an error,
    after the others are here."""
    check_name(name)
    try:
        stall_seconds = float(stall_seconds)
    except (TypeError, ValueError):
        stall_seconds = -1.0
    if not 0 < stall_seconds < float("inf"):
        raise UserError(f"mlperf.session.stall_seconds {shown(stall_seconds)} is not a positive number of seconds")
    exe = find_client(client)
    vfolder = check_vfolder(vfolder) if vfolder is not None else session_vfolder(known_session(exe, name), name)
    files, refused = list_files(exe, vfolder, "results", session=name)
    target = Path(results_dir) / name
    local = {}
    for entry in files:
        try:
            local[entry] = inside(target, entry.path.removeprefix("results/"), "listed file")
        except UnsafeName as bad:   # a folder here that is a symbolic link out of it
            refused.append(str(bad))
    wanted = [f for f in local if not _up_to_date(local[f], f)]
    if wanted:
        download(exe, vfolder, wanted, local, target, session=name, stall_seconds=stall_seconds)
    print(f"results: {len(wanted)} file(s) copied from vfolder {vfolder}:results/ to {target}/ "
          f"({len(local) - len(wanted)} already here)")
    if refused:
        more = f" (and {len(refused) - 1} more)" if len(refused) > 1 else ""
        raise UserError(f"vfolder {vfolder} lists a file that cannot be copied into {target}/, not copied: "
                        f"{refused[0]}{more}; the other {len(local)} file(s) are there (a manager that lists such "
                        "names is broken or hostile: tell its admin)")
    return target


def session_vfolder(info: dict, name: str) -> str:
    mounts = [m for m in info.get("mounts") or [] if not str(m).startswith(".")]   # dot-folders: automatic
    if len(mounts) != 1:
        raise UserError(f"session {name} mounts {', '.join(said(m, 64) for m in mounts) or 'no vfolder'}: name the "
                        "one with the results, --vfolder NAME")
    if not VFOLDER_NAME.match(mounts[0]):
        raise UserError(f"the manager says session {name} mounts {shown(mounts[0])}, which is not a vfolder name: "
                        "name the one with the results, --vfolder NAME")
    return mounts[0]


def list_files(exe: str, vfolder: str, top: str, session: str = "NAME") -> tuple[list[Entry], list[str]]:
    """Every file under `top` in the vfolder, through `backend.ai vfolder ls`: one call per folder,
    the folders of one level at once (each call is a client start of about a second). Also, why each
    listed name that is not a plain name with a size was left out (they would become local paths)."""
    from concurrent.futures import ThreadPoolExecutor

    files, refused, level = [], [], [top]
    with ThreadPoolExecutor(max_workers=LIST_THREADS) as pool:
        while level:
            answers = list(pool.map(lambda folder: run_client(exe, ["vfolder", "ls", vfolder, "--", folder]), level))
            subfolders = []
            for folder, proc in zip(level, answers):
                entries = parse_listing(proc.stdout)
                if entries is None:   # the client prints its error and still exits 0
                    if "no such file or directory" in proc.stderr.lower() and folder == top:
                        raise UserError(f"vfolder {vfolder} has no {top}/ yet: the session writes it as the "
                                        f"benchmark runs (invoke session.logs {session} shows how far it got)")
                    raise client_error(proc, "vfolder ls", vfolder=vfolder)
                for name, size, mtime, is_dir in entries:
                    if name is None:
                        print(f"warning: skipped a file in {vfolder}:{folder}/ whose name the client's table "
                              "turned into another number; fetch it with `backend.ai vfolder download`",
                              file=sys.stderr)
                        continue
                    try:
                        plain_name(name, f"the name in {folder}/")
                    except UnsafeName as bad:
                        refused.append(str(bad))
                        continue
                    if is_dir:
                        subfolders.append(f"{folder}/{name}")
                    elif size < 0:
                        refused.append(f"{shown(f'{folder}/{name}')} has no size in the listing")
                    else:
                        files.append(Entry(f"{folder}/{name}", size, mtime))
            level = subfolders
    return sorted(files, key=lambda e: e.path), refused


def parse_listing(text: str) -> list[tuple[str | None, int, float | None, bool]] | None:
    """The table `backend.ai vfolder ls` prints (tabulate: file name, size, modified, mode), cut at the
    columns its dashed rule marks; None when there is no table. When every name in a folder is a
    number, tabulate right-aligns them; whole numbers keep their text (007), but if one is a float
    all are reformatted (1e3 becomes 1000, 007 becomes 7), and they come back with name None."""
    lines = text.splitlines()
    rule = next((i for i, ln in enumerate(lines) if ln.strip() and set(ln) <= {"-", " "}), None)
    if rule is None:
        return None
    starts = [m.start() for m in re.finditer(r"-+", lines[rule])]
    numeric = rule > 0 and lines[rule - 1][:1] == " "   # the header is right-aligned over numbers
    rows = []
    for row in lines[rule + 1:]:
        if not row.strip():
            continue
        cells = [row[a:b].strip() for a, b in zip(starts, starts[1:] + [len(row)])]
        if len(cells) == 4 and cells[0] not in (".", ".."):
            rows.append(cells)
    floats = numeric and any(not cells[0].isdigit() for cells in rows)   # reformatted: the names are lost
    entries = []
    for name, size, modified, mode in rows:
        try:
            mtime = datetime.strptime(modified, "%b %d %Y %H:%M:%S").timestamp()   # the client's local time
        except ValueError:
            mtime = None
        entries.append((None if floats else name, int(size) if size.isdigit() else -1, mtime, mode.startswith("d")))
    return entries


def _up_to_date(local: Path, entry: Entry) -> bool:
    try:
        st = local.stat()
    except OSError:
        return False
    return st.st_size == entry.size and (entry.mtime is None or int(st.st_mtime) == int(entry.mtime))


def download(exe: str, vfolder: str, entries: list[Entry], local: dict[Entry, Path], target: Path, *,
             session: str, stall_seconds: float = STALL_SECONDS) -> None:
    """`backend.ai vfolder download` into a scratch folder in the target (the client refuses to
    overwrite a file), then each file moved to `local[entry]` with the vfolder's modification time.
    Files that arrived whole are moved even when a batch fails, so a second run fetches only the rest."""
    target.mkdir(parents=True, exist_ok=True)
    scratch = target / f".download-{os.getpid()}"
    try:
        for start in range(0, len(entries), DOWNLOAD_BATCH):
            batch = entries[start:start + DOWNLOAD_BATCH]
            for entry in batch:
                (scratch / entry.path).parent.mkdir(parents=True, exist_ok=True)
            proc = None
            try:
                proc = _download_batch(exe, vfolder, batch, scratch, session, stall_seconds)
            finally:
                ok = proc is not None and proc.returncode == 0
                for entry in batch:
                    staged = scratch / entry.path
                    if staged.is_file() and (ok or staged.stat().st_size == entry.size):
                        if entry.mtime is not None:
                            os.utime(staged, (entry.mtime, entry.mtime))
                        local[entry].parent.mkdir(parents=True, exist_ok=True)
                        rename(staged, local[entry])
            if not ok:
                raise client_error(proc, "vfolder download", vfolder=vfolder)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _download_batch(exe: str, vfolder: str, batch: list[Entry], scratch: Path, session: str,
                    stall_seconds: float) -> subprocess.CompletedProcess:
    """One `backend.ai vfolder download` call, watched. The 23.9 client waits on a stalled storage
    proxy for aiohttp's five minutes per try and tries twenty times, and a file can be any size, so
    no timeout fits: the client is stopped when its files gain less than MIN_RATE for stall_seconds
    and it begins no new file either (its own start gets CLIENT_START more)."""
    import tempfile

    argv = [exe, "vfolder", "download", vfolder, "-b", str(scratch), "--", *[e.path for e in batch]]
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(argv, env=client_env(), stdout=out, stderr=err, stdin=subprocess.DEVNULL)
        try:
            problem = _watch(proc, batch, scratch, stall_seconds)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        if problem:
            raise UserError(f"{problem}: ask the vfolder's admin about its storage proxy, then run "
                            f"`invoke session.results {session}` again (the files that arrived whole are kept)")
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(argv, proc.returncode, text_of(out.read()), text_of(err.read()))


def _watch(proc: subprocess.Popen, batch: list[Entry], scratch: Path, stall_seconds: float) -> str | None:
    """Wait for the download client; what went wrong, if it had to be stopped."""
    def sizes() -> list[int | None]:
        found = []
        for entry in batch:
            try:
                found.append((scratch / entry.path).stat().st_size)
            except OSError:
                found.append(None)
        return found

    mark, begun = 0, 0
    since = time.monotonic() + CLIENT_START
    while proc.poll() is None:
        time.sleep(min(1.0, stall_seconds / 4))
        have = sizes()
        for entry, size in zip(batch, have):   # a log still written may grow a little, not without end
            if size is not None and size > 2 * entry.size + (64 << 20):
                return (f"the storage proxy sent {human_size(size)} of {shown(entry.path)}, far more than the "
                        f"{human_size(entry.size)} the listing gives")
        total, started = sum(s or 0 for s in have), sum(s is not None for s in have)
        if started > begun or total - mark >= MIN_RATE * stall_seconds:
            mark, begun, since = total, started, time.monotonic()
        elif total < mark:   # the client began a file again after an error: progress from here
            mark = total
        elif time.monotonic() - since > stall_seconds:
            current = next(((e, s) for e, s in zip(batch, have) if s is None or s < e.size), None)
            if current is None:
                return f"`backend.ai vfolder download` did not end within {stall_seconds:g} s after its last file"
            entry, size = current
            return (f"the storage proxy stopped sending {shown(entry.path)} ({human_size(size or 0)} of "
                    f"{human_size(entry.size)} came) for {stall_seconds:g} s (less than {human_size(MIN_RATE)}/s)")
    return None
