"""Before `invoke train --nodes all`: every other host of the cluster session, checked over the
cluster's own SSH and given main1's project and Python where it lacks them.

In a Backend.AI cluster session each container has its own /home/work; only vfolders are on every
host, and apps (the sshd a laptop reaches) run on main1 alone, so `fab deploy` reaches main1 only.
The kernel runner writes ~/.ssh/config for the session's hosts (`Host main*`/`Host sub*`, port
2200, the session key /home/config/ssh/id_cluster; with host networking one `Host <name>` block
each, HostName and Port from /home/config/ssh/port-mapping.json: ai/backend/kernel/intrinsic.py
`init_sshd_service`), so `ssh sub1` works from main1.

One SSH round trip per host, all at once, runs PROBE there: the project, its code and requirements
hashes, the Python, torch, its GPUs, the data paths. A host without the project, or with other code
or requirements, gets them from main1 with rsync; when main1 runs from a venv, the venv is copied to
the same path too (the session's hosts share one image, so the base interpreter is there: the copy
has exactly main1's packages and needs no package index). Datasets are never copied: they belong
on a vfolder every host mounts. What cannot be fixed from main1 is one line per host.
"""
from __future__ import annotations

import functools
import json
import os
import re
import shlex
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from mlperf import PROJECT_ROOT
from mlperf.errors import UserError
from mlperf.host import Cluster

BACKENDAI_CONFIG = Path("/home/config")   # the agent's per-container config folder (read-only)
FORWARDED_NAMES = ("PYTHONPATH", "OMP_NUM_THREADS", "PYTHONUNBUFFERED")
FORWARDED_PREFIXES = ("NCCL_", "MLPERF_", "TORCH_", "PYTORCH_")
PROBE_TIMEOUT = 300      # seconds: a cold vfolder can take a while to import torch from
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_MARK = "__mlperf_probe__"

# Runs on each host under main1's Python (else its base interpreter, else python3) and prints one
# JSON line. Plain Python 3: the interpreter may be an older one than this module's.
PROBE = r"""
import hashlib, json, os, platform, sys
ran, root, paths = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
out = {"ran": ran, "python_version": platform.python_version(),
       "venv": sys.prefix if sys.prefix != getattr(sys, "base_prefix", sys.prefix) else None,
       "base_python": getattr(sys, "_base_executable", sys.executable),
       "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
       "project": os.path.isfile(os.path.join(root, "tasks.py")),
       "missing": [p for p in paths if not os.path.exists(p)], "requirements": None, "digest": None}
try:
    with open(os.path.join(root, "requirements.txt"), "rb") as f:
        out["requirements"] = hashlib.sha256(f.read()).hexdigest()
except OSError:
    pass
try:
    from pathlib import Path
    sys.path.insert(0, root)
    from mlperf.project import sources_digest
    out["digest"] = sources_digest(Path(root))
except Exception:
    pass
try:
    import torch
    out["torch"] = torch.__version__
    out["gpus"] = torch.cuda.device_count() if torch.cuda.is_available() else 0
except Exception as exc:
    out["torch"], out["gpus"], out["torch_error"] = None, 0, ("%s: %s" % (type(exc).__name__, exc))[:200]
print("__mlperf_probe__" + json.dumps(out), flush=True)
"""


# --- environment for the other hosts ----------------------------------------------------------


def forwarded_env(env) -> dict[str, str]:
    """What the other hosts' torchrun gets from this one: PYTHONPATH, OMP_NUM_THREADS,
    PYTHONUNBUFFERED and every NCCL_*, MLPERF_*, TORCH_* and PYTORCH_* variable (an SSH command
    starts with the remote login's environment, not this one)."""
    return {k: v for k, v in sorted(env.items())
            if _NAME.fullmatch(k) and (k in FORWARDED_NAMES or k.startswith(FORWARDED_PREFIXES))}


