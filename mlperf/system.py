"""What this host is, in the words of MLPerf's system description (systems/<system>.json).

Every value is a string, as in published submissions and as mlperf_logging.system_desc_checker
expects (it joins some of them with ","), except `other_software_stack`, a mapping. What cannot be
detected is "" rather than guessed. torch is imported only on hosts with GPU device nodes (for the
GPUs without nvidia-smi, and cuDNN/NCCL versions): on a CPU host detection takes milliseconds.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
import re
import shutil
import socket
import subprocess
from pathlib import Path

# Every field of MLPerf Training's system_desc JSON, in the order published files use.
SYSTEM_DESC_FIELDS = (
    "submitter", "division", "status", "system_name", "number_of_nodes",
    "host_processors_per_node", "host_processor_model_name", "host_processor_core_count",
    "host_processor_vcpu_count", "host_processor_frequency", "host_processor_caches",
    "host_processor_interconnect", "host_memory_capacity", "host_storage_type", "host_storage_capacity",
    "host_networking", "host_networking_topology", "host_memory_configuration",
    "accelerators_per_node", "accelerator_model_name", "accelerator_host_interconnect",
    "accelerator_frequency", "accelerator_on-chip_memories", "accelerator_memory_configuration",
    "accelerator_memory_capacity", "accelerator_interconnect", "accelerator_interconnect_topology",
    "cooling", "hw_notes", "framework", "other_software_stack", "operating_system", "sw_notes",
)


def gpu_info() -> list[dict]:
    """One dict per visible GPU: name, memory_mib (int or None), driver ("" if unknown).

    nvidia-smi first (it sees the driver and needs no CUDA context); torch.cuda otherwise (e.g. ROCm),
    only when the host has GPU device nodes; [] when neither finds a GPU.
    """
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run(
                [smi, "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader,nounits"],
                capture_output=True, text=True, timeout=30, check=True).stdout
        except (OSError, subprocess.SubprocessError):
            out = ""
        gpus = []
        for line in out.splitlines():
            parts = [p.strip() for p in line.split(",")]
            if len(parts) == 3 and parts[0]:
                memory = int(parts[1]) if parts[1].isdigit() else None
                gpus.append({"name": parts[0], "memory_mib": memory, "driver": parts[2]})
        if gpus:
            return gpus
    if not _gpu_device_nodes():
        return []                       # no driver device nodes: skip importing torch (seconds)
    try:
        import torch
    except ImportError:
        return []
    if not torch.cuda.is_available():
        return []
    gpus = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        gpus.append({"name": props.name, "memory_mib": props.total_memory // 2**20, "driver": ""})
    return gpus


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


def _gpu_device_nodes() -> bool:
    """True when an NVIDIA or AMD GPU driver exposes device nodes (/dev/nvidia0, /dev/kfd)."""
    return any(Path("/dev").glob("nvidia[0-9]*")) or Path("/dev/kfd").exists()


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


def software_info(gpus: list[dict] | None = None) -> dict:
    """Versions that decide a result: framework, CUDA, cuDNN, NCCL, kernel, OS.

    torch is imported (for cuDNN and NCCL) only where there are GPUs, which is where those matter.
    """
    info = {"python": platform.python_version(), "kernel_version": platform.release(),
            "operating_system": _os_name(), **_torch_build()}
    try:
        info["torchvision"] = importlib.metadata.version("torchvision")
    except importlib.metadata.PackageNotFoundError:
        pass
    if not gpus or not info.get("torch"):
        return info
    import torch

    if torch.backends.cudnn.is_available():
        info["cudnn_version"] = str(torch.backends.cudnn.version())
    try:
        info["nccl_version"] = ".".join(str(p) for p in torch.cuda.nccl.version())
    except (AttributeError, RuntimeError, TypeError):
        pass
    return info


def _os_name() -> str:
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    return f"{platform.system()} {platform.release()}".strip()


def _gib(n_bytes: int | None) -> str:
    return f"{n_bytes / 2**30:.0f} GB" if n_bytes else ""


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def default_system_name(gpus: list[dict] | None = None) -> str:
    """A name for results/<system>/: host name and accelerators, e.g. 'node1_8xnvidia-h100-80gb-hbm3'."""
    gpus = gpu_info() if gpus is None else gpus
    host = _slug(socket.gethostname().split(".")[0]) or "host"
    return f"{host}_{len(gpus)}x{_slug(gpus[0]['name'])}" if gpus else f"{host}_cpu"


def detect_system(system_name: str | None = None, *, submitter: str = "", division: str = "",
                  status: str = "", nodes: int = 1, sw_notes: str = "") -> dict:
    """This host as an MLPerf system_desc mapping (all fields present, strings, "" when unknown).

    submitter/division/status come from the caller (they are facts about the submission, found in
    the result logs), not from the hardware.
    """
    gpus = gpu_info()
    cpu = cpu_info()
    memory = memory_info()
    sw = software_info(gpus)
    desc = dict.fromkeys(SYSTEM_DESC_FIELDS, "")
    cores_total = (cpu["cores_per_socket"] * cpu["sockets"]
                   if cpu["cores_per_socket"] and cpu["sockets"] else None)
    desc.update({
        "submitter": submitter,
        "division": division,
        "status": status,
        "system_name": system_name or default_system_name(gpus),
        "number_of_nodes": str(nodes),
        "host_processors_per_node": str(cpu["sockets"] or ""),
        "host_processor_model_name": cpu["model"],
        # MLPerf counts physical cores per processor (the DGX H100's 8480C: "56").
        "host_processor_core_count": str(cpu["cores_per_socket"] or ""),
        "host_processor_vcpu_count": str(cpu["vcpus"] or ""),
        "host_memory_capacity": _gib(memory["total_bytes"]),
        "accelerators_per_node": str(len(gpus)),
        "accelerator_model_name": gpus[0]["name"] if gpus else "",
        "accelerator_memory_capacity": _gib(gpus[0]["memory_mib"] * 2**20)
        if gpus and gpus[0]["memory_mib"] else "",
        "framework": f"PyTorch {sw['torch']}" if sw.get("torch") else "",
        "operating_system": sw["operating_system"],
        "sw_notes": sw_notes,
        "hw_notes": f"host {socket.gethostname()}" + (f", {cores_total} physical cores in all"
                                                       if cores_total else ""),
    })
    stack = {key: sw[key] for key in ("cuda_version", "hip_version", "cudnn_version", "nccl_version",
                                      "kernel_version", "python", "torchvision") if sw.get(key)}
    if gpus and gpus[0]["driver"]:
        stack["cuda_driver_version"] = gpus[0]["driver"]
    desc["other_software_stack"] = stack
    return desc
