"""What this host is, in the words of MLPerf's system description (systems/<system>.json).

Every value is a string, as in published submissions and as mlperf_logging.system_desc_checker
expects (it joins some of them with ","), except `other_software_stack`, a mapping. What cannot be
detected is "" rather than guessed. The facts come from mlperf.host.
"""
from __future__ import annotations

import re

from mlperf import host
from mlperf.errors import UserError

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
# (mlperf_logging.system_desc_checker, checked from ruleset 4.0.0 on; published trees use these words).
AVAILABILITY = {"onprem": "Available on-premise", "cloud": "Available cloud", "preview": "Preview",
                "research": "Research, Development, or Internal (RDI)"}


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
                  status: str = "", nodes: int = 1, sw_notes: str = "") -> dict:
    """This host as an MLPerf system_desc mapping (all fields present, strings, "" when unknown).

    submitter/division/status come from the caller (they are facts about the submission, found in
    the result logs), not from the hardware.
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
        "status": AVAILABILITY.get(status, status),
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
    return desc