def env_words(env) -> str:
    """`env` arguments that set them on another host: each NAME=value one quoted shell word, so a
    value with spaces, quotes, `$(...)` or a newline arrives as it is and runs nothing."""
    return " ".join(shlex.quote(f"{k}={v}") for k, v in forwarded_env(env).items())


# --- how the hosts are reached ------------------------------------------------------------------


def ssh_config_name(ssh_config: str | None) -> str:
    return f"MLPERF_SSH_CONFIG={ssh_config}" if ssh_config else "~/.ssh/config"


def host_network_problem(cluster: Cluster, ssh_config: str | None,
                         config_dir: Path = BACKENDAI_CONFIG) -> str | None:
    """Why the cluster's SSH config cannot reach the hosts of a host-networking session, or None.

    With host networking each container's sshd listens on a port the agent picked
    (intrinsic-ports.json), and the manager lists (address, port) per host in ssh/port-mapping.json,
    which the kernel runner turns into `Host <name>` blocks. Releases up to 24.09 key it by the
    hosts' names (main1, sub1: registry.py); newer ones by `node-<kernel id>` (sokovan launcher.py),
    names that are not the session's hosts, so `ssh sub1` has no entry. MLPERF_SSH_CONFIG wins.
    """
    mapping_file = config_dir / "ssh" / "port-mapping.json"
    host_mode = mapping_file.is_file() or (config_dir / "intrinsic-ports.json").is_file()
    if ssh_config or not host_mode:
        return None
    advice = ("write an ssh config with one Host block per host (HostName, Port of its sshd, IdentityFile "
              "/home/config/ssh/id_cluster) and pass it as MLPERF_SSH_CONFIG=FILE")
    try:
        mapping = json.loads(mapping_file.read_text())
    except FileNotFoundError:
        return (f"this cluster session uses host networking (its sshd is not on port 2200) and has no "
                f"{mapping_file} to say where: {advice}")
    except (OSError, ValueError) as exc:
        return f"cannot read {mapping_file} ({exc}): {advice}"
    missing = [h for h in cluster.hosts if h not in mapping]
    if not missing:
        return None
    return (f"this cluster session uses host networking and {mapping_file} names "
            f"{', '.join(mapping) or 'no host'}, not {', '.join(missing)}, so the cluster's ssh config has "
            f"no entry for them: {advice}")


def _check_ssh_config(ssh_config: str | None) -> None:
    if ssh_config and not Path(ssh_config).is_file():
        raise UserError(f"MLPERF_SSH_CONFIG={ssh_config} does not exist: point it at an ssh config file, "
                        "or unset it to use ~/.ssh/config (which Backend.AI writes for the cluster)")


def ssh_reachability(hosts, ssh_config: str | None = None, timeout: float = 2.0) -> dict[str, str | None]:
    """Whether each host's SSH port (as the ssh config resolves it) accepts a connection: None when
    it does, else why not. No login: cheap enough for `invoke doctor`."""
    import paramiko

    path = Path(os.path.expanduser(ssh_config or "~/.ssh/config"))
    config = paramiko.SSHConfig.from_path(str(path)) if path.is_file() else paramiko.SSHConfig()

    def one(name: str) -> str | None:
        entry = config.lookup(name)
        address, port = entry.get("hostname", name), int(entry.get("port", 22))
        try:
            socket.create_connection((address, port), timeout=timeout).close()
            return None
        except OSError as exc:
            return f"{address}:{port} {_reason(exc)}"

    with ThreadPoolExecutor(max_workers=max(1, len(hosts))) as pool:
        return dict(zip(hosts, pool.map(one, hosts)))


