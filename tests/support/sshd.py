"""A real OpenSSH server on 127.0.0.1 for the Fabric tests, run as the current user.

`start_sshd(folder)` makes a host key and a client key with ssh-keygen, writes an sshd_config that
trusts only that client key, starts `/usr/sbin/sshd -D -e` in the foreground on a free port and
waits until the port accepts. It also writes an ssh_config with two aliases, main1 and sub1 (like a
Backend.AI cluster session's hosts), both pointing at this server, and known_hosts for it.

Several "hosts" of one cluster session: `start_sshd(folder, own_tree={path: folder_here},
client_key=key)` runs the server in a mount namespace of its own where each `path` shows
`folder_here` instead (bind mounts), so every login there sees its own project tree at the same
absolute path, as every container of a Backend.AI session has its own /home/work. One shared key
plays /home/config/ssh/id_cluster, and `cluster_ssh_config` writes the config the kernel runner
writes with host networking (one Host block per host).
"""
from __future__ import annotations

import getpass
import os
import shlex
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class SshServer:
    port: int
    user: str
    key: Path            # client private key that the server accepts
    ssh_config: Path     # Host main1 / sub1 -> this server, with the key
    known_hosts: Path
    process: subprocess.Popen
    log: Path

    @property
    def destination(self) -> str:
        """What `fab -H` takes: user@127.0.0.1:port."""
        return f"{self.user}@127.0.0.1:{self.port}"

    def fab_args(self) -> list[str]:
        """`fab` options that reach this server with the test key."""
        return ["-H", self.destination, "-i", str(self.key)]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _keygen(path: Path, kind: str = "ed25519") -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", kind, "-N", "", "-f", str(path)], check=True)


def own_trees_supported() -> str | None:
    """None when this machine can give a server its own file tree (root, mount namespaces), else why not."""
    if shutil.which("unshare") is None:
        return "unshare (util-linux) is not installed"
    with tempfile.TemporaryDirectory() as empty:
        proc = subprocess.run(["unshare", "--mount", "--propagation", "private", "mount", "--bind", empty, empty],
                              capture_output=True, text=True)
    return None if proc.returncode == 0 else f"no private mount namespaces here ({proc.stderr.strip()})"


def _in_own_tree(command: list[str], own_tree: dict | None) -> list[str]:
    """`command` in a private mount namespace where each key path shows its value's folder."""
    if not own_tree:
        return command
    mounts = [f"mount --bind {shlex.quote(str(src))} {shlex.quote(str(seen))}" for seen, src in own_tree.items()]
    script = " && ".join([*mounts, f"exec {shlex.join(command)}"])
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script]


def start_sshd(folder: Path, timeout: float = 15, *, own_tree: dict | None = None,
               client_key: Path | None = None) -> SshServer:
    """Start sshd for the current user in `folder`; call .stop() when done. `own_tree`:
    {path as the host sees it: folder here}; `client_key`: the key to accept instead of a new one."""
    if not os.path.exists(SSHD):
        raise RuntimeError("sshd not found: install openssh-server (bash .ci/run does it as root)")
    folder.mkdir(parents=True, exist_ok=True)
    Path("/run/sshd").mkdir(parents=True, exist_ok=True)  # privilege-separation dir sshd insists on
    host_key = folder / "host_ed25519"
    _keygen(host_key)
    if client_key is None:
        client_key = folder / "client_ed25519"
        _keygen(client_key)
    authorized = folder / "authorized_keys"
    authorized.write_text(Path(f"{client_key}.pub").read_text())
    authorized.chmod(0o600)
    port = free_port()
    user = getpass.getuser()
    config = folder / "sshd_config"
    config.write_text("\n".join([
        f"Port {port}",
        "ListenAddress 127.0.0.1",
        f"HostKey {host_key}",
        f"PidFile {folder / 'sshd.pid'}",
        f"AuthorizedKeysFile {authorized}",
        "StrictModes no",
        "UsePAM no",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "PermitRootLogin prohibit-password",
        f"AllowUsers {user}",
        "MaxSessions 50",
        "MaxStartups 50",
        "Subsystem sftp internal-sftp",
        "",
    ]))
    log = folder / "sshd.log"
    process = subprocess.Popen(_in_own_tree([SSHD, "-D", "-e", "-f", str(config)], own_tree), stdout=log.open("wb"),
                               stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"sshd exited with {process.returncode}: {log.read_text()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                break
        except OSError:
            if time.monotonic() > deadline:
                process.kill()
                raise RuntimeError(f"sshd did not listen on port {port}: {log.read_text()}") from None
            time.sleep(0.05)
    host_pub = Path(f"{host_key}.pub").read_text().split()
    known_hosts = folder / "known_hosts"
    known_hosts.write_text(f"[127.0.0.1]:{port} {host_pub[0]} {host_pub[1]}\n")
    ssh_config = folder / "ssh_config"
    ssh_config.write_text("".join(
        f"Host {alias}\n  HostName 127.0.0.1\n  Port {port}\n  User {user}\n"
        f"  IdentityFile {client_key}\n  UserKnownHostsFile {known_hosts}\n  IdentitiesOnly yes\n"
        for alias in ("main1", "sub1")
    ))
    return SshServer(port=port, user=user, key=client_key, ssh_config=ssh_config,
                     known_hosts=known_hosts, process=process, log=log)


def cluster_ssh_config(path: Path, ports: dict[str, int], key: Path, known_hosts: Path) -> Path:
    """The ~/.ssh/config Backend.AI's kernel runner writes with host networking (one block per host,
    its HostName and Port), for servers on 127.0.0.1; UserKnownHostsFile keeps ~/.ssh clean."""
    path.write_text("".join(
        f"\nHost {name}\n\tHostName 127.0.0.1\n\tPort {port}\n\tStrictHostKeyChecking no\n"
        f"\tIdentityFile {key}\n\tUserKnownHostsFile {known_hosts}\n" for name, port in ports.items()))
    return path
