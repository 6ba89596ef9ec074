"""A real OpenSSH server on 127.0.0.1 for the Fabric tests, run as the current user.

`start_sshd(folder)` makes a host key and a client key with ssh-keygen, writes an sshd_config that
trusts only that client key, starts `/usr/sbin/sshd -D -e` in the foreground on a free port and
waits until the port accepts. It also writes an ssh_config with two aliases, main1 and sub1 (like a
Backend.AI cluster session's hosts), both pointing at this server, and known_hosts for it.
"""
from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
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


def start_sshd(folder: Path, timeout: float = 15) -> SshServer:
    """Start sshd for the current user in `folder`; call .stop() when done."""
    if not os.path.exists(SSHD):
        raise RuntimeError("sshd not found: install openssh-server (bash .ci/run does it as root)")
    folder.mkdir(parents=True, exist_ok=True)
    Path("/run/sshd").mkdir(parents=True, exist_ok=True)  # privilege-separation dir sshd insists on
    host_key, client_key = folder / "host_ed25519", folder / "client_ed25519"
    _keygen(host_key)
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
    process = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stdout=log.open("wb"),
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
                raise RuntimeError(f"sshd did not listen on port {port}: {log.read_text()}")
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