def _as_root_hint(exc: BaseException, uid: int | None = None) -> str:
    """Why a root session's SSH login fails where the sshd answered: Backend.AI's own sshd refuses
    root (23.09: dropbear -w, ai/backend/kernel/intrinsic.py prepare_sshd_service), and a root
    session has no other user. Nothing to add for a host that did not answer, or for another user."""
    import paramiko

    uid = os.geteuid() if uid is None else uid
    if uid != 0 or not isinstance(exc, paramiko.SSHException):
        return ""
    return ("; this session runs as root, and Backend.AI's own sshd on port 2200 refuses root logins: ask the "
            "admin for a non-root kernel uid (the agent's [container] kernel-uid), or pass MLPERF_SSH_CONFIG "
            "naming an sshd on every host that lets root in")


def _reason(exc: BaseException) -> str:
    return re.sub(r"^\[Errno [^\]]*\]\s*", "", str(exc).strip()).rstrip(".") or type(exc).__name__


# --- the probe ---------------------------------------------------------------------------------


def probe_command(root: Path, paths: list[str], python: str, base_python: str, prefix: str) -> str:
    """The shell command that runs PROBE on a host: main1's Python if it is there, else its base
    interpreter, else python3, with the environment the run forwards."""
    q = shlex.quote
    candidates = " ".join(q(p) for p in dict.fromkeys([python, base_python, "python3"]))
    return (f"cd / && for py in {candidates}; do if command -v \"$py\" >/dev/null 2>&1; then "
            f"exec env {prefix} \"$py\" -c {q(PROBE)} \"$py\" {q(str(root))} {q(json.dumps(paths))}; fi; "
            f"done; echo {_MARK}null")


def _parse_probe(stdout: str, stderr: str, exited: int) -> dict | str:
    for line in stdout.splitlines():
        if line.startswith(_MARK):
            found = json.loads(line[len(_MARK):])
            return found if found is not None else "no Python at all there (not even python3)"
    last = (stderr.strip().splitlines() or stdout.strip().splitlines() or [f"exit code {exited}"])[-1]
    return f"the check did not run there ({last.strip()[:200]})"


def probe_local(root: Path, paths: list[str], python: str, env: dict) -> dict:
    """PROBE here, under the Python the run uses: what every other host must match."""
    proc = subprocess.run([python, "-c", PROBE, python, str(root), json.dumps(paths)], cwd="/",
                          env=env, capture_output=True, text=True, timeout=PROBE_TIMEOUT)
    found = _parse_probe(proc.stdout, proc.stderr, proc.returncode)
    if isinstance(found, str):
        raise UserError(f"cannot check this host's Python {python}: {found}")
    return found


def probe_remote(conn, command: str, config_name: str) -> dict | str:
    """PROBE on one host over its SSH connection: the JSON it printed, or a line saying why not."""
    from invoke.exceptions import CommandTimedOut

    from mlperf import remote

    try:
        remote.check_host_keys(conn)
        result = conn.run(command, hide=True, warn=True, in_stream=False, timeout=PROBE_TIMEOUT)
    except remote.connection_errors() as exc:
        refused = remote.host_key_problem(conn, exc)
        if refused is not None:
            return str(refused)
        return (f"cannot connect over the cluster's SSH ({_reason(exc)}): check that the host is up and that "
                f"{config_name} has an entry for it (Backend.AI writes Host main*/sub*, port 2200, "
                "IdentityFile /home/config/ssh/id_cluster)" + _as_root_hint(exc))
    except CommandTimedOut:
        return f"the check did not answer within {PROBE_TIMEOUT} s there"
    except UserError as exc:   # e.g. a port out of range in the ssh config
        return str(exc)
    return _parse_probe(result.stdout, result.stderr, result.exited)


# --- what a host lacks, and what main1 can give it ---------------------------------------------


