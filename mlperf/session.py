"""Backend.AI batch sessions from your own machine: `invoke session.create|status|logs|results|destroy`.

A batch session runs one startup command and ends when it finishes, and Backend.AI's idle checkers
leave batch sessions alone, so the benchmark runs for hours with no terminal, tunnel or SSH session
kept open. The startup command is `invoke all` from the image `invoke image` built, with every path
on the mounted vfolder (the rest of /home/work is scratch that goes with the session); the results
come back from the vfolder afterwards, when the session itself is gone.

It drives the user's own `backend.ai` CLI and never imports it: the client's release must match the
manager's and each release pins one Python minor, so it lives in its own environment. Credentials
stay in the client's configuration (BACKEND_* variables or the .env file it reads); no command line
made here holds them, and all the client prints passes through `redact` before it is shown.

The manager and its storage proxy are outside parties: every name they list that becomes a local
path passes mlperf.files.inside, every value of theirs in a message passes mlperf.files.shown, their
answers are checked for the types used, and every call to them is bounded (a timeout, or for
downloads a minimum rate), so a broken or hostile one costs an error line, never a hang or a file
written outside --results-dir.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from mlperf.errors import UserError
from mlperf.files import UnsafeName, human_size, inside, plain_name, rename, shown
from mlperf.backendai_cli import (CLIENT, client_env, client_error, find_client, older_client, redact, run_client,
                                     said, text_of)
from mlperf.storage import WORK   # a session's home: scratch, except for the vfolders mounted under it

ARCH = "x86_64"            # what the image is built for; the client's default is this machine's (arm64 on a Mac)
EXIT_MARK = "invoke session: the benchmark exited with code"   # the batch result says only SUCCESS/FAILURE
ENV_PREFIXES = ("NCCL_", "MLPERF_", "TORCH_")
ENDED = {"TERMINATED", "CANCELLED", "ERROR"}
NOT_STARTED = {"PENDING", "SCHEDULED", "PREPARING", "PULLING"}
INFO_FIELDS = "id,name,type,status,status_info,status_data,result,image,cluster_size,mounts,created_at,terminated_at"
_NAME = re.compile(r"^(?=.{4,64}$)\w[\w.-]*\w$", re.ASCII)     # the manager's rule (23.09 api/session.py)
_VFOLDER = re.compile(r"^[A-Za-z0-9_][\w.-]*$", re.ASCII)       # no ':' or '=': the client splits -v on them
_SIZE = re.compile(r"^(\d+(?:\.\d+)?)([kmgtp]?)$", re.IGNORECASE)
DOWNLOAD_BATCH = 50        # files per `vfolder download` call: one client start for many small logs
LIST_THREADS = 8           # `vfolder ls` calls at once
STATUS_DATA_CAP = 1 << 20  # status_data is a small JSON document (scheduler retries, an error's repr)
STALL_SECONDS = 60.0       # a download that gains less than MIN_RATE for this long is given up
MIN_RATE = 1024            # bytes per second; a new file begun counts as progress too (many small logs)
CLIENT_START = 20.0        # the client's own start (imports, the greeting) before its first file


# --- the session's spec --------------------------------------------------------------------------

@dataclass(frozen=True)
class Spec:
    name: str
    image: str
    vfolder: str
    dataset: str
    runs: int
    gpus: int
    nodes: int
    cpu: str
    mem: str
    shmem: str
    max_wait: int
    env: dict = field(default_factory=dict)

    def startup_command(self) -> str:
        root = f"{WORK}/{self.vfolder}"
        argv = ["invoke", "all", "--dataset", self.dataset, "--data-dir", f"{root}/data",
                "--results-dir", f"{root}/results", "--runs", str(self.runs)]
        if self.nodes > 1:
            argv += ["--nodes", "all"]
        # Run through /bin/sh by the kernel runner; the exit code goes to the console, where
        # `status` finds it, since Backend.AI 23.09 keeps only SUCCESS or FAILURE.
        return f'{shlex.join(argv)}; code=$?; echo "{EXIT_MARK} $code"; exit $code'

    def argv(self, client: str = CLIENT) -> list[str]:
        """`backend.ai session create ...` as the 23.09 client (and later ones) spell it."""
        argv = [client, "session", "create", "--type", "batch", "--name", self.name, "--arch", ARCH,
                "--no-reuse", "--max-wait", str(self.max_wait)]
        if self.nodes > 1:
            argv += ["--cluster-size", str(self.nodes), "--cluster-mode", "multi-node"]
        argv += ["-r", f"cpu={self.cpu}", "-r", f"mem={self.mem}"]
        if self.gpus:
            argv += ["-r", f"cuda.device={self.gpus}"]
        argv += ["--resource-opts", f"shmem={self.shmem}", "-v", self.vfolder]
        for key, value in sorted(self.env.items()):
            argv += ["-e", f"{key}={value}"]
        return argv + ["-c", self.startup_command(), self.image]

    def as_request(self) -> dict:
        """What the manager is asked for, in the names of its REST API (POST /session)."""
        resources = {"cpu": self.cpu, "mem": self.mem, **({"cuda.device": str(self.gpus)} if self.gpus else {})}
        return {"name": self.name, "type": "batch", "image": self.image, "architecture": ARCH,
                "cluster_size": self.nodes, "cluster_mode": "multi-node" if self.nodes > 1 else "single-node",
                "resources": resources, "resource_opts": {"shmem": self.shmem}, "mounts": [self.vfolder],
                "mount_path": f"{WORK}/{self.vfolder}", "environ": dict(sorted(self.env.items())),
                "startup_command": self.startup_command(), "max_wait_seconds": self.max_wait}


def default_image(tag: str | None, base: str) -> str:
    """The image `invoke image` builds: mlperf.image.tag, else its default name for the base."""
    from mlperf.image import default_tag

    return tag or default_tag(base)


def make_spec(*, name, image, vfolder, dataset, runs, gpus, nodes, cpu, mem, shmem, per_gpu: dict,
              max_wait, environ=os.environ) -> Spec:
    """A checked Spec from the task's options; --cpu/--mem/--shmem default to per_gpu times --gpus."""
    from mlperf.datasets import available

    if dataset not in available():   # the image holds the same catalog
        raise UserError(f"unknown dataset {dataset!r}: choose one of {', '.join(available())}")
    gpus, nodes = _count(gpus, "--gpus", 0), _count(nodes, "--nodes", 1)
    factor = max(gpus, 1)
    name = name or f"mlperf-{dataset}-{datetime.now():%Y%m%d-%H%M%S}"
    check_name(name)
    check_vfolder(vfolder)
    if not str(image) or str(image).startswith("-") or any(ch.isspace() for ch in str(image)):
        # the client takes the image as its last argument: "--help" there would be its own option
        raise UserError(f"--image {shown(str(image))} is not an image name (a name cannot start with '-' or hold "
                        "spaces): pass the name `backend.ai admin image list` shows")
    cpu = _resource(cpu, "cpu", per_gpu, factor)
    if not re.fullmatch(r"\d+(\.\d+)?", cpu) or float(cpu) <= 0:
        raise UserError(f"--cpu {cpu!r} is not a positive number of CPU cores")
    mem, shmem = _resource(mem, "mem", per_gpu, factor), _resource(shmem, "shmem", per_gpu, factor)
    env = {k: v for k, v in environ.items() if k.startswith(ENV_PREFIXES)}
    return Spec(name=name, image=str(image), vfolder=str(vfolder), dataset=str(dataset),
                runs=_count(runs, "--runs", 1), gpus=gpus, nodes=nodes, cpu=cpu, mem=mem, shmem=shmem,
                max_wait=_count(max_wait, "mlperf.session.max_wait", 0), env=env)


