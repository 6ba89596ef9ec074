"""Inside a Backend.AI session: which folders outlive it.

A session's /home/work is per-container scratch, deleted with the session; only mounted vfolders
(/home/work/<name>, or where a mount map put them) persist. Results, checkpoints, series seeds and
job records written anywhere else die with the session, and with them `--resume` and `--series`.

The mounts come from BACKENDAI_PERSISTENT_PATHS where the agent sets it (Backend.AI 26.4.4 and
newer: the container paths of all vfolder mounts, colon-separated), else from /proc/self/mountinfo:
bind mounts under /home/work, less the few the agent itself places there that are not vfolders
(lablup/backend.ai src/ai/backend/agent/agent.py mount_krunner, docker/agent.py).
"""
from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from mlperf.errors import UserError

WORK = Path("/home/work")
# Mounted under /home/work by the agent, not vfolders: the scratch notice (a read-only bind up to
# 26.4.3), terminfo for musl images, the deep-learning samples volume.
NOT_VFOLDERS = {"DO_NOT_STORE_PERSISTENT_FILES_HERE.md", ".terminfo", "samples"}
SESSION_VARS = ("BACKENDAI_SESSION_ID", "BACKENDAI_KERNEL_ID")
SCRATCH_OK_HELP = "accept results on the session's scratch (/home/work), deleted with the session"


@dataclass(frozen=True)
class Mount:
    path: Path
    read_only: bool


def in_session(env=os.environ) -> bool:
    """True inside a Backend.AI session's container (the agent sets these in every kernel)."""
    return any(env.get(name) for name in SESSION_VARS)


def batch_mode(env=os.environ) -> bool:
    """True in a batch session's startup command: the kernel runner sets _BACKEND_BATCH_MODE=1 for
    it (src/ai/backend/kernel/base.py run_subproc) and for nothing else. No variable names the
    session type otherwise, so False means interactive or unknown."""
    return env.get("_BACKEND_BATCH_MODE") == "1"


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash in paths as octal escapes (\\040)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _mountinfo(text: str) -> dict[Path, bool]:
    """Mount point -> read-only, from /proc/self/mountinfo (the last mount of a point wins)."""
    found = {}
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 6:
            found[Path(_unescape(fields[4]))] = "ro" in fields[5].split(",")
    return found


def persistent_mounts(env=os.environ, mountinfo: Path = Path("/proc/self/mountinfo")) -> list[Mount]:
    """The session's vfolder mounts, deepest path first; [] outside a session."""
    if not in_session(env):
        return []
    try:
        mounted = _mountinfo(mountinfo.read_text())
    except OSError:
        mounted = {}
    listed = env.get("BACKENDAI_PERSISTENT_PATHS")
    if listed is not None:
        paths = [Path(p) for p in listed.split(":") if p]
    else:
        paths = [p for p in mounted if p.parent != p and WORK in p.parents
                 and p.relative_to(WORK).parts[0] not in NOT_VFOLDERS]
    mounts = [Mount(p, mounted.get(p, False)) for p in paths]
    return sorted(mounts, key=lambda m: len(m.path.parts), reverse=True)


def mount_of(path: Path, mounts: list[Mount]) -> Mount | None:
    """The vfolder that holds `path` (resolved, or as it would resolve once made), if any."""
    where = Path(os.path.realpath(Path(path).absolute()))
    for mount in mounts:  # deepest first: a vfolder mounted inside another is its own
        if where == mount.path or mount.path in where.parents:
            return mount
    return None


def writable(mounts: list[Mount]) -> list[Mount]:
    return [m for m in mounts if not m.read_only]


def scratch_problem(role: str, path: Path, mounts: list[Mount], flag: str, env=os.environ) -> str | None:
    """Inside a session: why `path` is no place for `role` (on scratch, or on a read-only vfolder),
    with the flag and the vfolder to use instead; None when it persists (or outside a session)."""
    if not in_session(env):
        return None
    path = Path(path).absolute()
    holder = mount_of(path, mounts)
    if holder is not None and not holder.read_only:
        return None
    suggestion = advice(role, flag, mounts)
    if holder is not None:
        return f"{role} {path} is on the read-only vfolder {holder.path}: {suggestion}"
    return f"{role} {path} is on the session's scratch, deleted with the session: {suggestion}"


def require_persistent(role: str, path: Path, flag: str, scratch_ok: bool, env=os.environ) -> None:
    """A run's results on scratch are refused (UserError) unless the user accepts losing them."""
    if scratch_ok:
        return
    problem = scratch_problem(role, path, persistent_mounts(env), flag, env)
    if problem:
        raise UserError(f"{problem}; or pass --scratch-ok to keep them on scratch anyway")


def advice(role: str, flag: str, mounts: list[Mount]) -> str:
    """What to pass instead: the vfolder (one), the choice (several), or how to mount one (none)."""
    usable = writable(mounts)
    sub = "data" if role == "data" else "results"
    if len(usable) == 1:
        return f"use {flag} {usable[0].path / sub}"
    if usable:
        return f"use {flag} on one of the mounted vfolders ({', '.join(str(m.path) for m in usable)})"
    return ("mount a vfolder: `backend.ai vfolder create mlperf-data`, then create the session with "
            f"`-v mlperf-data` and use {flag} {WORK / 'mlperf-data' / sub}")


def default_dir(configured: str | Path, key: str, explicit: bool, env=os.environ) -> Path:
    """Where data (key "data_dir") or results ("results_dir") go when the user chose nothing.

    Outside a session, or when a flag or variable set it, or when the configured folder persists:
    the configured one. In a session whose configured folder (invoke.yaml's relative default, under
    the project) is on scratch and exactly one writable vfolder is mounted: that vfolder's data/ or
    results/, said on stderr, so the first run in a fresh session keeps what it makes.
    """
    path = Path(configured)
    if explicit or path.is_absolute() or not in_session(env):
        return path
    mounts = persistent_mounts(env)
    usable = writable(mounts)
    if mount_of(path, mounts) is not None or len(usable) != 1:
        return path
    chosen = usable[0].path / ("data" if key == "data_dir" else "results")
    flag = "--" + key.replace("_", "-")
    print(f"note: Backend.AI session: {path} would be on scratch; using the only vfolder mounted, "
          f"{chosen} ({flag} to choose)", file=sys.stderr)
    return chosen


def describe(path: Path, mounts: list[Mount], env=os.environ) -> str:
    """Where `path` lives, in words: "vfolder /home/work/x", "scratch (lost with the session)", ..."""
    if not in_session(env):
        return "local disk"
    holder = mount_of(path, mounts)
    if holder is None:
        return "scratch: deleted with the session"
    return f"vfolder {holder.path}" + (" (read-only)" if holder.read_only else "")


def print_paths(data_dir: Path, results_dir: Path, as_json: bool = False) -> dict:
    """`invoke paths`: the folders the steps use here (what `fab results` asks a host for)."""
    import json

    from mlperf.jobs import jobs_dir

    mounts = persistent_mounts()
    found = {"data_dir": data_dir, "results_dir": results_dir, "jobs_dir": jobs_dir(results_dir)}
    table = {key: {"path": str(Path(path).absolute()), "where": describe(path, mounts)}
             for key, path in found.items()}
    if as_json:
        print(json.dumps(table))
    else:
        for key, row in table.items():
            print(f"{key:12} {row['path']}  ({row['where']})")
    return table
