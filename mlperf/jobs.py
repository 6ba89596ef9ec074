"""Background jobs: a step run with --detach outlives the shell (or SSH connection) that started it.

A job is a folder <results_dir>/jobs/<id>/ holding
    job.json     id, task, command, working folder, wrapper pid, start time
    output.log   everything the step printed
    exitcode     the step's exit code, written (atomically) by the wrapper when the step ends
The wrapper (`python -m mlperf.jobs JOBDIR`) runs in its own session with stdin from /dev/null and
its output in output.log, so no terminal or SSH channel holds it; it starts the step, waits, and
records the exit code. No exitcode and no wrapper alive means the job was lost (killed, or the
machine restarted). Only the standard library (and mlperf.files) here: the wrapper imports this module.
"""
from __future__ import annotations

import json
import os
import secrets
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from mlperf import PROJECT_ROOT
from mlperf.errors import UserError
from mlperf.files import atomic_write, write_json

POLL_SECONDS = 0.3


@dataclass
class Job:
    folder: Path
    info: dict

    @property
    def id(self) -> str:
        return self.info["id"]

    @property
    def log(self) -> Path:
        return self.folder / "output.log"

    def exit_code(self) -> int | None:
        try:
            return int((self.folder / "exitcode").read_text().strip())
        except (FileNotFoundError, ValueError):
            return None

    def wrapper_alive(self) -> bool:
        """Is the wrapper process still there? Its command line names this job's folder,
        which guards against a recycled pid."""
        pid = self.info.get("pid")
        if not pid:  # job.json is written again with the pid right after the wrapper starts
            return time.time() - self.info.get("started", 0) < 10
        return _alive(pid, str(self.folder))

    def step_alive(self) -> bool:
        """Is the step itself still running (its wrapper may have been killed on its own)? Its
        command line is `python -m invoke <task> ...`, which guards against a recycled pid."""
        try:
            pid = int((self.folder / "step.pid").read_text())
        except (OSError, ValueError):
            return False
        return _alive(pid, "invoke")

    def state(self) -> str:
        if self.info.get("damaged"):
            return "damaged"
        code = self.exit_code()
        if code is not None:
            return "finished" if code == 0 else "failed"
        if self.wrapper_alive() or self.step_alive():  # a step without its wrapper: no exit code to come
            return "running"
        # The wrapper may have written exitcode between the two checks.
        code = self.exit_code()
        if code is not None:
            return "finished" if code == 0 else "failed"
        return "lost"


