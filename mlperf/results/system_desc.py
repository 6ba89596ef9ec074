"""What this host is, in the words of MLPerf's system description (systems/<system>.json).

Every value is a string, as in published submissions and as mlperf_logging.system_desc_checker
expects (it joins some of them with ","), except `other_software_stack`, a mapping. What cannot be
detected is "" rather than guessed. The facts come from mlperf.host.
"""
from __future__ import annotations

import re
from pathlib import Path

from mlperf import host
from mlperf.errors import UserError
from object_detection.run_request import STATUSES

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


# submission_status as the logs carry it -> "status" as the system-description checker accepts it
# from ruleset 4.0.0 on (mlperf_logging.system_desc_checker). Before 4.0.0 nothing checks the field and
# published trees (NVIDIA's v3.0 and v3.1 systems) carry the log's own word, "onprem".
AVAILABILITY = dict(zip(STATUSES, ("Available on-premise", "Available cloud", "Preview",
                                    "Research, Development, or Internal (RDI)"), strict=True))
AVAILABILITY_WORDS_FROM = (4, 0)

# The fields MLCommons' submission rules mark "meaningful response required" (the system description
# table of mlcommons/policies submission_rules.adoc), as far as training's system_desc has them; the
# core count stands for "core count or vCPU count". A package leaves none of them blank.
MEANINGFUL = (
    "submitter", "division", "status", "system_name", "number_of_nodes", "host_processors_per_node",
    "host_processor_model_name", "host_processor_core_count", "host_memory_capacity", "host_storage_type",
    "host_storage_capacity", "host_networking", "host_networking_topology", "host_memory_configuration",
    "accelerators_per_node", "accelerator_model_name", "accelerator_host_interconnect",
    "accelerator_memory_configuration", "accelerator_memory_capacity", "accelerator_interconnect", "cooling",
    "framework", "other_software_stack", "operating_system",
)
NO_ACCELERATOR = "N/A (no accelerator)"


def status_wording(status: str, ruleset: str | None) -> str:
    """The system description's `status` for a log's submission_status, in the ruleset's words."""
    if ruleset and tuple(int(x) for x in ruleset.split(".")[:2]) < AVAILABILITY_WORDS_FROM:
        return {v: k for k, v in AVAILABILITY.items()}.get(status, status)
    return AVAILABILITY.get(status, status)


def blank_fields(desc: dict) -> list[str]:
    """The MEANINGFUL fields a system description leaves empty (or lacks)."""
    return [name for name in MEANINGFUL if not desc.get(name) or (isinstance(desc[name], str) and not desc[name].strip())]


def check_submission(submitter, status) -> dict:
    """{"submitter": ..., "status": ...} after checking them: the organisation names a folder of
    the submission tree, and the status is one the compliance checker accepts."""
    submitter, status = str(submitter or "").strip(), str(status or "").strip()
    if not submitter or "/" in submitter or "\\" in submitter or submitter in (".", ".."):
        raise UserError(f"--submitter {submitter!r} must be your organisation's name (it names the submission "
                        "folder): set mlperf.submitter in invoke.yaml or pass --submitter ORG")
    if status not in AVAILABILITY:
        raise UserError(f"--status {status!r} is not one of {', '.join(AVAILABILITY)} (submission_status in "
                        "MLPerf logs): set mlperf.status in invoke.yaml or pass --status")
    return {"submitter": submitter, "status": status}


def _gib(n_bytes: int | None) -> str:
    return f"{n_bytes / 2**30:.0f} GB" if n_bytes else ""


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def default_system_name() -> str:
    """A name for results/<system>/: host name and accelerators, e.g. 'node1_8xnvidia-h100-80gb-hbm3'."""
    gpus = host.gpus()
    name = _slug(host.host_name().split(".")[0]) or "host"
    return f"{name}_{len(gpus)}x{_slug(gpus[0].name)}" if gpus else f"{name}_cpu"


def detect_system(system_name: str | None = None, *, submitter: str = "", division: str = "",
                  status: str = "", nodes: int = 1, sw_notes: str = "", ruleset: str | None = None,
                  folder: Path | None = None) -> dict:
    """This host as an MLPerf system_desc mapping (all fields present, strings, "" when unknown).

    submitter/division/status come from the caller (they are facts about the submission, found in
    the result logs), not from the hardware; `status` is written in `ruleset`'s words. `folder`: where
    the run keeps its data and results, whose disk is the host storage described.
    """
    gpus = host.gpus()
    cpu = host.cpu_info()
    memory = host.memory_info()
    sw = host.software_info()
    desc = dict.fromkeys(SYSTEM_DESC_FIELDS, "")
    cores_total = (cpu["cores_per_socket"] * cpu["sockets"]
                   if cpu["cores_per_socket"] and cpu["sockets"] else None)
    desc.update({
        "submitter": submitter,
        "division": division,
        "status": status_wording(status, ruleset),
        "system_name": system_name or default_system_name(),
        "number_of_nodes": str(nodes),
        "host_processors_per_node": str(cpu["sockets"] or ""),
        "host_processor_model_name": cpu["model"],
        # MLPerf counts physical cores per processor (the DGX H100's 8480C: "56").
        "host_processor_core_count": str(cpu["cores_per_socket"] or ""),
        "host_processor_vcpu_count": str(cpu["vcpus"] or ""),
        "host_memory_capacity": _gib(memory["total_bytes"]),
        "accelerators_per_node": str(len(gpus)),
        "accelerator_model_name": gpus[0].name if gpus else "",
        "accelerator_memory_capacity": _gib(gpus[0].memory_mib * 2**20) if gpus and gpus[0].memory_mib else "",
        "framework": f"PyTorch {sw['torch']}" if sw.get("torch") else "",
        "operating_system": sw["operating_system"],
        "sw_notes": sw_notes,
        "hw_notes": f"host {host.host_name()}" + (f", {cores_total} physical cores in all"
                                                       if cores_total else ""),
    })
    stack = {key: sw[key] for key in ("cuda_version", "hip_version", "cudnn_version", "nccl_version",
                                      "kernel_version", "python", "torchvision") if sw.get(key)}
    if gpus and gpus[0].driver:
        stack["cuda_driver_version"] = gpus[0].driver
    desc["other_software_stack"] = stack
    desc.update({k: v for k, v in _storage(folder or Path.cwd()).items() if v})
    desc["host_networking"] = _networking()
    if nodes == 1:
        desc["host_networking_topology"] = "N/A (single node)"
    desc.update(_accelerator_links(gpus))
    return desc


