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
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from mlperf.errors import UserError
from mlperf.files import UnsafeName, human_size, inside, plain_name, rename, shown
from mlperf.storage import WORK   # a session's home: scratch, except for the vfolders mounted under it

CLIENT = "backend.ai"
ARCH = "x86_64"            # what the image is built for; the client's default is this machine's (arm64 on a Mac)
EXIT_MARK = "invoke session: the benchmark exited with code"   # the batch result says only SUCCESS/FAILURE
ENV_PREFIXES = ("NCCL_", "MLPERF_", "TORCH_")
ENDED = {"TERMINATED", "CANCELLED", "ERROR"}
NOT_STARTED = {"PENDING", "SCHEDULED", "PREPARING", "PULLING"}
INFO_FIELDS = "id,name,type,status,status_info,status_data,result,image,cluster_size,mounts,created_at,terminated_at"
_NAME = re.compile(r"^(?=.{4,64}$)\w[\w.-]*\w$", re.ASCII)     # the manager's rule (23.09 api/session.py)
_VFOLDER = re.compile(r"^[A-Za-z0-9_][\w.-]*$", re.ASCII)       # no ':' or '=': the client splits -v on them
_SIZE = re.compile(r"^(\d+(?:\.\d+)?)([kmgtp]?)$", re.IGNORECASE)
_HTTP_STATUS = re.compile(r"BackendAPIError(?::\s*|\()(\d{3})")
DOWNLOAD_BATCH = 50        # files per `vfolder download` call: one client start for many small logs
LIST_THREADS = 8           # `vfolder ls` calls at once
GREETING_CAP = 64 * 1024   # the manager's greeting is a few dozen bytes; more is not a greeting
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


# --- the client -----------------------------------------------------------------------------------

def client_settings(environ=os.environ, cwd: Path | None = None) -> dict:
    """The BACKEND_* settings the client will use: the environment, overridden (as the client does)
    by the first .env found from the current folder upwards."""
    settings = {k: v for k, v in environ.items() if k.startswith(("BACKEND_", "SORNA_"))}
    folder = Path(cwd or os.getcwd()).resolve()
    for candidate in (folder, *folder.parents):
        dotenv = candidate / ".env"
        if dotenv.is_file():
            try:
                lines = dotenv.read_text(errors="replace").splitlines()
            except OSError:
                break
            for line in lines:
                key, sep, value = line.strip().removeprefix("export ").partition("=")
                if sep and key.strip().startswith(("BACKEND_", "SORNA_")):
                    settings[key.strip()] = value.strip().strip("'\"")
            break
    return settings


def redact(text: str, settings: dict | None = None) -> str:
    """`text` with the client's access and secret keys (wherever they were read from) as ***."""
    settings = client_settings() if settings is None else settings
    for prefix in ("BACKEND_", "SORNA_"):
        for key in ("ACCESS_KEY", "SECRET_KEY"):
            secret = settings.get(prefix + key, "")
            if len(secret) >= 4:
                text = text.replace(secret, "***")
    return text


def client_requirement(manager: str) -> tuple[str, str]:
    """(pip requirement, Python minor) of the client for a manager release, e.g. 23.09.11 ->
    ("'backend.ai-client~=23.9.0' 'yarl<1.17.1'", "3.11"): the client pins one Python minor per release
    (23.09: 3.11; 24.x to 25.5: 3.12; 25.6 on: 3.13), and 23.9.10, the last 23.09 on PyPI, cannot sign
    requests with yarl 1.17.1 or later (fixed upstream in lablup/backend.ai#3544, never released)."""
    m = re.match(r"(\d+)\.(\d+)", manager)
    major, minor = (int(m.group(1)), int(m.group(2))) if m else (0, 0)
    python = "3.10" if major < 23 else "3.11" if major == 23 else "3.12" if (major, minor) < (25, 6) else "3.13"
    requirement = f"'backend.ai-client~={major}.{minor}.0'" + (" 'yarl<1.17.1'" if major == 23 else "")
    return requirement, python


def manager_version(endpoint: str | None, timeout: float = 5) -> str | None:
    """The manager's release from its unauthenticated greeting (GET / answers {"version", "manager"}),
    or None: read at most GREETING_CAP bytes within `timeout` in all (a manager that trickles or sends
    without end is no help), and only a short plain version is taken."""
    if not endpoint:
        return None
    deadline = time.monotonic() + timeout
    body = b""
    try:
        with urllib.request.urlopen(endpoint.split(",")[0].strip(), timeout=timeout) as answer:
            while len(body) <= GREETING_CAP and time.monotonic() < deadline:
                chunk = answer.read1(GREETING_CAP + 1 - len(body))   # one socket read: a trickle can't hold it
                if not chunk:
                    break
                body += chunk
            else:
                return None
        version = json.loads(body).get("manager")
    except (OSError, ValueError, AttributeError, RecursionError):
        return None
    return version if isinstance(version, str) and re.fullmatch(r"\d+\.\d+[\w.+-]{0,30}", version) else None


