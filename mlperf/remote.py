"""Fabric side: run steps on a GPU host, move the project there and results back, launch on many hosts.

Under `fab -H host`, every step forwards itself (`forward`) to the project folder that
`fab -H host deploy` made on the host, and runs there with the host's Python, so the heavy work
happens where the GPUs are. Files move with rsync over the same SSH settings as the Fabric
Connection (host, port, user, keys, ssh config). `run_parallel` starts one command per host of a
multi-node session and stops them all when one fails.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

from mlperf import PROJECT_ROOT
from mlperf.errors import StepFailed, UserError
from mlperf.project import NOT_PROJECT

STAMP = ".mlperf-deploy.json"   # on the host, in the project folder: how it was deployed
TAIL_LINES = 5


def describe(c) -> str:
    """user@host:port, the way error messages name a host."""
    return f"{c.user}@{c.host}:{c.port}"


def remote_path(path: str) -> str:
    """The project folder on the host, as a shell word. Relative paths are relative to the login
    folder (commands start there), so '~/x' becomes 'x' and needs no tilde expansion."""
    if path == "~" or path.rstrip("/") == "":
        raise UserError(f"deploy path {path!r} would be the home or root folder itself: "
                        "give a project folder such as ~/mlperf-maskrcnn")
    return path[2:] if path.startswith("~/") else path


def connection_errors() -> tuple:
    """The exceptions that mean the host could not be reached or its SSH session broke."""
    import paramiko

    return (paramiko.SSHException, socket.error, OSError, EOFError)


# --- host keys: checked the way ssh checks them ------------------------------------------------


def known_hosts_file(c) -> Path:
    """The known-hosts file for this host: its ssh config's UserKnownHostsFile, else ~/.ssh/known_hosts."""
    configured = c.ssh_config.get("userknownhostsfile") if hasattr(c, "ssh_config") else None
    if isinstance(configured, (list, tuple)):  # paramiko gives a string; be lenient about lists
        configured = configured[0] if configured else None
    first = configured.split()[0] if configured and configured.split() else "~/.ssh/known_hosts"
    return Path(os.path.expanduser(first))


def accept_new_host_keys(c) -> bool:
    """mlperf.remote.accept_new_host_keys (FABRIC_MLPERF_REMOTE_ACCEPT_NEW_HOST_KEYS=1): the opt-in
    for hosts whose key this machine has not seen (a new Backend.AI session behind 127.0.0.1:9922);
    an ssh config's StrictHostKeyChecking accept-new says the same for its hosts."""
    value = c.config.get("mlperf", {}).get("remote", {}).get("accept_new_host_keys", False)
    return str(value).lower() in ("1", "true", "yes", "on") or _strict_checking(c) == "accept-new"


def _strict_checking(c) -> str:
    return (c.ssh_config.get("stricthostkeychecking") or "yes").lower() if hasattr(c, "ssh_config") else "yes"


def check_host_keys(c) -> None:
    """Make the Connection check host keys against the known-hosts file: Fabric itself accepts any
    key. An unknown key is refused, unless accept_new_host_keys, which saves it there."""
    import paramiko

    if getattr(c, "_mlperf_host_keys", False):
        return
    _check_port(c)
    path = known_hosts_file(c)
    if path.is_file():
        c.client.load_host_keys(str(path))
    if _strict_checking(c) in ("no", "off"):  # the host's ssh config trusts any key (a cluster's own hosts)
        c.client.set_missing_host_key_policy(paramiko.AutoAddPolicy())
    elif accept_new_host_keys(c):
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        path.touch(mode=0o600, exist_ok=True)
        c.client.load_host_keys(str(path))  # save_host_keys writes every loaded key back to this file
        c.client.set_missing_host_key_policy(_SaveNewKey(path))
    else:
        c.client.set_missing_host_key_policy(paramiko.RejectPolicy())
    c._mlperf_host_keys = True


class _SaveNewKey:
    """paramiko's MissingHostKeyPolicy: add the key and write it to the known-hosts file."""

    def __init__(self, path: Path):
        self.path = path

    def missing_host_key(self, client, hostname, key):
        client.get_host_keys().add(hostname, key.get_name(), key)
        client.save_host_keys(str(self.path))


def _check_port(c) -> None:
    """A port out of range is one line (paramiko would wrap 99999 around to 34463 and try that)."""
    if not isinstance(c.port, int) or not 0 < c.port < 65536:
        raise UserError(f"port {c.port} of {c.user}@{c.host} is not a port number (1-65535): check -H")