def check_vfolder(vfolder, flag: str = "--vfolder") -> str:
    """A vfolder name the client takes as such (not an option, no ':' or '=' it would split -v on)."""
    if not isinstance(vfolder, str) or not _VFOLDER.match(vfolder):
        raise UserError(f"{flag} {shown(vfolder)} is not a vfolder name (letters, digits, _ . -, not starting "
                        "with a dot or -): name the storage folder that holds data/ and results/")
    return vfolder


def check_name(name: str) -> None:
    if not _NAME.match(str(name)):
        raise UserError(f"{shown(str(name))} is not a Backend.AI session name: 4 to 64 letters, digits, _ . -, "
                        "starting and ending with a letter or digit")


def _count(value, flag: str, minimum: int) -> int:
    try:
        number = int(str(value))
    except ValueError:
        number = None
    if number is None or number < minimum:
        raise UserError(f"{flag} {value!r} is not a whole number >= {minimum}")
    return number


def _resource(given, key: str, per_gpu: dict, factor: int) -> str:
    """--cpu/--mem/--shmem as given, else mlperf.session.per_gpu.<key> times `factor` (32g x 8: 256g)."""
    if given not in (None, ""):
        if key != "cpu" and not _SIZE.match(str(given)):
            raise UserError(f"--{key} {given!r} is not a size like 256g or 512m")
        return str(given).lower()
    m = _SIZE.match(str(per_gpu.get(key, "")))
    if not m:
        raise UserError(f"mlperf.session.per_gpu.{key} {per_gpu.get(key)!r} is not a number or a size like 32g: "
                        "fix invoke.yaml")
    return f"{float(m.group(1)) * factor:g}{m.group(2).lower()}"