def install_hint(client: str) -> str:
    from mlperf.datasets import redact_url

    settings = client_settings()
    endpoint = settings.get("BACKEND_ENDPOINT") or settings.get("SORNA_ENDPOINT")
    version = manager_version(endpoint)
    then = ("then put ~/.backendai/bin on PATH or set INVOKE_MLPERF_SESSION_CLIENT=~/.backendai/bin/backend.ai "
            "(mlperf.session.client)")
    if version:
        requirement, python = client_requirement(version)
        return (f"the Backend.AI client `{client}` is not installed (or not on PATH); your manager "
                f"({redact_url(endpoint.split(',')[0].strip())}) is {version}, whose client needs Python {python}: "
                f"python{python} -m venv ~/.backendai && ~/.backendai/bin/pip install {requirement}, {then}")
    return (f"the Backend.AI client `{client}` is not installed (or not on PATH): install the release of your "
            "manager's version (`curl $BACKEND_ENDPOINT` shows it) with the Python that release pins (23.09: 3.11; "
            "24.x to 25.5: 3.12; 25.6 and 26.x: 3.13), e.g. python3.12 -m venv ~/.backendai && "
            f"~/.backendai/bin/pip install 'backend.ai-client~=24.9.0', {then}")


def older_client() -> str:
    settings = client_settings()
    version = manager_version(settings.get("BACKEND_ENDPOINT") or settings.get("SORNA_ENDPOINT"))
    requirement, python = client_requirement(version) if version else ("'backend.ai-client~=MAJOR.MINOR.0'", "")
    return (f"your backend.ai client is older than the manager{f' ({version})' if version else ''}: if a request "
            f"fails, install the matching client{f' with Python {python}' if python else ''}: "
            f"pip install {requirement}")


def find_client(client: str | None) -> str:
    name = os.path.expanduser(client or CLIENT)
    exe = shutil.which(name)
    if exe is None:
        raise UserError(install_hint(name))
    return exe


def run_client(exe: str, args: list[str], *, timeout: float = 120) -> subprocess.CompletedProcess:
    """The client with this environment (where its credentials are), minus what would make its Python
    load this project's packages instead of its own."""
    try:
        return subprocess.run([exe, *args], env=client_env(), capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:   # the 23.09 client hangs after some errors it does not catch
        words = args[2:] if args[:1] == ["--output"] else args
        what = " ".join(words[:1] if words[:1] == ["ps"] else words[:2])
        stuck = subprocess.CompletedProcess(exc.cmd, 1, _text(exc.stdout), _text(exc.stderr))
        error = client_error(stuck, what)
        if str(error).startswith(f"backend.ai {what} failed"):   # nothing recognisable in what it printed
            error = UserError(f"`backend.ai {what}` got no answer within {timeout:.0f} s: check "
                              "BACKEND_ENDPOINT and the manager")
        raise error from None


def client_env() -> dict:
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}


def _text(output) -> str:
    return output.decode(errors="replace") if isinstance(output, bytes) else (output or "")


def client_error(proc: subprocess.CompletedProcess, action: str, *, name: str | None = None,
                 image: str | None = None, vfolder: str | None = None) -> UserError:
    """One line for a failed client call, from what the 23.09 client prints (its exit code is 1 for
    every failure, so the text decides): what went wrong and what to do."""
    from mlperf.datasets import redact_url

    text = redact(f"{proc.stdout}\n{proc.stderr}")
    low = text.lower()
    status = int(m.group(1)) if (m := _HTTP_STATUS.search(text)) else None
    detail = _detail(text)
    if "object has no attribute 'netloc'" in text:
        return UserError("this backend.ai-client cannot sign requests with the yarl it has (1.17.1 or later): "
                         "pip install 'yarl<1.17.1' into the client's environment")
    if "request to the api endpoint has failed" in low:
        return UserError("cannot reach the Backend.AI manager: check BACKEND_ENDPOINT (or the .env the client "
                         "reads) and your network")
    if "date/time sync error" in low:
        return UserError("the manager refused the request: this machine's clock is more than 15 minutes off "
                         "the manager's; set it right (NTP) and try again")
    if status == 401 or "auth-failed" in low or "invalid-auth-params" in low:
        kind = "401 auth-failed" if status == 401 or "auth-failed" in low else f"{status} invalid-auth-params"
        return UserError(f"the manager refused the credentials ({kind}{': ' + detail if detail else ''}): "
                         "check BACKEND_ACCESS_KEY and BACKEND_SECRET_KEY (or the .env the client reads) "
                         "against your keypair, and BACKEND_ENDPOINT")
    return _object_error(low, status, detail, action, name=name, image=image, vfolder=vfolder) or UserError(
        f"backend.ai {action} failed{f' ({status})' if status else ''}: "
        f"{redact_url(detail or _said(_last_line(text)) or f'exit code {proc.returncode}')}")