def host_key_problem(c, exc: Exception) -> UserError | None:
    """One line for a refused host key (unknown or changed), None for other failures."""
    import paramiko

    if isinstance(exc, paramiko.BadHostKeyException):
        return _host_key_line(c, changed=True)
    if isinstance(exc, paramiko.SSHException) and "not found in known_hosts" in str(exc):
        return _host_key_line(c, changed=False)
    return None


def _host_key_line(c, changed: bool) -> UserError:
    name = f"[{c.host}]:{c.port}" if c.port != 22 else c.host
    where = known_hosts_file(c)
    if changed:
        return UserError(f"the host key of {describe(c)} has CHANGED from the one in {where}: if this is a new "
                         f"session behind the same address, remove the old key (ssh-keygen -R '{name}' -f {where}) "
                         "and connect again; otherwise someone may be in the middle")
    return UserError(f"the host key of {describe(c)} is not known here ({where}): check it and add it "
                     f"(ssh-keyscan -p {c.port} {c.host} >> {where}), or accept new keys with "
                     "FABRIC_MLPERF_REMOTE_ACCEPT_NEW_HOST_KEYS=1 (a new Backend.AI session has a new key)")


def _unreachable(c, exc: Exception) -> UserError:
    refused = host_key_problem(c, exc)
    if refused is not None:
        return refused
    reason = re.sub(r"^\[Errno [^\]]*\]\s*", "", str(exc).strip()).rstrip(".") or type(exc).__name__
    return UserError(
        f"cannot connect to {describe(c)}: {reason}; check the host and port, the key (-i), and that "
        "the tunnel is up (backend.ai app SESSION sshd -b 127.0.0.1:9922)")


def connect(host: str, ssh_config: str | None = None):
    """A Fabric connection to `host` (an ssh-config alias or user@host:port) as every multi-host step
    opens one: the given ssh config file (a cluster's own) or the user's, and a 20 s connect
    timeout, so an unroutable host is one line rather than minutes of waiting."""
    from fabric import Config, Connection

    config = Config(runtime_ssh_path=ssh_config) if ssh_config else Config()
    return Connection(host, config=config, connect_timeout=20)


def run_checked(c, command: str, **kwargs):
    """c.run with host keys checked and connection problems turned into one line."""
    if c.connect_timeout is None:
        c.connect_timeout = 20  # an unroutable host should not hang for minutes
    check_host_keys(c)
    try:
        return c.run(command, **kwargs)
    except connection_errors() as exc:
        raise _unreachable(c, exc) from None


def read_stamp(c, path: str) -> dict | None:
    """The deploy stamp on the host, or None when the project is not deployed there."""
    result = run_checked(c, f"cat {shlex.quote(path)}/{STAMP}", hide=True, warn=True, in_stream=False)
    if result.exited != 0:
        return None
    try:
        return json.loads(result.stdout)
    except ValueError:
        return None


def deployed_python(c, path: str) -> str:
    """The python `fab deploy` set up in the host's project folder (its stamp), or a UserError."""
    stamp = read_stamp(c, path)
    if stamp is None:
        raise UserError(f"the project is not deployed on {describe(c)} (no {path}/{STAMP}): "
                        f"run `fab -H {describe(c)} deploy` first")
    return stamp["python"]


def forward(c, argv: list[str], path: str):
    """Run `invoke <argv>` in the project deployed at `path` on the host, output streamed.

    A remote failure raises StepFailed with the remote exit code, naming the host. A step given
    --detach detaches on the host (the flag is passed on), so this returns as soon as it started.
    """
    path = remote_path(path)
    command = (f"cd {shlex.quote(path)} && exec env PYTHONUNBUFFERED=1 {shlex.quote(deployed_python(c, path))} "
               f"-m invoke {shlex.join(argv)}")
    # A pty: Ctrl-C here reaches the remote step as SIGINT and a dropped connection hangs it up,
    # so nothing keeps running on the GPUs unseen (unless detached, which starts its own session).
    result = run_checked(c, command, pty=True, warn=True, in_stream=False)
    if result.exited != 0:
        lines = [line.strip() for line in result.stdout.replace("\r", "\n").splitlines() if line.strip()]
        tail = " | ".join(lines[-TAIL_LINES:]) or "(no output)"
        raise StepFailed(f"{argv[0]} failed on {describe(c)} with exit code {result.exited}; "
                         f"last lines: {tail}", result.exited)
    return result