# --- the tasks --------------------------------------------------------------------------------------

def create(spec: Spec, *, dry_run: bool = False, client: str | None = None) -> None:
    """Create the batch session (or, dry run, print the client command and the spec)."""
    from mlperf.datasets import redact_url

    if dry_run:
        print(redact(redact_url(shlex.join(spec.argv()))))
        print(redact(json.dumps({"session": spec.as_request()}, indent=2)))
        print("dry run: nothing was created")
        return
    exe = find_client(client)
    print(f"creating batch session {spec.name} ({spec.nodes} node(s), {spec.gpus} GPU(s) each, {spec.image}); "
          f"waiting up to {spec.max_wait} s for it to start", flush=True)
    proc = run_client(exe, spec.argv(exe)[1:], timeout=spec.max_wait + 300)
    text = f"{proc.stdout}\n{proc.stderr}"
    if "server API version is higher than the client" in text:   # the client's own APIVersionWarning
        print(f"warning: {older_client()}", file=sys.stderr)
    if proc.returncode != 0:
        raise client_error(proc, "session create", name=spec.name, image=spec.image, vfolder=spec.vfolder)
    if "has an error during scheduling/startup or cancelled" in text:
        try:
            info = session_info(exe, spec.name)
        except UserError:
            info = None
        reason = _reason(info.get("status_data"), info.get("status_info")) if info else ""
        reason = reason or "error while scheduling or starting, or cancelled"
        advice = _start_advice(info.get("status_data")) if info else ""
        raise UserError(f"session {spec.name} failed to start ({reason}){advice}; "
                        f"`invoke session.status {spec.name}` shows it again")
    if "still on the job queue" in text or "enqueued for scheduling" in text:
        print(f"session {spec.name} is queued: it has not started within {spec.max_wait} s (not enough free "
              f"resources yet, or its image is still being pulled) and starts on its own; watch it with "
              f"`invoke session.status {spec.name}`, cancel it with `invoke session.destroy {spec.name}`")
        return
    state = "ended already" if "already terminated" in text else "started"
    print(f"session {spec.name} {state}; inside it runs: {spec.startup_command().split(';')[0]}\n"
          f"  follow it:       invoke session.logs {spec.name} --follow\n"
          f"  state, exit:     invoke session.status {spec.name}\n"
          f"  results, after:  invoke session.results {spec.name}   (from vfolder {spec.vfolder}, results/)")


def session_info(exe: str, name: str) -> dict | None:
    """The newest session of that name as `backend.ai ps` reports it (GraphQL), or None."""
    check_name(name)
    proc = run_client(exe, ["--output", "json", "ps", "--all", "--filter", f'name == "{name}"',
                            "--order=-created_at", "--limit", "1", "--format", INFO_FIELDS], timeout=60)
    try:
        answer = json.loads(proc.stdout)
    except ValueError:
        answer = None
    if proc.returncode != 0 or not isinstance(answer, dict) or "error" in answer:
        raise client_error(proc, "ps", name=name)
    items = answer.get("items") or []
    if not isinstance(items, list):
        raise _odd_answer(name, "items", items, "a list")
    return _checked_info(items[0], name) if items else None


