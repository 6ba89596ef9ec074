#!/usr/bin/env python3
"""A local Backend.AI 23.09.10 for tests and rehearsals: one command starts it, one stops it.

    sudo python3 tools/backendai/stack.py start     # dockerd, base image, halfstack, Backend.AI
    sudo python3 tools/backendai/stack.py stop      # every process it started, by pid
    python3 tools/backendai/stack.py env            # the client's BACKEND_* variables, for `eval`

What runs, all on 127.0.0.1 and this machine only:
  * dockerd (Debian's docker.io) unless a daemon already answers, and a user-defined bridge network
    for sessions: on it containers resolve each other by name (Backend.AI's host networking does not);
  * a base image made here with debootstrap (Debian bookworm, python3, this project's
    requirements.txt installed with this machine's pip configuration), since no registry is
    reachable: the rootfs is cached in .cache/backendai/ and reused while requirements.txt and this
    file's BASE_VERSION stay the same;
  * the halfstack from Debian: PostgreSQL 15, Redis, etcd;
  * Backend.AI manager, storage proxy and agent (Docker backend, no GPU plugin) and the client, in
    their own venv pinned to the release's python.lock (constraints.txt beside this file), with the
    project's fixtures (fixtures.json: a domain, a user with a keypair, resource policies, a scaling
    group) and configs written here.

Needs root (dockerd, debootstrap, chroot) and the Debian packages in APT_PACKAGES; `start` installs
the missing ones with apt-get when it can. State (configs, databases, logs, vfolders, pids) lives in
.cache/backendai/stack/, so a failed start leaves its logs there; `stop` keeps the caches.
Standard library only: it runs before any venv exists.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
CACHE = Path(os.environ.get("MLPERF_STACK_CACHE", ROOT / ".cache" / "backendai"))
STATE = CACHE / "stack"
RELEASE = "23.9.10"                    # the packages' version (the git tag is 23.09.10)
VENV = CACHE / f"venv-{RELEASE}"
PACKAGES = [f"backend.ai-{name}=={RELEASE}" for name in ("manager", "agent", "storage-proxy", "client")]
APT_PACKAGES = {"dockerd": "docker.io", "debootstrap": "debootstrap", "pg_ctlcluster": "postgresql",
                "redis-server": "redis-server", "etcd": "etcd-server", "etcdctl": "etcd-client",
                "iptables": "iptables"}
BASE_IMAGE = "mlperf-rehearsal/base:bookworm"
BASE_VERSION = "1"                     # bump to rebuild every cached base
NETWORK = "mlperf-rehearsal"           # the sessions' Docker network
SUITE, MIRROR = "bookworm", os.environ.get("MLPERF_DEBIAN_MIRROR", "http://deb.debian.org/debian")

HOST = "127.0.0.1"
PORTS = {"postgres": 15432, "redis": 16379, "etcd": 12379, "etcd-peer": 12380, "manager": 18081,
         "storage-client": 16021, "storage-manager": 16022, "agent-rpc": 16001, "agent-sock": 16007}
CONTAINER_PORTS = (30000, 30200)
ENDPOINT = f"http://{HOST}:{PORTS['manager']}"
NAMESPACE = "mlperf"
DB_PASSWORD = "rehearsal"              # a local throwaway database on 127.0.0.1
STORAGE_SECRET = "mlperf-rehearsal-storage-secret"
VOLUME = "local:volume1"
# Kernels run as this host user, not root: 23.09's intrinsic sshd refuses root logins (dropbear -w,
# ai/backend/kernel/intrinsic.py prepare_sshd_service), so a root cluster session has no SSH between
# its containers. The storage proxy runs as the same user, so that sessions can write the vfolders
# it creates (mode 0755). The uid must be one the image does not have: its entrypoint then makes
# the user `work` with home /home/work, where the agent puts the cluster's ssh config and keys.
KERNEL_USER, KERNEL_UID = "mlperf-kernel", 1100

FIXTURES = json.loads((HERE / "fixtures.json").read_text())
USER_KEYPAIR = next(k for k in FIXTURES["insert"]["keypairs"] if not k["is_admin"])
ADMIN_KEYPAIR = next(k for k in FIXTURES["insert"]["keypairs"] if k["is_admin"])


def log(message: str) -> None:
    print(f"stack: {message}", flush=True)


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(1)


def run(cmd, **kw) -> subprocess.CompletedProcess:
    """A step that must work; its output goes to the log of the step on failure."""
    kw.setdefault("check", False)
    proc = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        fail(f"`{' '.join(map(str, cmd))[:200]}` exited {proc.returncode}:\n{tail}")
    return proc


# --- processes by pid -----------------------------------------------------------------------------

def pid_file(name: str) -> Path:
    return STATE / "pids" / f"{name}.pid"


def spawn(name: str, cmd: list[str], env: dict | None = None, cwd: Path | None = None) -> int:
    """Start a long-running service in its own process group, output to STATE/logs/<name>.log."""
    (STATE / "logs").mkdir(parents=True, exist_ok=True)
    pid_file(name).parent.mkdir(parents=True, exist_ok=True)
    out = open(STATE / "logs" / f"{name}.log", "ab")
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            env={**os.environ, **(env or {})}, cwd=cwd or STATE, start_new_session=True)
    pid_file(name).write_text(str(proc.pid))
    return proc.pid


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:   # a zombie child of ours counts as gone
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state != "Z"
    except OSError:
        return False


def stop_pid(name: str, grace: float = 20.0) -> None:
    """SIGTERM the process group the pid file names, then SIGKILL what is left after `grace` s."""
    path = pid_file(name)
    if not path.exists():
        return
    try:
        pid = int(path.read_text().split()[0])
    except (ValueError, IndexError):
        path.unlink()
        return
    if alive(pid):
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(pid, sig) if os.getpgid(pid) == pid else os.kill(pid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + grace
            while alive(pid) and time.monotonic() < deadline:
                time.sleep(0.2)
            if not alive(pid):
                break
        log(f"stopped {name} (pid {pid})")
    path.unlink()


def wait_for(what: str, ready, timeout: float, log_name: str | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return
        if log_name and pid_file(log_name).exists() and not alive(int(pid_file(log_name).read_text())):
            break
        time.sleep(0.5)
    tail = ""
    if log_name and (STATE / "logs" / f"{log_name}.log").exists():
        tail = "\n".join((STATE / "logs" / f"{log_name}.log").read_text(errors="replace").splitlines()[-20:])
    fail(f"{what} did not come up within {timeout:.0f} s (log: {STATE / 'logs'}):\n{tail}")


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((HOST, port)) == 0


# --- Debian packages --------------------------------------------------------------------------------

def ensure_apt() -> None:
    missing = sorted({pkg for exe, pkg in APT_PACKAGES.items() if not which(exe)})
    if not missing:
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        fail(f"the stack needs the Debian packages {' '.join(missing)}: apt-get install them as root")
    log(f"apt-get install {' '.join(missing)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    run(["apt-get", "update", "-qq"], env=env)
    run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", "--no-upgrade", *missing], env=env)


def which(exe: str) -> str | None:
    if exe == "pg_ctlcluster":   # the server's binaries are off PATH, in /usr/lib/postgresql/<v>/bin
        return str(pg_bin("initdb")) if pg_bin("initdb") else None
    return shutil.which(exe) or next((f"{d}/{exe}" for d in ("/usr/sbin", "/sbin") if os.access(f"{d}/{exe}", os.X_OK)), None)


def pg_bin(name: str) -> Path | None:
    found = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))
    return found[-1] if found else None


# --- dockerd ----------------------------------------------------------------------------------------

def docker_answers() -> bool:
    return subprocess.run(["docker", "info"], capture_output=True, timeout=60).returncode == 0


def start_docker() -> None:
    if docker_answers():
        log("a Docker daemon already answers: using it (stop leaves it running)")
        return
    # dockerd's own pid file is its lock; ours is what `stop` kills
    spawn("dockerd", [which("dockerd"), "--pidfile", str(STATE / "dockerd.pid")])
    wait_for("dockerd", docker_answers, 90, "dockerd")
    log("dockerd up")


def ensure_network() -> None:
    if subprocess.run(["docker", "network", "inspect", NETWORK], capture_output=True).returncode != 0:
        run(["docker", "network", "create", "--driver", "bridge", NETWORK])


SWARM_MARK = "swarm-ours"   # in STATE: this stack made the daemon a swarm manager, `stop` undoes it


def ensure_swarm() -> None:
    """A one-node Docker swarm on 127.0.0.1, so that multi-node cluster sessions (the default for
    --nodes > 1) can start: 23.09's manager gives them an overlay network, which only a swarm
    manager creates (registry.py AgentRegistry.start_session: "This node is not a swarm manager").
    Best effort: without it, single-node clusters and everything else still work."""
    state = subprocess.run(["docker", "info", "--format", "{{.Swarm.LocalNodeState}}"], capture_output=True,
                           text=True, timeout=60).stdout.strip()
    if state == "active":
        return
    made = subprocess.run(["docker", "swarm", "init", "--advertise-addr", HOST, "--listen-addr", f"{HOST}:2377"],
                          capture_output=True, text=True, timeout=120)
    if made.returncode != 0:
        log(f"no Docker swarm ({(made.stderr or made.stdout).strip()[:200]}): multi-node cluster sessions "
            "cannot start, single-node ones can")
        return
    (STATE / SWARM_MARK).touch()
    log("Docker swarm on 127.0.0.1 (one node), for multi-node clusters' overlay networks")


def leave_swarm() -> None:
    if (STATE / SWARM_MARK).exists() and shutil.which("docker") and docker_answers():
        subprocess.run(["docker", "swarm", "leave", "--force"], capture_output=True, timeout=120)
        log("left the Docker swarm it made")
    (STATE / SWARM_MARK).unlink(missing_ok=True)


def swarm_active() -> bool:
    return subprocess.run(["docker", "info", "--format", "{{.Swarm.ControlAvailable}}"], capture_output=True,
                          text=True, timeout=60).stdout.strip() == "true"


# --- the base image ------------------------------------------------------------------------------------

def base_key() -> str:
    """What the cached base depends on: this file's BASE_VERSION and the project's requirements."""
    digest = hashlib.sha256((BASE_VERSION + (ROOT / "requirements.txt").read_text()).encode()).hexdigest()
    return digest[:12]


def image_exists(name: str) -> bool:
    return subprocess.run(["docker", "image", "inspect", name], capture_output=True).returncode == 0


def ensure_base() -> None:
    """BASE_IMAGE in the daemon: from the cached rootfs tarball, else made with debootstrap."""
    key = base_key()
    labelled = subprocess.run(["docker", "image", "inspect", "-f", "{{index .Config.Labels \"mlperf.base-key\"}}",
                               BASE_IMAGE], capture_output=True, text=True)
    if labelled.returncode == 0 and labelled.stdout.strip() == key:
        return
    tarball = CACHE / f"base-{SUITE}-{key}.tar"
    if not tarball.exists():
        build_rootfs(tarball)
    log(f"docker import {tarball.name} as {BASE_IMAGE}")
    run(["docker", "import", "--change", f"LABEL mlperf.base-key={key}", "--change", "ENV LANG=C.UTF-8",
         str(tarball), BASE_IMAGE], timeout=1800)


def build_rootfs(tarball: Path) -> None:
    """debootstrap bookworm, then the project's requirements.txt with this machine's pip setup
    (its CA bundle, pip.conf, constraints and local wheel folders), so that the image's own
    `pip install -r requirements.txt` finds everything installed and needs no network."""
    started = time.monotonic()
    work = CACHE / f"rootfs-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        log(f"debootstrap {SUITE} (minbase, python3, pip, rsync): a few minutes, once")
        run(["debootstrap", "--variant=minbase",
             "--include=python3,python3-venv,python3-pip,ca-certificates,rsync", SUITE, str(work), MIRROR],
            timeout=1800)
        host_pip_setup(work)
        log("pip install -r requirements.txt into the base (this machine's pip configuration)")
        mounts = []
        try:
            for folder in pip_folders():
                target = work / folder.relative_to("/")
                target.mkdir(parents=True, exist_ok=True)
                run(["mount", "--bind", "-o", "ro", str(folder), str(target)])
                mounts.append(target)
            (work / "tmp" / "requirements.txt").write_text((ROOT / "requirements.txt").read_text())
            env = {k: v for k, v in os.environ.items() if k.startswith("PIP_")}
            run(["chroot", str(work), "/usr/bin/python3", "-m", "pip", "install", "-q", "--no-cache-dir",
                 "--break-system-packages", "--root-user-action=ignore", "-r", "/tmp/requirements.txt"],
                env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root", **env}, timeout=3600)
        finally:
            for target in reversed(mounts):
                subprocess.run(["umount", str(target)], capture_output=True)
        for path in ("tmp/requirements.txt", "var/cache/apt/archives", "var/lib/apt/lists"):
            target = work / path
            shutil.rmtree(target, ignore_errors=True) if target.is_dir() else target.unlink(missing_ok=True)
        partial = tarball.with_suffix(".partial")
        run(["tar", "-C", str(work), "--numeric-owner", "-cf", str(partial), "."], timeout=1800)
        partial.rename(tarball)
        for old in CACHE.glob(f"base-{SUITE}-*.tar"):
            if old != tarball:
                old.unlink()
        log(f"base rootfs cached in {tarball} ({time.monotonic() - started:.0f} s)")
    finally:
        subprocess.run(["umount", "-R", str(work / "opt")], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)


def pip_folders() -> list[Path]:
    """Local folders this machine's pip reads packages from (find-links, file:// indexes, a
    constraint file): bind-mounted at the same paths in the chroot."""
    found = set()
    listing = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
    for line in listing.splitlines():
        value = line.partition("=")[2].strip().strip("'")
        for word in value.split():
            path = word.removeprefix("file://")
            if path.startswith("/") and not path.startswith(("/etc/", "/usr/")):
                folder = Path(path)
                while folder.parent != Path("/") and not folder.is_dir():
                    folder = folder.parent
                parts = folder.parts
                if len(parts) >= 2 and Path(*parts[:2]).is_dir():
                    found.add(Path(*parts[:2]))   # /opt/pypi for /opt/pypi/simple
    return sorted(found)


def host_pip_setup(rootfs: Path) -> None:
    """This machine's CA bundle and pip configuration in the base: pip inside builds and sessions
    reaches the same indexes the host's does (a proxy CA included)."""
    bundle = Path("/etc/ssl/certs/ca-certificates.crt")
    if bundle.is_file():
        shutil.copy2(bundle, rootfs / "etc/ssl/certs/ca-certificates.crt")
    for conf in (Path("/etc/pip.conf"), Path("/etc/xdg/pip")):
        if conf.is_file():
            shutil.copy2(conf, rootfs / conf.relative_to("/"))
        elif conf.is_dir():
            shutil.copytree(conf, rootfs / conf.relative_to("/"), dirs_exist_ok=True)
    pip_conf = rootfs / "etc/pip.conf"
    text = pip_conf.read_text() if pip_conf.exists() else ""
    if "cert" not in text:   # pip's own certifi bundle lacks a local proxy's CA
        pip_conf.write_text(text + ("" if "[global]" in text else "[global]\n") +
                            "cert = /etc/ssl/certs/ca-certificates.crt\n")


