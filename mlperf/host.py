"""What this host is and has, detected once: GPUs, CPUs, memory, software, shared memory, disk, and
the Backend.AI cluster session it may be part of.

Every step asks here (the launcher, doctor, the system description), so they all see the same host.
torch is imported only where there are GPU device nodes and something needs what only torch knows
(cuDNN and NCCL versions, whether this torch build can use the GPUs): on a CPU host detection takes
milliseconds.
"""
from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import os
import platform
import re
import shutil
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

from mlperf.errors import UserError

DEFAULT_MASTER_PORT = 29500
CLUSTER_VARS = ("BACKENDAI_CLUSTER_HOSTS", "BACKENDAI_CLUSTER_HOST", "BACKENDAI_CLUSTER_ROLE",
                "BACKENDAI_CLUSTER_SIZE", "BACKENDAI_CLUSTER_IDX")


# ---------------------------------------------------------------- GPUs


@dataclass(frozen=True)
class Gpu:
    name: str
    memory_mib: int | None = None
    driver: str = ""
    capability: tuple[int, int] | None = None   # CUDA compute capability, e.g. (9, 0); None: unknown

    @property
    def has_bf16(self) -> bool | None:
        """Whether the GPU computes in bfloat16 (compute capability 8.0 and later); None: unknown."""
        return None if self.capability is None else self.capability >= (8, 0)


def gpus() -> list[Gpu]:
    """The GPUs this process may use (CUDA_VISIBLE_DEVICES applies, as it does for the trainer).

    nvidia-smi first (it sees the driver and needs no CUDA context); torch otherwise (ROCm, or no
    nvidia-smi), only when the host has GPU device nodes; [] when neither finds a GPU.
    """
    return list(_gpus(os.environ.get("CUDA_VISIBLE_DEVICES")))