def verdict(want: dict, got: dict, nproc: int, device: str) -> tuple[dict[str, str], list[str]]:
    """What to copy from main1 ({"project" | "venv": why}) and what cannot be fixed from here."""
    copy: dict[str, str] = {}
    problems: list[str] = []
    if got["missing"]:
        problems.append(f"{', '.join(got['missing'])} not found there: datasets are never copied; put --data-dir "
                        "on a vfolder mounted on every host (session create -v NAME: /home/work/NAME on each)")
    if not got["project"]:
        copy["project"] = "the project is not there"
    elif got["requirements"] != want["requirements"]:
        copy["project"] = "its requirements.txt differs from main1's"
    elif got["digest"] != want["digest"]:
        copy["project"] = "its code differs from main1's"
    venv = want["venv"]
    if got["ran"] == want["ran"] and got["python_version"] == want["python_version"]:
        if venv and (got["torch"] != want["torch"] or got["requirements"] != want["requirements"]):
            copy["venv"] = (f"its venv has torch {got['torch'] or 'missing'}, main1's {want['torch']}"
                            if got["torch"] != want["torch"] else "its venv was made for other requirements")
        elif got["torch"] != want["torch"]:
            problems.append(f"torch {got['torch'] or 'is missing'} there ({want['torch']} on main1): install the same "
                            "packages there (pip install -r requirements.txt) or start every host from one image")
        else:
            problems += _capacity(got, nproc, device)
    elif venv and got["ran"] == want["base_python"] and got["python_version"] == want["python_version"]:
        copy["venv"] = f"no venv at {venv}"
    else:
        base = f" nor its base interpreter {want['base_python']}" if venv else ""
        problems.append(f"no Python {want['python_version']} at {want['ran']}{base} there (found {got['ran']}, "
                        f"Python {got['python_version']}): start every host from the same image"
                        + (", or keep the venv on a vfolder every host mounts" if venv else ""))
    return copy, problems


def _capacity(got: dict, nproc: int, device: str) -> list[str]:
    """Fewer GPUs (or cores) than the processes per node the run starts. More is fine: --gpus N
    uses N of them on every host, as on main1."""
    if device == "cuda" and got["gpus"] < nproc:
        return [f"torch sees {got['gpus']} GPU(s) there but the run starts {nproc} process(es) per node: give "
                "every host the same GPUs (session create -r cuda.device=N is per container)"
                + (f", or pass --gpus {got['gpus']}" if got["gpus"] else "")]
    if device != "cuda" and got["cores"] < nproc:
        return [f"{got['cores']} CPU core(s) there but the run starts {nproc} process(es) per node: "
                f"pass --gpus {got['cores']} or fewer"]
    return []


def copy_to(conn, what: str, want: dict, root: Path) -> dict:
    """rsync the project (what `fab deploy` copies) or main1's venv to the same path on the host.
    Files main1 no longer has are deleted inside folders (a stale module would still import), never
    at the top, and data, results and other excluded paths are never touched."""
    from mlperf import remote
    from mlperf.project import NOT_PROJECT

    source = root if what == "project" else Path(want["venv"])
    excludes = (*NOT_PROJECT, remote.STAMP) if what == "project" else ("__pycache__/", "*.pyc")
    made = remote.run_checked(conn, f"mkdir -p {shlex.quote(str(source))}", hide=True, warn=True, in_stream=False)
    if made.exited != 0:
        raise UserError(f"cannot create {source} there ({(made.stderr.strip() or 'mkdir failed')[:200]}): "
                        "its parent must be writable, as /home/work or a vfolder is")
    return remote.rsync(conn, ["--partial", "--delete", "--filter=P /*", *(f"--exclude={p}" for p in excludes),
                               f"{source}/", f"{conn.original_host}:{source}/"])


def _sync(conn, name: str, copy: dict[str, str], want: dict, root: Path, check, needs: tuple[int, str]) -> list[str]:
    """Copy what the host lacks, then check it again: what is still wrong, as lines."""
    from mlperf.files import human_size

    for what, why in copy.items():
        source = root if what == "project" else want["venv"]
        print(f"[{name}] {why}: copying {what} {source} from main1 (rsync)", flush=True)
        try:
            stats = copy_to(conn, what, want, root)
        except UserError as exc:
            return [str(exc)]
        print(f"[{name}] {what}: {stats['files']} file(s) copied, {human_size(stats['sent'])} sent", flush=True)
    got = check()
    if isinstance(got, str):
        return [got]
    still, problems = verdict(want, got, *needs)
    if still:
        problems.append(f"still differs from main1 after copying ({'; '.join(still.values())})")
    return problems