# What `ps` gives for each field used here, by type; anything else is the manager's error, said in one line.
_INFO_TYPES = {"name": str, "type": str, "status": str, "status_info": str, "result": str, "image": str,
               "created_at": str, "terminated_at": str, "status_data": (str, dict), "cluster_size": int,
               "mounts": list}


def _checked_info(item, name: str) -> dict:
    if not isinstance(item, dict):
        raise _odd_answer(name, "the session", item, "a mapping")
    for key, kind in _INFO_TYPES.items():
        value = item.get(key)
        if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
            raise _odd_answer(name, key, value, "a list" if kind is list else "a number" if kind is int else "text")
        if kind is list and value is not None and not all(isinstance(v, str) for v in value):
            raise _odd_answer(name, key, next(v for v in value if not isinstance(v, str)), "a list of names")
    return item


def _odd_answer(name: str, key: str, value, wanted: str) -> UserError:
    return UserError(f"the manager answered `backend.ai ps` for session {name} with {key} {shown(value)}, not "
                     f"{wanted}: it is not the Backend.AI manager this tool knows (check BACKEND_ENDPOINT), "
                     "or it is broken: tell its admin")


def _known(exe: str, name: str) -> dict:
    info = session_info(exe, name)
    if info is None:
        raise UserError(f"there is no session named {name}: `backend.ai ps --all` lists yours")
    return info


def console(exe: str, name: str) -> str:
    """The session's console (its main container's output; kept by the manager after it ends)."""
    proc = run_client(exe, ["session", "logs", name])
    if proc.returncode != 0:
        raise client_error(proc, "session logs", name=name)
    text = proc.stdout[:-1] if proc.stdout.endswith("\n") else proc.stdout   # the client adds one
    return redact(text)


def exit_code_in(text: str) -> int | None:
    codes = re.findall(rf"^{re.escape(EXIT_MARK)} (-?\d+)\s*$", text, re.M)
    return int(codes[-1]) if codes else None


def describe(info: dict, code: int | None) -> str:
    """A session's state in a line or two: what it is, where it stands, what the scheduler says."""
    name, state = said(info.get("name"), 64), said(info.get("status"), 40)
    what = f"{said(str(info.get('type', '')).lower(), 20)}, {info.get('cluster_size') or 1} node(s), " \
           f"{said(info.get('image'))}"
    mounts = [said(m, 64) for m in info.get("mounts") or [] if not str(m).startswith(".")]
    head = f"session {name} ({what}{', vfolder ' + ', '.join(mounts) if mounts else ''}): {state}"
    reason = _reason(info.get("status_data"), info.get("status_info"))
    if info.get("status") in ENDED:
        never = info.get("status_info") == "failed-to-start"
        exit_text = f"exit code {code}" if code is not None else "it never ran" if never else \
            "exit code unknown (no exit line in its console)"
        advice = _start_advice(info.get("status_data")) if never else ""
        return f"{head} at {said(info.get('terminated_at'), 40)}, result {said(info.get('result'), 20)}, " \
               f"{exit_text}" + (f" ({reason})" if reason else "") + \
               (f"\n  it never started{advice}" if advice else "")
    if info.get("status") in NOT_STARTED:
        return (f"{head}{': ' + reason if reason else ''}\n  it starts on its own when Backend.AI has the "
                f"resources; watch: invoke session.status {name}; cancel: invoke session.destroy {name}")
    return f"{head} since {said(info.get('created_at'), 40)}\n  follow it: invoke session.logs {name} --follow"


def _status_data(data) -> dict:
    """status_data as a mapping (GraphQL gives it as a JSON string), {} where it is not one."""
    if isinstance(data, str):
        try:
            data = json.loads(data) if len(data) <= STATUS_DATA_CAP else {}
        except (ValueError, RecursionError):
            data = {}
    return data if isinstance(data, dict) else {}


def _agent_errors(data) -> list[dict]:
    """The errors of a session that failed to start. 23.09's dispatcher stores convert_to_status_data
    of what start_session raised: {"error": {"src", "name", "repr", "collection": [one per agent's
    error]}} for the MultiAgentError it gets, whose own repr says only how many."""
    error = _status_data(data).get("error")
    if not isinstance(error, dict):
        return []
    found = [e for e in error.get("collection") or [] if isinstance(e, dict)] \
        if isinstance(error.get("collection"), list) else []
    return found or [error]