# --- rsync over the Connection's SSH settings -------------------------------------------------


def ssh_command(c) -> list[str]:
    """The `ssh` command (for rsync -e) that matches the Fabric Connection, host keys included:
    the same known-hosts file, unknown keys refused unless accept_new_host_keys."""
    if shutil.which("ssh") is None:
        raise UserError("ssh not found here: install openssh-client (apt-get install openssh-client)")
    _check_port(c)
    strict = "no" if _strict_checking(c) in ("no", "off") else "accept-new" if accept_new_host_keys(c) else "yes"
    command = ["ssh", "-p", str(c.port), "-l", c.user, "-o", "BatchMode=yes",
               "-o", f"StrictHostKeyChecking={strict}", "-o", "LogLevel=ERROR",
               "-o", f"UserKnownHostsFile={known_hosts_file(c)}"]
    if c.connect_timeout:
        command += ["-o", f"ConnectTimeout={int(c.connect_timeout)}"]
    ssh_config = getattr(c.config, "_runtime_ssh_path", None) or c.config.get("ssh_config_path")
    if ssh_config:
        command += ["-F", str(ssh_config)]
    keys = c.connect_kwargs.get("key_filename") or []
    for key in [keys] if isinstance(keys, (str, os.PathLike)) else keys:
        command += ["-i", str(key)]
    return command


def rsync(c, args: list[str]) -> dict:
    """Run rsync with the Connection's ssh; return its --stats numbers (files, bytes sent/received)."""
    if shutil.which("rsync") is None:
        raise UserError("rsync not found here: install it (apt-get install rsync, brew install rsync)")
    if c.connect_timeout is None:
        c.connect_timeout = 20
    ssh = ssh_command(c)
    # rsync splits -e on spaces and honours quotes (not backslashes): quote each word.
    command = ["rsync", "-a", "--stats", "-e", " ".join(_rsync_quote(w) for w in ssh), *args]
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        err = proc.stderr.strip().splitlines()
        last = err[-1] if err else f"exit code {proc.returncode}"
        if "REMOTE HOST IDENTIFICATION HAS CHANGED" in proc.stderr or "Host key verification failed" in proc.stderr:
            raise _host_key_line(c, changed="HAS CHANGED" in proc.stderr)
        if proc.returncode == 255 or "connection" in proc.stderr.lower() or "permission denied" in proc.stderr.lower():
            raise _unreachable(c, RuntimeError(last))
        if "command not found" in proc.stderr or proc.returncode == 127:
            raise UserError(f"rsync is missing on {describe(c)}: install it there (apt-get install rsync) "
                            "or use an image that has it")
        raise UserError(f"rsync to/from {describe(c)} failed ({last})")
    return parse_stats(proc.stdout)


def _rsync_quote(word: str) -> str:
    return word if re.fullmatch(r"[\w@%+=:,./~-]+", word) else '"' + word.replace('"', "") + '"'


def parse_stats(output: str) -> dict:
    """Numbers from rsync --stats: files transferred, bytes sent and received."""
    def number(label: str) -> int:
        match = re.search(rf"^{label}:\s*([\d,]+)", output, re.MULTILINE)
        return int(match.group(1).replace(",", "")) if match else 0

    return {"files": number("Number of regular files transferred"),
            "sent": number("Total bytes sent"), "received": number("Total bytes received")}


def _rsync_target(c, path: str) -> str:
    return f"{c.original_host}:{path}"


def requirements_hash(root: Path = PROJECT_ROOT) -> str:
    return hashlib.sha256((root / "requirements.txt").read_bytes()).hexdigest()