def _said(value, limit: int = 300) -> str:
    """A value from the manager in a message or a status line: as it is where mlperf.files.shown would
    not change it (plain, short text reads better unquoted), else as shown renders it."""
    rendered = shown(value, limit)
    return value if isinstance(value, str) and rendered == repr(value) else rendered


def _object_error(low: str, status, detail: str, action: str, *, name, image, vfolder) -> UserError | None:
    """The errors about what a request names: the image, the vfolder, the session, the resources."""
    if "image reference" in low or "environment image" in low or "unknown image" in low:
        from mlperf.image import has_registry

        registry = image.split("/", 1)[0] if image and has_registry(image) else "REGISTRY"
        return UserError(f"Backend.AI does not know the image {image}: push it and have an admin register it "
                         f"with `backend.ai admin image rescan -r {registry}` (25.1+: add -p PROJECT for one "
                         "Harbor project), or pass --image with a name `backend.ai admin image list` shows")
    if "virtual folder" in low and (status == 404 or "not found" in low):
        return UserError(f"there is no vfolder {vfolder} you can mount: create it with "
                         f"`backend.ai vfolder create {vfolder}` (data/ and results/ go there), or pass --vfolder")
    if "session-already-exists" in low or "session already exists" in low:
        return UserError(f"a session named {name} exists already: pick another --name, or watch that one "
                         f"with `invoke session.status {name}`")
    if "no such session" in low:
        return UserError(f"there is no active session named {name} (it ended, or never existed): "
                         f"`invoke session.status {name}` shows how it ended")
    if "quota-exceeded" in low or "resource limit" in low:
        return UserError(f"Backend.AI refused {action}: you have reached your resource limit "
                         f"({detail or 'keypair resource policy'}); end other sessions or ask for more")
    if "invalid-api-params" in low or "missing or invalid api parameters" in low:
        return UserError(f"Backend.AI refused {action}: {detail or 'invalid parameters'}")
    return None


def _detail(text: str) -> str:
    """The server's message in the client's error print: `➜ Message: ...` or `- ...` lines."""
    found = re.findall(r"\u279c Message: (.+)", text) or re.findall(r"^\s*- (.+)$", text, re.M)
    if not found:
        found = re.findall(r"'msg': '([^']+)'", text)   # --output json prints the error's repr
    if not found:
        found = re.findall(r'^\s*"error": "(.+)",?\s*$', text, re.M)   # ... or its own failure's text
    return _said("; ".join(part.strip() for part in found)) if found else ""


def _last_line(text: str) -> str:
    lines = [ln.strip(" \u2718\u2714") for ln in text.splitlines() if ln.strip() and "Traceback" not in ln]
    return lines[-1] if lines else ""


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
    name, state = _said(info.get("name"), 64), _said(info.get("status"), 40)
    what = f"{_said(str(info.get('type', '')).lower(), 20)}, {info.get('cluster_size') or 1} node(s), " \
           f"{_said(info.get('image'))}"
    mounts = [_said(m, 64) for m in info.get("mounts") or [] if not str(m).startswith(".")]
    head = f"session {name} ({what}{', vfolder ' + ', '.join(mounts) if mounts else ''}): {state}"
    reason = _reason(info.get("status_data"), info.get("status_info"))
    if info.get("status") in ENDED:
        never = info.get("status_info") == "failed-to-start"
        exit_text = f"exit code {code}" if code is not None else "it never ran" if never else \
            "exit code unknown (no exit line in its console)"
        advice = _start_advice(info.get("status_data")) if never else ""
        return f"{head} at {_said(info.get('terminated_at'), 40)}, result {_said(info.get('result'), 20)}, " \
               f"{exit_text}" + (f" ({reason})" if reason else "") + \
               (f"\n  it never started{advice}" if advice else "")
    if info.get("status") in NOT_STARTED:
        return (f"{head}{': ' + reason if reason else ''}\n  it starts on its own when Backend.AI has the "
                f"resources; watch: invoke session.status {name}; cancel: invoke session.destroy {name}")
    return f"{head} since {_said(info.get('created_at'), 40)}\n  follow it: invoke session.logs {name} --follow"


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
    errors = list(dict.fromkeys(_said(e.get("repr") or e.get("name")) for e in _agent_errors(data)))   # once each
    messages = [_said(m) for m in [info, *failed, scheduler.get("msg")] if m] + errors[:3]
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
                print(f"session {name} is {_said(state)}: no console yet", file=sys.stderr, flush=True)
            waiting = True
            if not follow:
                return 0
        else:
            printed = _emit(printed, final_console(exe, name, state) if state in ENDED else console(exe, name), out)
            if not printed and state in ENDED:
                print(f"session {name} is {_said(state)} and left no console", file=sys.stderr)
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
        raise UserError(f"session {name} mounts {', '.join(_said(m, 64) for m in mounts) or 'no vfolder'}: name the "
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
        return subprocess.CompletedProcess(argv, proc.returncode, _text(out.read()), _text(err.read()))


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