def _storage(folder: Path) -> dict:
    """host_storage_type and _capacity of the disk that holds `folder`: its file system, and for a
    block device whether it is NVMe, SSD or HDD (/sys/block), as far as Linux says."""
    import shutil

    where = Path(folder).resolve()
    while not where.exists() and where != where.parent:
        where = where.parent
    try:
        total = shutil.disk_usage(where).total
    except OSError:
        return {}
    mount = ("", "", "")
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            device, point, fstype = (line.split() + ["", "", ""])[:3]
            point = point.replace("\\040", " ")
            if (where == Path(point) or Path(point) in where.parents) and len(point) >= len(mount[1]):
                mount = (device, point, fstype)
    except OSError:
        pass
    device, _, fstype = mount
    kind = ""
    block = re.match(r"/dev/(nvme\d+n\d+|[a-z]+?d[a-z]+|vd[a-z]+|xvd[a-z]+)", device)
    if block:
        name = block.group(1)
        try:
            rotational = Path(f"/sys/block/{name}/queue/rotational").read_text().strip() == "1"
        except OSError:
            rotational = None
        kind = "NVMe SSD" if name.startswith("nvme") else {True: "HDD", False: "SSD", None: ""}[rotational]
    elif fstype in ("nfs", "nfs4", "cifs", "smb3", "lustre", "gpfs", "beegfs", "cephfs", "fuse.weka"):
        kind = f"network file system ({fstype})"
    if fstype and kind and not kind.startswith("network"):
        kind += f" ({fstype})"
    return {"host_storage_type": kind, "host_storage_capacity": f"{total / 10**9:.0f} GB" if total else ""}


def _networking() -> str:
    """The host's network links as Linux lists them: InfiniBand ports with their rate, and the
    physical Ethernet interfaces with their speed (virtual ones, loopback and bridges left out)."""
    links = []
    for port in sorted(Path("/sys/class/infiniband").glob("*/ports/*/rate")):
        try:
            links.append(f"InfiniBand {port.parents[2].name} port {port.parent.name} {port.read_text().strip()}")
        except OSError:
            continue
    for nic in sorted(Path("/sys/class/net").glob("*")):
        if not (nic / "device").exists():  # virtual: lo, veth, bridges, tunnels
            continue
        try:
            speed = int((nic / "speed").read_text().strip())
        except (OSError, ValueError):
            speed = -1
        links.append(f"Ethernet {nic.name}" + (f" {speed / 1000:g} Gb/s" if speed > 0 else ""))
    return ", ".join(links)


def _accelerator_links(gpus) -> dict:
    """How the accelerators connect to the host and to each other (nvidia-smi's PCIe link and
    NVLink state), and their memory type where the model name says it; "N/A" with none."""
    if not gpus:
        return {key: NO_ACCELERATOR for key in ("accelerator_model_name", "accelerator_host_interconnect",
                                                 "accelerator_memory_configuration", "accelerator_memory_capacity",
                                                 "accelerator_interconnect")}
    import subprocess

    out = {}
    memory = re.search(r"\b(HBM\d\w*|GDDR\d\w*)\b", gpus[0].name)
    if memory:
        out["accelerator_memory_configuration"] = memory.group(1)
    try:
        pcie = subprocess.run(["nvidia-smi", "--query-gpu=pcie.link.gen.max,pcie.link.width.max",
                               "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
        gen, _, width = pcie.stdout.splitlines()[0].partition(",") if pcie.returncode == 0 and pcie.stdout else ("", "", "")
        if gen.strip().isdigit() and width.strip().isdigit():
            out["accelerator_host_interconnect"] = f"PCIe Gen{gen.strip()} x{width.strip()}"
        nvlink = subprocess.run(["nvidia-smi", "nvlink", "--status", "-i", "0"], capture_output=True, text=True,
                                timeout=30)
        links = re.findall(r"Link \d+: ([\d.]+) GB/s", nvlink.stdout) if nvlink.returncode == 0 else []
        if links:
            out["accelerator_interconnect"] = f"NVLink, {len(links)} links of {links[0]} GB/s per GPU"
        elif len(gpus) > 1 and "accelerator_host_interconnect" in out:
            out["accelerator_interconnect"] = f"PCIe (no NVLink): {out['accelerator_host_interconnect']}"
    except (OSError, subprocess.SubprocessError, IndexError):
        pass
    return out