def deploy(c, path: str, python: str = "python3", venv: bool = True) -> dict:
    """Copy the project to the host and make its Python environment; cheap when nothing changed.

    With venv (default): `PY -m venv --system-site-packages .venv` and pip install -r
    requirements.txt into it. System site packages let the venv use the image's torch (NGC and
    Backend.AI images ship a CUDA build), so pip only adds what is missing. Without venv: PY runs
    the steps and pip installs the missing requirements into its own environment.
    The install runs again only when requirements.txt, PY or the mode changed (a stamp on the host).
    """
    path = remote_path(path)
    qpath = shlex.quote(path)
    run_checked(c, f"mkdir -p {qpath}", hide=True, in_stream=False)
    excludes = [f"--exclude={pattern}" for pattern in (*NOT_PROJECT, STAMP)]
    stats = rsync(c, ["--partial", *excludes, f"{PROJECT_ROOT}/", _rsync_target(c, path) + "/"])
    print(f"deploy: {stats['files']} file(s) updated in {describe(c)}:{path} ({stats['sent']} bytes sent)")

    wanted = {"requirements_sha256": requirements_hash(), "python_given": python, "venv": venv,
              "python": ".venv/bin/python" if venv else python}
    stamp = read_stamp(c, path) or {}
    runs = run_checked(c, f"cd {qpath} && test -x \"$(command -v {shlex.quote(wanted['python'])})\"",
                       hide=True, warn=True, in_stream=False).exited == 0
    if runs and all(stamp.get(k) == v for k, v in wanted.items()):
        print("deploy: requirements unchanged, environment kept")
        return {**stats, "installed": False}
    steps = []
    if venv:
        steps.append(f"{shlex.quote(python)} -m venv --system-site-packages .venv")
    steps.append(f"{shlex.quote(wanted['python'])} -m pip install --disable-pip-version-check -q "
                 "-r requirements.txt")
    print(f"deploy: setting up the environment on {describe(c)}: {' && '.join(steps)}")
    result = run_checked(c, f"cd {qpath} && " + " && ".join(steps), warn=True, pty=False, in_stream=False)
    if result.exited != 0:
        raise UserError(f"setting up Python on {describe(c)} failed (exit code {result.exited}, output "
                        f"above); check --python (now {python!r}) and that the host can reach PyPI")
    stamp_text = shlex.quote(json.dumps(wanted))
    run_checked(c, f"cd {qpath} && printf '%s' {stamp_text} > {STAMP}.tmp && mv {STAMP}.tmp {STAMP}",
                hide=True, in_stream=False)
    print(f"deploy: ready; steps now run there with `fab -H {describe(c)} TASK`")
    return {**stats, "installed": True}


def results_folder_name(c) -> str:
    """results/<host>/ locally; the port joins the name when it is not 22 (tunnels share 127.0.0.1)."""
    name = c.original_host if c.port == 22 else f"{c.original_host}_{c.port}"
    return re.sub(r"[^\w.@-]", "_", name)


def fetch_results(c, local_dir: Path, path: str, results_dir: str | None = None) -> Path:
    """rsync the host's results folder into <local_dir>/<host>/: resumable, never deletes here.

    The host's folder is `results_dir` as its steps were given it (relative: under the project), or,
    when not given, the one the host's own steps use (its `invoke paths`: its config, and in a
    Backend.AI session the vfolder they default to)."""
    path = remote_path(path)
    if results_dir is None:
        remote_results = host_paths(c, path)["results_dir"]["path"]
    else:
        remote_results = results_dir if results_dir.startswith("/") else f"{path}/{remote_path(results_dir)}"
    probe = run_checked(c, f"test -d {shlex.quote(remote_results)}", hide=True, warn=True, in_stream=False)
    if probe.exited != 0:
        raise UserError(f"no results on {describe(c)} yet ({remote_results} does not exist): "
                        "run a step there first, e.g. fab -H HOST all, or name the folder with --results-dir")
    target = Path(local_dir) / results_folder_name(c)
    target.mkdir(parents=True, exist_ok=True)
    stats = rsync(c, ["--partial", _rsync_target(c, remote_results) + "/", f"{target}/"])
    print(f"results: {stats['files']} file(s) copied from {describe(c)}:{remote_results} to {target}")
    return target


def host_paths(c, path: str) -> dict:
    """The host's `invoke paths --json`: where its steps keep data, results and jobs."""
    command = f"cd {shlex.quote(path)} && {shlex.quote(deployed_python(c, path))} -m invoke paths --json"
    result = run_checked(c, command, hide=True, warn=True, in_stream=False)
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if result.exited != 0 or not lines:
        detail = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"`invoke paths` failed on {describe(c)} ({detail}): name the folder with --results-dir")
    return json.loads(lines[-1])


# --- many hosts at once (multi-node training) -------------------------------------------------

_PGID_MARK = "__mlperf_pgid__"