@functools.cache
def _gpus(visible: str | None) -> tuple[Gpu, ...]:
    found = _nvidia_smi_gpus(visible)
    if found is not None:
        return found
    if not _gpu_device_nodes():
        return ()                       # no driver device nodes: skip importing torch (seconds)
    try:
        import torch
    except ImportError:
        return ()
    if not torch.cuda.is_available():
        return ()
    return tuple(Gpu(props.name, props.total_memory // 2**20, capability=(props.major, props.minor))
                 for props in map(torch.cuda.get_device_properties, range(torch.cuda.device_count())))


def _nvidia_smi_gpus(visible: str | None) -> tuple[Gpu, ...] | None:
    """GPUs as nvidia-smi lists them, narrowed to CUDA_VISIBLE_DEVICES; None without nvidia-smi."""
    smi = shutil.which("nvidia-smi")
    if not smi:
        return None
    fields = ["index", "uuid", "name", "memory.total", "driver_version", "compute_cap"]
    out = None
    for query in (fields, fields[:-1]):  # drivers before 510 do not know compute_cap
        try:
            out = subprocess.run([smi, f"--query-gpu={','.join(query)}", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=30, check=True).stdout
            break
        except (OSError, subprocess.SubprocessError):
            continue
    rows = [[part.strip() for part in line.split(",")] for line in (out or "").splitlines()]
    rows = [row + [""] * (len(fields) - len(row)) for row in rows if len(row) >= 5 and row[2]]
    if not rows:
        return None
    if visible is not None:
        # CUDA's rule: a comma-separated list of indices or UUID prefixes; it stops at the first
        # entry that names no GPU.
        chosen = []
        for entry in (e.strip() for e in visible.split(",")):
            match = [r for r in rows if entry and (r[0] == entry or r[1].startswith(entry))]
            if len(match) != 1 or match[0] in chosen:
                break
            chosen.append(match[0])
        rows = chosen
    return tuple(Gpu(name, int(memory) if memory.isdigit() else None, driver, _capability(cap))
                 for _, _, name, memory, driver, cap in rows)


def _capability(text: str) -> tuple[int, int] | None:
    match = re.fullmatch(r"(\d+)\.(\d+)", text.strip())
    return (int(match.group(1)), int(match.group(2))) if match else None


def torch_cuda_devices() -> int:
    """How many GPUs this process's torch can use (0 without torch, or with a CPU-only build)."""
    if not gpus():
        return 0
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _gpu_device_nodes() -> bool:
    """True when an NVIDIA or AMD GPU driver exposes device nodes (/dev/nvidia0, /dev/kfd)."""
    return any(Path("/dev").glob("nvidia[0-9]*")) or Path("/dev/kfd").exists()


# ---------------------------------------------------------------- CPUs, memory, software


def cpu_info() -> dict:
    """model, sockets, cores (physical, per socket) and vcpus (logical, whole host).

    /proc/cpuinfo where it exists (Linux); elsewhere only the model and the logical count.
    """
    model, sockets, cores = "", set(), set()
    cores_per_socket = None
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    physical_id = "0"
    for line in text.splitlines():
        key, _, value = (part.strip() for part in line.partition(":"))
        if key == "model name" and not model:
            model = value
        elif key == "physical id":
            physical_id = value
            sockets.add(value)
        elif key == "core id":
            cores.add((physical_id, value))
        elif key == "cpu cores" and value.isdigit():
            cores_per_socket = int(value)
    n_sockets = len(sockets) or (1 if text else None)
    if cores_per_socket is None and cores and n_sockets:
        cores_per_socket = len(cores) // n_sockets
    return {
        "model": model or platform.processor(),
        "sockets": n_sockets,
        "cores_per_socket": cores_per_socket,
        "vcpus": os.cpu_count(),
    }


def usable_cores() -> int:
    """CPU cores this process may use: its affinity (a container's cpuset), or fewer where a
    cgroup CPU quota caps it (Backend.AI sessions get -r cpu=N either way), not the whole host."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]  # cgroup v2
        if quota != "max":
            cores = min(cores, max(1, -(-int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return cores


def memory_info() -> dict:
    """total_bytes of host memory (None if unknown)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return {"total_bytes": int(line.split()[1]) * 1024}
    except (OSError, ValueError, IndexError):
        pass
    try:
        return {"total_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")}
    except (ValueError, OSError, AttributeError):
        return {"total_bytes": None}


def _torch_build() -> dict:
    """torch's version and the CUDA it was built for, read from torch/version.py without importing torch."""
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return {}
    try:
        text = (Path(list(spec.submodule_search_locations)[0]) / "version.py").read_text()
    except OSError:
        return {}
    found = dict(re.findall(r"^(__version__|cuda|hip)\b[^=]*=\s*'([^']*)'", text, re.M))
    return {"torch": found.get("__version__", ""), "cuda_version": found.get("cuda", ""),
            "hip_version": found.get("hip", "")}


def software_info() -> dict:
    """Versions that decide a result: framework, CUDA, cuDNN, NCCL, kernel, OS.

    torch is imported (for cuDNN and NCCL) only where there are GPUs, which is where those matter.
    """
    info = {"python": platform.python_version(), "kernel_version": platform.release(),
            "operating_system": os_name(), **_torch_build()}
    try:
        info["torchvision"] = importlib.metadata.version("torchvision")
    except importlib.metadata.PackageNotFoundError:
        pass
    if not gpus() or not info.get("torch"):
        return info
    import torch

    if torch.backends.cudnn.is_available():
        info["cudnn_version"] = str(torch.backends.cudnn.version())
    try:
        info["nccl_version"] = ".".join(str(p) for p in torch.cuda.nccl.version())
    except (AttributeError, RuntimeError, TypeError):
        pass
    return info


def os_name() -> str:
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    return f"{platform.system()} {platform.release()}".strip()


def host_name() -> str:
    return socket.gethostname()


# ---------------------------------------------------------------- shared memory and disk


def shm_bytes(path: str = "/dev/shm") -> tuple[int, int] | None:
    """(size, free) of the shared-memory file system in bytes; None where there is none."""
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize


def disk_free(path: Path) -> tuple[Path, int]:
    """Free bytes on the file system that holds `path` (or would: its nearest existing parent)."""
    where = Path(path).resolve()
    while not where.exists():
        where = where.parent
    return where, shutil.disk_usage(where).free


# ---------------------------------------------------------------- Backend.AI cluster sessions


@dataclass(frozen=True)
class Cluster:
    """Where this host stands in a multi-node session."""
    hosts: tuple[str, ...]
    node_rank: int
    master_addr: str
    master_port: int

    @property
    def nnodes(self) -> int:
        return len(self.hosts)


def rank_order(hosts) -> tuple[str, ...]:
    """The hosts as node ranks: main1 first, then sub1, sub2, ... sub10 by number. The manager does
    not keep an order: 23.09 joins the session's kernels as the database returns them
    (registry.py AgentRegistry.start_session), and the local stack gave `sub1,main1` as often as
    `main1,sub1`. Every host sorts the same set the same way, so all agree on each other's rank."""
    def key(name: str):
        m = re.fullmatch(r"(.*?)(\d+)", name)
        role, index = (m.group(1), int(m.group(2))) if m else (name, 0)
        return role != "main", role, index, name

    return tuple(sorted(hosts, key=key))


def cluster_from_env(env=os.environ) -> Cluster | None:
    """A Backend.AI cluster session from its BACKENDAI_CLUSTER_* variables; None on a single host.

    Nothing in such a session sets MASTER_ADDR or RANK: the master is main1, a node's rank is its
    position among the hosts in rank_order. MLPERF_MASTER_ADDR and MLPERF_MASTER_PORT override the
    address and port where host names do not resolve.
    """
    hosts = rank_order(h for h in env.get("BACKENDAI_CLUSTER_HOSTS", "").split(",") if h)
    size = env.get("BACKENDAI_CLUSTER_SIZE")
    if hosts and size and size.strip() != str(len(hosts)):
        raise UserError(f"BACKENDAI_CLUSTER_SIZE={size} but BACKENDAI_CLUSTER_HOSTS lists {len(hosts)} hosts")
    if len(hosts) < 2:
        return None
    me = env.get("BACKENDAI_CLUSTER_HOST", "")
    if me not in hosts:
        raise UserError(f"BACKENDAI_CLUSTER_HOST={me!r} is not in BACKENDAI_CLUSTER_HOSTS={','.join(hosts)}: "
                        "run from inside the cluster session")
    port = env.get("MLPERF_MASTER_PORT", str(DEFAULT_MASTER_PORT))
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise UserError(f"MLPERF_MASTER_PORT={port!r} is not a port number (1-65535)")
    return Cluster(hosts=hosts, node_rank=hosts.index(me),
                   master_addr=env.get("MLPERF_MASTER_ADDR", hosts[0]), master_port=int(port))