# --- halfstack -----------------------------------------------------------------------------------------

def start_postgres() -> None:
    data = STATE / "postgres"
    sock = STATE / "pgsock"
    sock.mkdir(parents=True, exist_ok=True)
    shutil.chown(sock, "postgres")
    if not (data / "PG_VERSION").exists():
        data.mkdir(parents=True, exist_ok=True)
        shutil.chown(data, "postgres")
        pw = STATE / "pgpass.tmp"
        pw.write_text(DB_PASSWORD + "\n")
        shutil.chown(pw, "postgres")
        as_postgres([str(pg_bin("initdb")), "-D", str(data), "-U", "postgres", "--auth=md5", f"--pwfile={pw}",
                     "-E", "UTF8", "--locale=C.UTF-8"])
        pw.unlink()
    pid = spawn("postgres", ["runuser", "-u", "postgres", "--", str(pg_bin("postgres")), "-D", str(data),
                             "-c", f"listen_addresses={HOST}", "-p", str(PORTS["postgres"]),
                             "-c", f"unix_socket_directories={sock}", "-c", "fsync=off"])
    wait_for("PostgreSQL", lambda: port_open(PORTS["postgres"]), 60, "postgres")
    env = {"PGPASSWORD": DB_PASSWORD}
    exists = subprocess.run(["psql", "-h", HOST, "-p", str(PORTS["postgres"]), "-U", "postgres", "-tAc",
                             "SELECT 1 FROM pg_database WHERE datname='backend'"],
                            capture_output=True, text=True, env={**os.environ, **env})
    if exists.stdout.strip() != "1":
        run(["createdb", "-h", HOST, "-p", str(PORTS["postgres"]), "-U", "postgres", "backend"],
            env={**os.environ, **env})
    log(f"PostgreSQL up (pid {pid}, port {PORTS['postgres']})")