def _reason(data, info) -> str:
    data = _status_data(data)
    scheduler = data.get("scheduler") if isinstance(data.get("scheduler"), dict) else {}
    predicates = scheduler.get("failed_predicates")
    failed = [p.get("msg") or p.get("name") for p in predicates if isinstance(p, dict)] \
        if isinstance(predicates, list) else []
    errors = list(dict.fromkeys(said(e.get("repr") or e.get("name")) for e in _agent_errors(data)))   # once each
    messages = [said(m) for m in [info, *failed, scheduler.get("msg")] if m] + errors[:3]
    return "; ".join(messages) + (f"; and {len(errors) - 3} more" if len(errors) > 3 else "")


def _start_advice(data) -> str:
    """What to do about a failed start, where the agent's error says it (else nothing)."""
    names = {e.get("name") for e in _agent_errors(data)}
    if "UnsupportedBaseDistroError" in names:
        return (": the agent runs only images whose ai.backend.base-distro label starts with ubuntu, centos or "
                "alpine; rebuild it with one of those, e.g. `invoke image --distro ubuntu22.04` for a Debian 12 "
                "base (its glibc 2.36 is at least the 2.35 that label promises)")
    return ": fix what the agent reports, then create the session again" if names else ""


def final_console(exe: str, name: str, state: str) -> str:
    """An ended session's console, or "" where there is none (a session cancelled before it ran)."""
    if state == "CANCELLED":
        return ""
    try:
        return console(exe, name)
    except UserError:
        return ""


def status(name: str, *, client: str | None = None) -> int:
    """Print the session's state; return its exit code once it ended (ended_code), else 0."""
    check_name(name)
    exe = find_client(client)
    info = _known(exe, name)
    state = info.get("status")
    code = exit_code_in(final_console(exe, name, state)) if state in ENDED else None
    print(describe(info, code))
    return ended_code(info, code) if state in ENDED else 0


def ended_code(info: dict, code: int | None) -> int:
    """An ended session's exit code: the benchmark's where its console says it, else 0 for result
    SUCCESS and 1 otherwise (a session cancelled or never started)."""
    return code if code is not None else (0 if info.get("result") == "SUCCESS" else 1)


def logs(name: str, *, follow: bool = False, client: str | None = None, poll: float = 10,
         out=sys.stdout) -> int:
    """Print the session's console; --follow: keep printing what is new until it ends, then return its
    exit code (ended_code)."""
    check_name(name)
    exe = find_client(client)
    printed, waiting = "", False
    while True:
        info = _known(exe, name)
        state = info.get("status")
        if state in NOT_STARTED:   # no container yet, so no console to ask for
            if not waiting or not follow:
                print(f"session {name} is {said(state)}: no console yet", file=sys.stderr, flush=True)
            waiting = True
            if not follow:
                return 0
        else:
            printed = _emit(printed, final_console(exe, name, state) if state in ENDED else console(exe, name), out)
            if not printed and state in ENDED:
                print(f"session {name} is {said(state)} and left no console", file=sys.stderr)
            if not follow:
                return 0
        if state in ENDED:
            code = exit_code_in(printed)
            print(describe(info, code), file=sys.stderr)
            return ended_code(info, code)
        time.sleep(poll)


def _emit(printed: str, text: str, out) -> str:
    """Write the part of `text` that follows what was printed already; the console is fetched whole
    each time, and one kept by the manager after the end may start later than the live one did."""
    if not text:
        return printed
    if text.startswith(printed):
        new = text[len(printed):]
    else:
        tail = printed[-2000:]
        at = text.rfind(tail) if tail else -1
        new = text[at + len(tail):] if at >= 0 else text
    out.write(new)
    out.flush()
    return text


def destroy(name: str, *, client: str | None = None) -> None:
    check_name(name)
    exe = find_client(client)
    proc = run_client(exe, ["session", "destroy", name])
    if proc.returncode != 0:
        raise client_error(proc, "session destroy", name=name)
    print(f"session {name}: terminated (what it wrote to its vfolder stays; invoke session.results {name})")


# --- results: from the vfolder, since a batch session is gone when its command ends ---------------

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
    vfolder = check_vfolder(vfolder) if vfolder is not None else session_vfolder(_known(exe, name), name)
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
    if not _VFOLDER.match(mounts[0]):
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