class _PrefixWriter:
    """A stream for invoke's out_stream: whole lines, each prefixed with [host]."""

    def __init__(self, host: str, lock: threading.Lock, sink=None):
        self.prefix, self.lock, self.sink = f"[{host}] ", lock, sink or sys.stdout
        self.buffer = ""
        self.pgid: int | None = None

    def write(self, text: str) -> None:
        self.buffer += text.replace("\r\n", "\n").replace("\r", "\n")
        *lines, self.buffer = self.buffer.split("\n")
        for line in lines:
            self._emit(line)

    def _emit(self, line: str) -> None:
        if line.startswith(_PGID_MARK):
            self.pgid = int(line.split()[1])
            return
        with self.lock:
            self.sink.write(self.prefix + line + "\n")
            self.sink.flush()

    def flush(self) -> None:
        pass

    def close(self) -> None:
        if self.buffer:
            self._emit(self.buffer)
            self.buffer = ""


def run_parallel(commands: dict[str, str], *, ssh_config: str | None = None,
                 stop_grace: float = 10.0) -> int:
    """Run one shell command per SSH destination at once; return the first failure's exit code.

    Keys are SSH destinations (aliases from the ssh config, or user@host:port); each host's
    output is streamed line by line as `[host] line`. When one command fails, the others are
    stopped: their process group gets SIGTERM (torchrun's agent then ends its workers, which live
    in sessions of their own), and SIGKILL after `stop_grace` seconds. Returns 0 if all succeed.
    """
    lock = threading.Lock()
    failures: list[int] = []
    failed = threading.Event()
    results: dict[str, int] = {}
    conns = {host: connect(host, ssh_config) for host in commands}
    writers = {host: _PrefixWriter(host, lock) for host in commands}

    def one(host: str) -> None:
        # The shell reports its pid, which leads the process group of everything it starts.
        wrapped = f"echo {_PGID_MARK} $$; exec sh -c {shlex.quote(commands[host])}"
        try:
            check_host_keys(conns[host])
            result = conns[host].run(wrapped, pty=True, warn=True, in_stream=False, hide=False,
                                     out_stream=writers[host], err_stream=writers[host])
            code = result.exited if result.exited > 0 else (0 if result.exited == 0 else 1)
        except connection_errors() as exc:
            writers[host]._emit(f"error: {_unreachable(conns[host], exc)}")
            code = 255
        except Exception as exc:  # noqa: BLE001 - a dying channel after a stop: report, don't hang
            writers[host]._emit(f"error: {type(exc).__name__}: {exc}")
            code = 1
        writers[host].close()
        results[host] = code
        if code != 0:
            with lock:
                failures.append(code)
            failed.set()

    threads = {host: threading.Thread(target=one, args=(host,), daemon=True) for host in commands}
    for thread in threads.values():
        thread.start()
    try:
        while any(t.is_alive() for t in threads.values()):
            if failed.wait(0.2):
                _stop(conns, writers, threads, ssh_config, stop_grace)
                break
    except KeyboardInterrupt:
        _stop(conns, writers, threads, ssh_config, stop_grace)
        failures.append(130)
    for thread in threads.values():
        thread.join(timeout=stop_grace + 5)
    for conn in conns.values():
        conn.close()
    return failures[0] if failures else 0


def _stop(conns: dict, writers: dict, threads: dict, ssh_config: str | None, grace: float) -> None:
    """TERM, then KILL, the process group of every command still running, over fresh connections."""
    running = [host for host, t in threads.items() if t.is_alive() and writers[host].pgid]
    script = ("kill -TERM -- -{pg} 2>/dev/null; i=0; while kill -0 -- -{pg} 2>/dev/null && "
              "[ $i -lt {ticks} ]; do sleep 0.5; i=$((i+1)); done; kill -KILL -- -{pg} 2>/dev/null; true")
    stoppers = []
    for host in running:
        print(f"[{host}] stopping (another host failed)", flush=True)

        def kill(host=host):
            try:
                with connect(host, ssh_config) as killer:
                    check_host_keys(killer)
                    killer.run(script.format(pg=writers[host].pgid, ticks=int(grace * 2)),
                               hide=True, warn=True, in_stream=False)
            except connection_errors():
                conns[host].close()  # closing the pty channel hangs up the command instead

        stopper = threading.Thread(target=kill, daemon=True)
        stopper.start()
        stoppers.append(stopper)
    for stopper in stoppers:
        stopper.join(timeout=grace + 25)
