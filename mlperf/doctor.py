"""`invoke doctor`: what the benchmark needs against what this host has, as one table.

Each check gives a level: ok, warn (works, but slower or partly), or FAIL (a step will not run);
FAIL rows say what to do and make the task exit 1. Hardware and versions come from mlperf.host,
the dataset state from mlperf.datasets (fetch's plan, verify's stamp), so doctor says the same as
the steps themselves.
"""
from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from mlperf import PROJECT_ROOT, host
from mlperf.datasets import Dataset
from mlperf.errors import UserError
from mlperf.files import human_size



@dataclass
class Check:
    name: str
    level: str      # "ok", "warn", "FAIL"
    found: str
    advice: str = ""


def check_python() -> Check:
    found = platform.python_version()
    if sys.version_info < (3, 10):
        return Check("python", "FAIL", found, "use Python 3.10 or newer")
    return Check("python", "ok", found)


def check_requirements(lines: list[str]) -> list[Check]:
    """One row per requirement line: installed at a version inside its range?"""
    from importlib import metadata

    from packaging.requirements import InvalidRequirement, Requirement

    rows = []
    for raw in lines:
        line = raw.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        try:
            req = Requirement(line)
        except InvalidRequirement:
            rows.append(Check(f"package {line}", "warn", "unparsable line", "fix requirements.txt"))
            continue
        if req.marker is not None and not req.marker.evaluate():
            continue
        try:
            version = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            rows.append(Check(f"package {req.name}", "FAIL", "not installed",
                              f"pip install '{req}' (or pip install -r requirements.txt)"))
            continue
        if req.specifier and not req.specifier.contains(version, prereleases=True):
            rows.append(Check(f"package {req.name}", "FAIL", f"{version}, needs {req.specifier}",
                              f"pip install '{req}'"))
        else:
            rows.append(Check(f"package {req.name}", "ok", version))
    return rows


def check_gpus(dataset: Dataset) -> list[Check]:
    """GPUs (count, model, driver), and CUDA and NCCL as torch sees them."""
    gpus = host.gpus()
    software = host.software_info()
    need_gpu = bool(dataset.files)   # real data (coco2017): CPU training would take weeks
    rows = []
    if gpus:
        names = sorted({g.name for g in gpus})
        driver = gpus[0].driver or "unknown"
        rows.append(Check("GPUs", "ok", f"{len(gpus)} x {', '.join(names)}, driver {driver}"))
    else:
        rows.append(Check("GPUs", "FAIL" if need_gpu else "warn", "none visible",
                          "run on a GPU host (Backend.AI: -r cuda.device=N), or check nvidia-smi"
                          if need_gpu else "training runs on the CPU: fine for shapes, too slow for coco2017"))
    try:
        import torch
    except ImportError:
        rows.append(Check("torch CUDA", "FAIL", "torch not importable", "pip install -r requirements.txt"))
        return rows
    cuda_ok = torch.cuda.is_available()
    cuda = software.get("cuda_version") or "CPU-only build"
    if cuda_ok:
        rows.append(Check("torch CUDA", "ok", f"torch {torch.__version__}, CUDA {cuda}, "
                                              f"{torch.cuda.device_count()} device(s)"))
    else:
        level = "FAIL" if gpus else "warn"   # no GPUs at all is the GPUs row's failure
        advice = ("torch cannot use the GPUs: install a CUDA build of torch matching the driver "
                  "(or use the NGC image from invoke image)" if gpus else
                  "no CUDA: training uses the CPU")
        rows.append(Check("torch CUDA", level, f"torch {torch.__version__}, {cuda}, not available", advice))
    nccl = software.get("nccl_version")
    if cuda_ok and torch.distributed.is_available() and torch.distributed.is_nccl_available():
        rows.append(Check("NCCL", "ok", nccl or "available"))
    elif cuda_ok:
        rows.append(Check("NCCL", "FAIL", "not available to torch",
                          "multi-GPU training needs torch built with NCCL"))
    else:
        rows.append(Check("NCCL", "warn", "not available (no CUDA)", "multi-process runs use gloo on the CPU"))
    return rows