def _alive(pid: int, marker: str) -> bool:
    """Whether process `pid` runs and its command line holds `marker` (/proc, where there is one)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    cmdline = Path(f"/proc/{pid}/cmdline")
    if cmdline.exists():
        try:
            return marker in cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            return False
    return True


def jobs_dir(results_dir: Path) -> Path:
    return Path(results_dir) / "jobs"


def start(argv: list[str], folder: Path) -> Job:
    """Start `python -m invoke <argv>` as a job under `folder`; returns once it runs."""
    folder = Path(folder).resolve()
    job_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{argv[0]}-{secrets.token_hex(2)}"
    job_dir = folder / job_id
    folder.mkdir(parents=True, exist_ok=True)
    job_dir.mkdir(mode=0o700)  # output.log may hold what a step prints of the user's paths and hosts
    command = [sys.executable, "-m", "invoke", *argv]
    env = dict(os.environ)
    # The wrapper imports mlperf.jobs: make the project importable wherever the user stands.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"  # the log shows output as it happens
    from mlperf.datasets import redact_url

    env["MLPERF_JOB_COMMAND"] = json.dumps(command)  # the real one, for the wrapper alone
    info = {"id": job_id, "task": argv[0], "command": [redact_url(word) for word in command], "cwd": os.getcwd(),
            "started": time.time()}
    write_json(job_dir / "job.json", info)
    with open(job_dir / "output.log", "ab") as log:
        wrapper = subprocess.Popen(
            [sys.executable, "-m", "mlperf.jobs", str(job_dir)], stdin=subprocess.DEVNULL,
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env, close_fds=True,
        )
    info["pid"] = wrapper.pid
    write_json(job_dir / "job.json", info)
    print(f"started job {job_id}: {redact_url(shlex.join(['invoke', *argv]))}")
    print(f"  output: {job_dir / 'output.log'}")
    print(f"  follow it: invoke logs --job {job_id} --follow   (through Fabric: fab -H HOST logs --job "
          f"{job_id} --follow); list jobs: invoke status")
    return Job(job_dir, info)


def all_jobs(folder: Path) -> list[Job]:
    """Jobs under `folder`, oldest first."""
    found = []
    for info_file in Path(folder).resolve().glob("*/job.json"):
        try:
            info = json.loads(info_file.read_text())
        except OSError:
            continue  # a job folder being removed right now
        except ValueError:
            info = None
        if not (isinstance(info, dict) and isinstance(info.get("id"), str)
                and isinstance(info.get("started", 0), (int, float))):
            info = {"id": info_file.parent.name, "task": "?", "started": 0, "damaged": True}
        found.append(Job(info_file.parent, info))
    return sorted(found, key=lambda job: (job.info.get("started", 0), job.id))


def find(folder: Path, job_id: str | None) -> Job:
    found = all_jobs(folder)
    if not found:
        raise UserError(f"no background jobs in {folder}: start one with --detach (e.g. invoke train --detach)")
    if job_id is None:
        return found[-1]
    matches = [job for job in found if job.id == job_id] or [job for job in found if job.id.startswith(job_id)]
    if len(matches) != 1:
        raise UserError(f"no single job matches {job_id!r} in {folder}: see `invoke status` for the ids")
    return matches[0]


def status(folder: Path) -> list[Job]:
    """Print a table of the jobs under `folder`."""
    found = all_jobs(folder)
    if not found:
        print(f"no background jobs in {folder}")
        return found
    rows = [("id", "task", "state", "exit", "started", "log")]
    for job in found:
        code = job.exit_code()
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(job.info.get("started", 0)))
        rows.append((job.id, job.info.get("task", "?"), job.state(), "" if code is None else str(code),
                     started, str(job.log)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1])
    return found


def logs(folder: Path, job_id: str | None = None, follow: bool = False) -> int:
    """Print a job's output; with follow, keep printing until it ends and return its exit code."""
    job = find(folder, job_id)
    out = sys.stdout.buffer
    with open(job.log, "rb") as fh:
        while True:
            chunk = fh.read(65536)
            if chunk:
                out.write(chunk)
                out.flush()
                continue
            if not follow:
                return 0
            state = job.state()
            if state == "running":
                time.sleep(POLL_SECONDS)
                continue
            rest = fh.read()  # what the step wrote just before it ended
            out.write(rest)
            out.flush()
            if state == "lost":
                raise UserError(f"job {job.id} was lost: its process ended without recording an exit "
                                "code (killed, or the machine restarted); the output above is all there is")
            code = job.exit_code()
            print(f"job {job.id} {state} with exit code {code}", file=sys.stderr)
            return code


def _wrap(job_dir: Path) -> int:
    """The wrapper's body: run the step (its command comes in MLPERF_JOB_COMMAND, not from job.json,
    which shows it with any secret in a URL hidden), note its pid, then record its exit code."""
    info = json.loads((job_dir / "job.json").read_text())
    command = json.loads(os.environ.pop("MLPERF_JOB_COMMAND"))
    try:
        step = subprocess.Popen(command, cwd=info["cwd"], stdin=subprocess.DEVNULL)
    except OSError as exc:
        print(f"error: could not start {command[0]}: {exc}", flush=True)
        code = 127
    else:
        atomic_write(job_dir / "step.pid", str(step.pid))  # job.json is the starter's to write
        code = step.wait()
    if code < 0:  # killed by a signal: record it the way a shell would
        code = 128 - code
    atomic_write(job_dir / "exitcode", f"{code}\n")
    return code


if __name__ == "__main__":
    sys.exit(_wrap(Path(sys.argv[1])))