def _trainer_needs(trainer: list[str]) -> tuple[str, list[str]]:
    """The device, and the data every host's trainer will read: the dataset root, its annotation
    files (an empty mount point is not a dataset), the backbone weights."""
    values = dict(arg[2:].split("=", 1) for arg in trainer if arg.startswith("--") and "=" in arg)
    root = values.get("data-root")
    paths = [root] if root else []
    for split in ("train", "val"):
        if root and f"{split}-annotations" in values:
            paths.append(os.path.join(root, values[f"{split}-annotations"]))
    if "backbone" in values:
        paths.append(values["backbone"])
    return values.get("device", "cpu"), paths


def _base_of(python: str) -> str:
    """The interpreter a venv's Python was made from (itself when it is not a venv's)."""
    try:
        return subprocess.run([python, "-c", "import sys; print(getattr(sys, '_base_executable', sys.executable))"],
                              capture_output=True, text=True, timeout=60, check=True).stdout.strip() or python
    except (OSError, subprocess.SubprocessError):
        raise UserError(f"the Python this run uses ({python}) does not start here") from None


def _refusal(lines: dict[str, list[str]], total: int) -> UserError:
    body = "\n".join(f"  {name}: {'; '.join(problems)}" for name, problems in lines.items())
    return UserError(f"--nodes all: {len(lines)} of {total} other host(s) cannot take part, nothing was "
                     f"started:\n{body}")


def prepare_hosts(cluster: Cluster, nproc: int, trainer: list[str], env: dict, ssh_config: str | None = None, *,
                  root: Path = PROJECT_ROOT, python: str = sys.executable,
                  config_dir: Path = BACKENDAI_CONFIG) -> None:
    """Check every other host for this run, all at once; copy the project and venv from main1 where
    they are missing or differ; raise a UserError with one line per host that still cannot take
    part (nothing is started then). `root` and `python` are the project and interpreter the run
    uses here, `env` the environment the run forwards."""
    from mlperf import remote

    _check_ssh_config(ssh_config)
    problem = host_network_problem(cluster, ssh_config, config_dir)
    if problem:
        raise UserError(problem)
    others = [h for i, h in enumerate(cluster.hosts) if i != cluster.node_rank]
    device, paths = _trainer_needs(trainer)
    command = probe_command(root, paths, python, _base_of(python), env_words(env))
    conns = {h: remote.connect(h, ssh_config) for h in others}
    checks = {h: functools.partial(probe_remote, conns[h], command, ssh_config_name(ssh_config)) for h in others}
    try:
        with ThreadPoolExecutor(max_workers=len(others) + 1) as pool:
            local = pool.submit(probe_local, root, paths, python, env)
            found = dict(zip(others, pool.map(lambda h: checks[h](), others)))
            want = local.result()
            plans = {h: verdict(want, got, nproc, device) if isinstance(got, dict) else ({}, [got])
                     for h, got in found.items()}
            unfixable = {h: problems for h, (_, problems) in plans.items() if problems}
            if unfixable:
                raise _refusal(unfixable, len(others))
            copies = {h: copy for h, (copy, _) in plans.items() if copy}
            left = dict(zip(copies, pool.map(
                lambda h: _sync(conns[h], h, copies[h], want, root, checks[h], (nproc, device)), copies)))
        left = {h: problems for h, problems in left.items() if problems}
        if left:
            raise _refusal(left, len(others))
    finally:
        for conn in conns.values():
            conn.close()
    print(f"cluster: {', '.join(others)} ready ({root}, Python {want['python_version']}, torch {want['torch']}"
          f"{', ' + str(len(copies)) + ' host(s) brought up to date from main1' if copies else ''})", flush=True)