def check_shm(ds: Dataset) -> Check:
    """The launcher's own check (mlperf.launch.shm_problem), for the configuration this host gets."""
    from mlperf import launch

    shm = host.shm_bytes()
    if shm is None:
        return Check("/dev/shm", "warn", "missing", "DataLoader workers need shared memory")
    gpus = host.gpus()
    cfg = launch.choose_config(None, gpus, ds.name)
    processes, scale = max(len(gpus), 1), launch.image_scale(cfg)
    need = launch.shm_needed(processes, cfg.workers, cfg.per_gpu_batch, scale)
    found = f"{human_size(shm[0])}, {human_size(shm[1])} free; {cfg.name} needs ~{human_size(need)}"
    problem = launch.shm_problem(processes, cfg.workers, cfg.per_gpu_batch, scale)
    if problem:
        return Check("/dev/shm", "FAIL", found, problem.split(": ", 1)[1])
    return Check("/dev/shm", "ok", found)


def check_disk(ds: Dataset, data_dir: Path) -> Check:
    from mlperf.datasets.fetch import space_needed

    where, free = host.disk_free(data_dir)
    needed = sum(space_needed(ds, data_dir))
    total = sum(spec.size or 0 for spec in ds.files) * 2
    found = f"{human_size(free)} free at {where}"
    if total:
        found += f", {ds.name} still needs {human_size(needed)} (of ~{human_size(total)})"
    if needed > free:
        return Check("disk", "FAIL", found, f"free {human_size(needed - free)} or fetch to a bigger disk: "
                                            "invoke fetch --data-dir /path/with/space")
    return Check("disk", "ok", found)


def check_dataset(ds: Dataset, data_dir: Path) -> Check:
    root = ds.root(data_dir)
    from mlperf.datasets.verify import is_verified

    if is_verified(ds, data_dir):
        return Check(f"dataset {ds.name}", "ok", f"fetched and verified in {root}")
    if root.exists():
        return Check(f"dataset {ds.name}", "warn", f"{root} exists, not verified (or changed since)",
                     f"invoke verify --dataset {ds.name} --data-dir {data_dir}")
    return Check(f"dataset {ds.name}", "warn", "not fetched",
                 f"invoke fetch --dataset {ds.name} --data-dir {data_dir} (invoke all does it too)")


def check_docker() -> Check:
    """Optional: only `invoke image --build` needs Docker (Backend.AI sessions have none)."""
    docker = shutil.which("docker")
    if docker is None:
        return Check("docker", "warn", "no docker CLI", "needed only for invoke image --build")
    try:
        proc = subprocess.run([docker, "info", "--format", "{{.ServerVersion}}"], capture_output=True,
                              text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return Check("docker", "warn", "daemon not answering", "needed only for invoke image --build")
    if proc.returncode != 0:
        return Check("docker", "warn", "CLI found, daemon not answering",
                     "start the Docker daemon to use invoke image --build")
    return Check("docker", "ok", f"daemon {proc.stdout.strip()}")


def check_cluster(env: dict | None = None) -> list[Check]:
    """Backend.AI multi-node variables, when this is a cluster session."""
    env = os.environ if env is None else env
    present = {k: env[k] for k in host.CLUSTER_VARS if env.get(k)}
    if not present:
        return []
    found = ", ".join(f"{k.removeprefix('BACKENDAI_CLUSTER_').lower()}={v}" for k, v in present.items())
    try:
        host.cluster_from_env(env)  # what `invoke train` reads
    except UserError as exc:
        return [Check("Backend.AI cluster", "warn", found, f"{exc} (the session may still be starting)")]
    return [Check("Backend.AI cluster", "ok", found)]


def run_checks(ds: Dataset, data_dir: Path, requirements: Path = PROJECT_ROOT / "requirements.txt") -> list[Check]:
    rows = [check_python()]
    rows += check_requirements(requirements.read_text().splitlines())
    rows += check_gpus(ds)
    rows += [check_shm(ds), check_disk(ds, data_dir), check_dataset(ds, data_dir), check_docker()]
    rows += check_cluster()
    return rows


def render(rows: list[Check]) -> str:
    table = [("check", "", "found", "what to do")] + [(r.name, r.level, r.found, r.advice) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(3)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row[:3], widths)) + "  " + row[3]
                     for row in table).rstrip()


def doctor(ds: Dataset, data_dir: Path) -> list[Check]:
    """Print the table; raise UserError naming what is missing when a row FAILs."""
    rows = run_checks(ds, Path(data_dir))
    print(render(rows))
    failed = [r for r in rows if r.level == "FAIL"]
    if failed:
        raise UserError(f"{len(failed)} requirement(s) missing: "
                        + "; ".join(f"{r.name}: {r.advice}" for r in failed))
    warned = sum(r.level == "warn" for r in rows)
    print(f"\nready ({warned} warning(s))" if warned else "\nready")
    return rows