def as_postgres(cmd: list[str]) -> None:
    run(["runuser", "-u", "postgres", "--", *cmd], cwd="/")


def start_redis() -> None:
    (STATE / "redis").mkdir(parents=True, exist_ok=True)
    spawn("redis", [which("redis-server"), "--bind", HOST, "--port", str(PORTS["redis"]), "--daemonize", "no",
                    "--dir", str(STATE / "redis"), "--save", "", "--appendonly", "no"])
    wait_for("Redis", lambda: port_open(PORTS["redis"]), 30, "redis")
    log(f"Redis up (port {PORTS['redis']})")


def start_etcd() -> None:
    client, peer = f"http://{HOST}:{PORTS['etcd']}", f"http://{HOST}:{PORTS['etcd-peer']}"
    spawn("etcd", [which("etcd"), "--name", "rehearsal", "--data-dir", str(STATE / "etcd"),
                   "--listen-client-urls", client, "--advertise-client-urls", client,
                   "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                   "--initial-cluster", f"rehearsal={peer}"], env={"ETCD_UNSUPPORTED_ARCH": "", "ETCDCTL_API": "3"})
    wait_for("etcd", lambda: port_open(PORTS["etcd"]), 30, "etcd")
    log(f"etcd up (port {PORTS['etcd']})")


# --- Backend.AI ------------------------------------------------------------------------------------------

def ensure_venv() -> None:
    ready = VENV / ".ready"
    if ready.exists():
        return
    started = time.monotonic()
    shutil.rmtree(VENV, ignore_errors=True)
    run([sys.executable, "-m", "venv", str(VENV)])
    log(f"pip install {' '.join(PACKAGES)} (pinned to the release's python.lock)")
    run([str(VENV / "bin/python"), "-m", "pip", "install", "-q", "--disable-pip-version-check",
         "-c", str(HERE / "constraints.txt"), *PACKAGES], timeout=1800)
    clamp_agent_rlimits()
    ready.touch()
    log(f"Backend.AI {RELEASE} installed in {VENV} ({time.monotonic() - started:.0f} s)")


def clamp_agent_rlimits() -> None:
    """The 23.09 agent asks for nofile 1048576 and unlimited memlock in every container; runc
    cannot set more than dockerd's own hard limits (no CAP_SYS_RESOURCE on these VMs), and every
    container then fails to start. Where the host's hard limits are lower, ask for those instead;
    elsewhere the agent stays as released."""
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    memlock = resource.getrlimit(resource.RLIMIT_MEMLOCK)[1]
    wanted = {'{"Name": "nofile", "Soft": 1048576, "Hard": 1048576}': (nofile, 1048576),
              '{"Name": "memlock", "Soft": -1, "Hard": -1}': (memlock, -1)}
    agent = next(VENV.glob("lib/python3*/site-packages/ai/backend/agent/docker/agent.py"))
    text = agent.read_text()
    for original, (host_limit, released) in wanted.items():
        if original not in text:
            fail(f"{agent} does not ask for {original}: the rlimit clamp is for {RELEASE}")
        unlimited = host_limit == resource.RLIM_INFINITY
        if unlimited or (released != -1 and host_limit >= released):
            continue
        name = original.split('"')[3]
        text = text.replace(original, f'{{"Name": "{name}", "Soft": {host_limit}, "Hard": {host_limit}}}')
        log(f"agent: containers get {name}={host_limit} (this host's hard limit) instead of {released}")
    agent.write_text(text)


def backendai(*args: str, timeout: float = 600, **kw) -> subprocess.CompletedProcess:
    return run([str(VENV / "bin/backend.ai"), *args], timeout=timeout, cwd=STATE, **kw)


def etcd_section() -> str:
    return f'[etcd]\nnamespace = "{NAMESPACE}"\naddr = {{ host = "{HOST}", port = {PORTS["etcd"]} }}\nuser = ""\npassword = ""\n'


LOGGING = """
[logging]
level = "INFO"
drivers = ["console"]
[logging.pkg-ns]
"" = "WARNING"
"ai.backend" = "INFO"
"aiohttp" = "WARNING"
[logging.console]
colored = false
format = "simple"
"""


def kernel_ids() -> tuple[int, int]:
    """uid and gid of KERNEL_USER, made on this host (a system user, no home) where it is missing."""
    import grp
    import pwd

    try:
        entry = pwd.getpwnam(KERNEL_USER)
        return entry.pw_uid, entry.pw_gid
    except KeyError:
        pass
    owners = {"uid": _owner(pwd.getpwuid, KERNEL_UID), "gid": _owner(grp.getgrgid, KERNEL_UID)}
    for what, owner in owners.items():
        if owner:
            fail(f"{what} {KERNEL_UID} belongs to {owner!r} here: the stack runs kernels as a user {KERNEL_USER} "
                 f"of that uid and gid; change KERNEL_UID in {Path(__file__).name}")
    run(["groupadd", "--system", "--gid", str(KERNEL_UID), KERNEL_USER])
    run(["useradd", "--system", "--uid", str(KERNEL_UID), "--gid", str(KERNEL_UID), "--no-create-home",
         "--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin", KERNEL_USER])
    log(f"host user {KERNEL_USER} ({KERNEL_UID}) made: kernels and the storage proxy run as it")
    return KERNEL_UID, KERNEL_UID


def own_tree(root: Path, uid: int, gid: int) -> None:
    """chown what is not the kernel user's yet under the volume (vfolders of a stack that ran as root)."""
    for folder, dirs, files in os.walk(root):
        for path in [folder, *(os.path.join(folder, name) for name in dirs + files)]:
            st = os.lstat(path)
            if (st.st_uid, st.st_gid) != (uid, gid):
                os.lchown(path, uid, gid)


def _owner(lookup, number: int) -> str | None:
    try:
        return lookup(number)[0]
    except KeyError:
        return None


def write_configs() -> None:
    uid, gid = kernel_ids()
    volume = STATE / "vfroot" / "local" / "volume1"
    volume.mkdir(parents=True, exist_ok=True)
    own_tree(volume, uid, gid)   # the storage proxy, as that user, makes the vfolders in it
    for folder in ("scratches", "var", "tmp", "logs"):
        (STATE / folder).mkdir(parents=True, exist_ok=True)
    db = f"postgresql+asyncpg://postgres:{DB_PASSWORD}@{HOST}:{PORTS['postgres']}/backend"
    (STATE / "alembic.ini").write_text(
        f"[alembic]\nscript_location = ai.backend.manager.models:alembic\nsqlalchemy.url = {db}\n"
        "[loggers]\nkeys = root\n[handlers]\nkeys = console\n[formatters]\nkeys = generic\n"
        "[logger_root]\nlevel = WARN\nhandlers = console\n[handler_console]\nclass = StreamHandler\n"
        "args = (sys.stderr,)\nlevel = NOTSET\nformatter = generic\n[formatter_generic]\n"
        "format = %(levelname)-5.5s [%(name)s] %(message)s\n")
    (STATE / "manager.toml").write_text(etcd_section() + f"""
[db]
type = "postgresql"
addr = {{ host = "{HOST}", port = {PORTS['postgres']} }}
name = "backend"
user = "postgres"
password = "{DB_PASSWORD}"
[manager]
num-proc = 1
service-addr = {{ host = "{HOST}", port = {PORTS['manager']} }}
ssl-enabled = false
heartbeat-timeout = 40.0
pid-file = "{STATE / 'manager.pid'}"
disabled-plugins = []
hide-agents = false
rpc-auth-manager-keypair = "{STATE / 'rpc-keypair' / 'manager.key_secret'}"
importer-image = "lablup/importer:manylinux2010"
[docker-registry]
ssl-verify = false
[debug]
enabled = false
""" + LOGGING)
    (STATE / "storage-proxy.toml").write_text(etcd_section() + f"""
[storage-proxy]
node-id = "i-rehearsal"
num-proc = 1
pid-file = "{STATE / 'storage-proxy.pid'}"
event-loop = "asyncio"
scandir-limit = 1000
user = {uid}
group = {gid}
max-upload-size = "100g"
secret = "{STORAGE_SECRET}-client"
session-expire = "1d"
use-watcher = false
[api.client]
service-addr = {{ host = "{HOST}", port = {PORTS['storage-client']} }}
ssl-enabled = false
[api.manager]
service-addr = {{ host = "{HOST}", port = {PORTS['storage-manager']} }}
ssl-enabled = false
secret = "{STORAGE_SECRET}"
[debug]
enabled = false
[volume.volume1]
backend = "vfs"
path = "{STATE / 'vfroot' / 'local' / 'volume1'}"
""" + LOGGING)
    cores = os.cpu_count() or 1
    (STATE / "agent.toml").write_text(etcd_section() + f"""
[agent]
mode = "docker"
rpc-listen-addr = {{ host = "{HOST}", port = {PORTS['agent-rpc']} }}
agent-sock-port = {PORTS['agent-sock']}
id = "i-rehearsal"
scaling-group = "default"
pid-file = "{STATE / 'agent.pid'}"
event-loop = "asyncio"
var-base-path = "{STATE / 'var'}"
image-commit-path = "{STATE / 'tmp' / 'commit'}"
mount-path = "{STATE / 'vfroot' / 'local'}"
cohabiting-storage-proxy = true
[container]
port-range = [{CONTAINER_PORTS[0]}, {CONTAINER_PORTS[1]}]
kernel-uid = {uid}
kernel-gid = {gid}
bind-host = "{HOST}"
advertised-host = "{HOST}"
alternative-bridge = "{NETWORK}"
sandbox-type = "docker"
scratch-type = "hostdir"
scratch-root = "{STATE / 'scratches'}"
scratch-size = "1G"
[watcher]
service-addr = {{ host = "{HOST}", port = 16009 }}
ssl-enabled = false
target-service = "backendai-agent.service"
soft-reset-available = false
[resource]
reserved-cpu = {0 if cores <= 2 else 1}
reserved-mem = "1G"
reserved-disk = "1G"
allocation-order = ["cpu", "mem"]
affinity-policy = "INTERLEAVED"
[debug]
enabled = false
skip-container-deletion = false
""" + LOGGING)
    (STATE / "volumes.json").write_text(json.dumps({
        "_types": {"group": "", "user": ""}, "default_host": VOLUME,
        "proxies": {"local": {"client_api": f"http://{HOST}:{PORTS['storage-client']}",
                              "manager_api": f"http://{HOST}:{PORTS['storage-manager']}",
                              "secret": STORAGE_SECRET, "ssl_verify": "false"}},
        "exposed_volume_info": "percentage"}))
    (STATE / "redis.json").write_text(json.dumps({"addr": f"{HOST}:{PORTS['redis']}"}))


def set_up_manager() -> None:
    if not (STATE / "rpc-keypair" / "manager.key_secret").exists():
        (STATE / "rpc-keypair").mkdir(exist_ok=True)
        backendai("mgr", "-f", "manager.toml", "generate-rpc-keypair", str(STATE / "rpc-keypair"), "manager")
    if (STATE / ".schema-ready").exists():
        return
    mgr = ("mgr", "-f", "manager.toml")
    backendai(*mgr, "etcd", "put-json", "config/redis", "redis.json")
    backendai(*mgr, "etcd", "put-json", "volumes", "volumes.json")
    backendai(*mgr, "schema", "oneshot", "-f", "alembic.ini")
    for part in ("insert", "update"):
        (STATE / f"fixtures-{part}.json").write_text(json.dumps(FIXTURES[part]))
        populated = backendai(*mgr, "fixture", "populate", f"fixtures-{part}.json")
        if "Traceback" in populated.stdout + populated.stderr:   # the 23.09 CLI exits 0 on a failed insert
            fail(f"fixture populate {part} failed:\n{(populated.stdout + populated.stderr)[-2000:]}")
    (STATE / ".schema-ready").touch()


def start_backendai() -> None:
    env = {"PYTHONUNBUFFERED": "1"}
    py = str(VENV / "bin/python")
    spawn("storage-proxy", [py, "-m", "ai.backend.storage.server", "-f", str(STATE / "storage-proxy.toml")], env)
    wait_for("storage proxy", lambda: port_open(PORTS["storage-manager"]), 90, "storage-proxy")
    spawn("manager", [py, "-m", "ai.backend.manager.server", "-f", str(STATE / "manager.toml")], env)
    wait_for("manager", lambda: manager_answers(), 120, "manager")
    spawn("agent", [py, "-m", "ai.backend.agent.server", "-f", str(STATE / "agent.toml")], env)
    wait_for("agent (registered with the manager)", agent_registered, 240, "agent")
    log(f"Backend.AI {RELEASE} up: manager {ENDPOINT}, one agent")


def manager_answers() -> bool:
    try:
        with urllib.request.urlopen(ENDPOINT + "/", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def agent_registered() -> bool:
    proc = subprocess.run([str(VENV / "bin/backend.ai"), "--output", "json", "admin", "agent", "list"],
                          capture_output=True, text=True, env={**os.environ, **client_env(admin=True)},
                          timeout=60, cwd=STATE)
    return proc.returncode == 0 and "ALIVE" in proc.stdout


def client_env(admin: bool = False) -> dict[str, str]:
    keypair = ADMIN_KEYPAIR if admin else USER_KEYPAIR
    return {"BACKEND_ENDPOINT": ENDPOINT, "BACKEND_ENDPOINT_TYPE": "api",
            "BACKEND_ACCESS_KEY": keypair["access_key"], "BACKEND_SECRET_KEY": keypair["secret_key"]}


def write_env() -> None:
    lines = [f"export {k}={v}" for k, v in client_env().items()]
    lines.append(f"export MLPERF_STACK_CLIENT={VENV / 'bin' / 'backend.ai'}")
    (STATE / "env.sh").write_text("\n".join(lines) + "\n")


# --- commands ------------------------------------------------------------------------------------------

SERVICES = ("agent", "manager", "storage-proxy", "etcd", "redis", "postgres")


def start(args) -> None:
    started = time.monotonic()
    if os.geteuid() != 0:
        fail("the stack starts dockerd and builds a base with debootstrap: run it as root")
    STATE.mkdir(parents=True, exist_ok=True)
    if any(pid_file(name).exists() for name in SERVICES):
        stop(args)
    ensure_apt()
    start_docker()
    ensure_network()
    ensure_swarm()
    ensure_base()
    ensure_venv()
    write_configs()
    start_postgres()
    start_redis()
    start_etcd()
    set_up_manager()
    start_backendai()
    write_env()
    log(f"ready in {time.monotonic() - started:.0f} s; the client's variables: source {STATE / 'env.sh'}")


def stop(args) -> None:
    remove_sessions()
    leave_swarm()
    for name in SERVICES:
        stop_pid(name)
    if getattr(args, "docker", True):
        stop_pid("dockerd")


def remove_sessions() -> None:
    """Session containers the agent left (it is told to stop first; these would outlive it)."""
    if not pid_file("agent").exists() or not shutil.which("docker") or not docker_answers():
        return
    ids = subprocess.run(["docker", "ps", "-aq", "--filter", "label=ai.backend.kernel-id"],
                         capture_output=True, text=True).stdout.split()
    if ids:
        subprocess.run(["docker", "rm", "-f", *ids], capture_output=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("start", help="start everything (root)")
    stop_parser = sub.add_parser("stop", help="stop everything this script started, by pid")
    stop_parser.add_argument("--keep-docker", dest="docker", action="store_false",
                             help="leave dockerd running (images stay loaded for the next start)")
    sub.add_parser("base", help="only make the base image (dockerd must answer)")
    sub.add_parser("env", help="print the client's BACKEND_* variables as shell exports")
    args = parser.parse_args()
    if args.command == "start":
        start(args)
    elif args.command == "stop":
        stop(args)
    elif args.command == "base":
        ensure_base()
    else:
        print("\n".join(f"export {k}={v}" for k, v in client_env().items()))


if __name__ == "__main__":
    main()
