"""`invoke doctor`: what the benchmark needs against what this host has, as one table.

Each check gives a level: ok, warn (works, but slower or partly), or FAIL (a step will not run);
FAIL rows say what to do and make the task exit 1. Hardware and versions come from mlperf.host,
the dataset state from mlperf.datasets (fetch's plan, verify's stamp), so doctor says the same as
the steps themselves.
"""
from __future__ import annotations

import os
import platform
import re
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


def _driver_cuda() -> tuple[int, int] | None:
    """The newest CUDA that the libcuda this process loads supports (cuDriverGetVersion, no cuInit
    needed): the driver's own, or the forward-compat one LD_LIBRARY_PATH finds first; None without."""
    import ctypes

    try:
        version = ctypes.c_int()
        if ctypes.CDLL("libcuda.so.1").cuDriverGetVersion(ctypes.byref(version)) != 0:
            return None
    except (OSError, AttributeError):
        return None
    return version.value // 1000, version.value % 1000 // 10


def _compat_libcuda_row(driver: str, ld_library_path: str) -> list[Check]:
    """A FAIL row when the libcuda the loader takes first from LD_LIBRARY_PATH is a CUDA
    forward-compat one older than the kernel driver: CUDA then fails with error 803 ("unsupported
    display driver / cuda driver combination"; seen with compat 580.95.05 before driver 580.159.04).
    The image puts /usr/local/cuda/compat/lib first, as NGC and Lablup's images do, for the opposite
    case, a driver older than the image's CUDA."""
    def version(text: str) -> tuple[int, ...]:
        return tuple(int(p) for p in re.findall(r"\d+", text))

    for folder in filter(None, ld_library_path.split(":")):
        lib = Path(folder) / "libcuda.so.1"
        if not lib.exists():
            continue
        real = lib.resolve().name.removeprefix("libcuda.so.")
        if "compat" not in folder or not driver or version(real) >= version(driver):
            return []
        return [Check("CUDA compat", "FAIL", f"libcuda {real} from {folder} before driver {driver}",
                      f"CUDA fails with error 803: take {folder} off LD_LIBRARY_PATH "
                      f"(export LD_LIBRARY_PATH=${{LD_LIBRARY_PATH#{folder}:}})")]
    return []


def check_gpu_arch() -> list[Check]:
    """Kernels in this torch (get_arch_list) for every GPU's compute capability, and the driver's
    CUDA for torch's: a V100 (sm_70) with a CUDA 13 torch passes every other row, then fails at the
    first kernel with "no kernel image is available for execution on the device"."""
    from mlperf import image

    gpus = host.gpus()
    try:
        import torch
    except ImportError:
        return []                        # check_gpus reports it
    if not gpus or torch.version.cuda is None:
        return []                        # no GPUs, or a CPU/ROCm build: check_gpus covers it
    compat = _compat_libcuda_row(gpus[0].driver, os.environ.get("LD_LIBRARY_PATH", ""))
    caps = [g.capability for g in gpus]
    if None in caps and torch.cuda.is_available():   # drivers before 510: nvidia-smi has no compute_cap
        caps = [torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())]
    # torch 2.11 answers [] when CUDA fails to start (seen with error 803); the build's flags need no GPU
    flags = getattr(torch._C, "_cuda_getArchFlags", lambda: None)()
    arch, driver = torch.cuda.get_arch_list() or (flags or "").split(), _driver_cuda()
    found = (f"GPUs {' '.join(sorted({image.sm(c) for c in caps if c})) or 'of unknown capability'}; "
             f"torch {torch.__version__} (CUDA {torch.version.cuda}) has {' '.join(arch) or 'no arch list'}"
             + (f"; driver CUDA {driver[0]}.{driver[1]}" if driver else ""))
    problem = image.gpu_arch_problem(arch, caps, torch.version.cuda, driver)
    if problem:
        return compat + [Check("GPU arch", "FAIL", found, problem)]
    if not arch or None in caps:
        return compat + [Check("GPU arch", "warn", found, "cannot compare: run python -c \"import torch; "
                                                          "print(torch.cuda.get_arch_list())\" on the GPU host")]
    return compat + [Check("GPU arch", "ok", found)]


def check_shm(ds: Dataset) -> Check:
    """The launcher's own check (mlperf.preflight.shm_problem), for the configuration this host gets."""
    from mlperf import planning, preflight

    shm = host.shm_bytes()
    if shm is None:
        return Check("/dev/shm", "warn", "missing", "DataLoader workers need shared memory")
    gpus = host.gpus()
    cfg = planning.choose_config(None, gpus, ds.name)
    processes, scale = max(len(gpus), 1), preflight.image_scale(cfg)
    need = preflight.shm_needed(processes, cfg.workers, cfg.per_gpu_batch, scale)
    found = f"{human_size(shm[0])}, {human_size(shm[1])} free; {cfg.name} needs ~{human_size(need)}"
    problem = preflight.shm_problem(processes, cfg.workers, cfg.per_gpu_batch, scale)
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


def check_session(data_dir: Path, results_dir: Path, env: dict | None = None) -> list[Check]:
    """Inside a Backend.AI session: the vfolders, whether each folder a run writes outlives the session
    (FAIL for each on scratch or read-only, naming the vfolder to use), and the idle checkers."""
    from mlperf import storage

    env = os.environ if env is None else env
    if not storage.in_session(env):
        return []
    mounts = storage.persistent_mounts(env)
    listed = ", ".join(f"{m.path}{' (ro)' if m.read_only else ''}" for m in reversed(mounts)) or "none"
    rows = [Check("Backend.AI session", "ok" if storage.writable(mounts) else "FAIL", f"vfolders: {listed}",
                  "" if storage.writable(mounts) else storage.advice("results", "--results-dir", mounts))]
    results = Path(results_dir)
    for role, path, flag in (("data", Path(data_dir), "--data-dir"), ("results", results, "--results-dir"),
                             ("checkpoints", results, "--results-dir"), ("jobs", results / "jobs", "--results-dir")):
        problem = storage.scratch_problem(role, path, mounts, flag, env)
        rows.append(Check(f"storage {role}", "FAIL" if problem else "ok",
                          f"{path.absolute()}: {storage.describe(path, mounts, env)}",
                          problem.split(": ", 1)[1] if problem else ""))
    if not storage.batch_mode(env):
        rows.append(Check("session type", "warn", "interactive (or not known)",
                          "idle checkers (network_timeout: often 10 minutes without an app connection) end "
                          "interactive sessions, and a --detach'ed run does not count as activity: run long "
                          "series in a batch session (invoke session.create)"))
    return rows


def check_interconnect(env: dict | None = None, devices: Path = Path("/dev/infiniband"),
                       adapters: Path = Path("/sys/class/infiniband")) -> list[Check]:
    """InfiniBand, the NCCL variables the run uses (`--nodes all` passes every NCCL_* to each host),
    and in a cluster session whether each other host's SSH port answers. Without InfiniBand and
    without NCCL_SOCKET_IFNAME, multi-node NCCL runs over TCP on an interface it guesses."""
    env = os.environ if env is None else env
    found_devices = sorted(p.name for p in devices.iterdir()) if devices.is_dir() else []
    found_adapters = sorted(p.name for p in adapters.iterdir()) if adapters.is_dir() else []
    nccl = {k: v for k, v in sorted(env.items()) if k.startswith("NCCL_")}
    try:
        cluster = host.cluster_from_env(env)
    except UserError:
        cluster = None                  # check_cluster says what is wrong with the variables
    size = env.get("BACKENDAI_CLUSTER_SIZE", "1")
    multi = cluster is not None or (size.isdigit() and int(size) > 1)
    if found_devices:
        found = f"{', '.join(found_adapters) or 'adapters unknown'} ({', '.join(found_devices)} in {devices})"
        row = (Check("InfiniBand", "warn", found, "NCCL_IB_DISABLE=1 makes NCCL use TCP sockets: unset it")
               if nccl.get("NCCL_IB_DISABLE") == "1" else Check("InfiniBand", "ok", found))
    elif nccl.get("NCCL_NET", "").upper() == "IB":
        row = Check("InfiniBand", "FAIL", f"none ({devices} missing), NCCL_NET=IB",
                    "NCCL will not find an IB network: unset NCCL_NET (or NCCL_NET=Socket), or start the session "
                    "where the GPUs have RDMA (the resource group's InfiniBand devices)")
    elif multi and "NCCL_SOCKET_IFNAME" not in nccl:
        row = Check("InfiniBand", "warn", f"none ({devices} missing), no NCCL_SOCKET_IFNAME",
                    "multi-node NCCL then runs over TCP on an interface it guesses: set NCCL_SOCKET_IFNAME to the "
                    "cluster network's interface (ip -br addr; e.g. eth0)")
    else:
        row = Check("InfiniBand", "ok", f"none ({devices} missing)"
                    + (f"; NCCL uses TCP over {nccl['NCCL_SOCKET_IFNAME']}" if multi else "; one host: not needed"))
    rows = [row, Check("NCCL variables", "ok", ", ".join(f"{k}={v}" for k, v in nccl.items())
                       or "none set (NCCL picks the network and interface itself)",
                       "--nodes all passes them to every host" if multi and nccl else "")]
    if cluster is not None:
        rows.append(_cluster_ssh(cluster, env.get("MLPERF_SSH_CONFIG") or None))
    return rows


def _cluster_ssh(cluster, ssh_config: str | None) -> Check:
    """Whether `--nodes all` can reach the other hosts: host networking read, each SSH port tried."""
    from mlperf.cluster import host_network_problem, ssh_config_name, ssh_reachability

    problem = host_network_problem(cluster, ssh_config)
    if problem:
        return Check("cluster SSH", "warn", "host networking", problem)
    others = [h for i, h in enumerate(cluster.hosts) if i != cluster.node_rank]
    down = {h: why for h, why in ssh_reachability(others, ssh_config).items() if why}
    if down:
        return Check("cluster SSH", "warn", "; ".join(f"{h}: {why}" for h, why in down.items()),
                     f"invoke train --nodes all cannot reach them: check {ssh_config_name(ssh_config)} (Backend.AI "
                     "writes Host main*/sub*, port 2200) and that the session's containers are all running")
    return Check("cluster SSH", "ok", f"{', '.join(others)} answer ({ssh_config_name(ssh_config)})")


def run_checks(ds: Dataset, data_dir: Path, requirements: Path = PROJECT_ROOT / "requirements.txt",
               results_dir: Path = Path("results")) -> list[Check]:
    rows = [check_python()]
    rows += check_requirements(requirements.read_text().splitlines())
    rows += check_gpus(ds)
    rows += check_gpu_arch()
    rows += [check_shm(ds), check_disk(ds, data_dir), check_dataset(ds, data_dir), check_docker()]
    rows += check_cluster()
    rows += check_interconnect()
    rows += check_session(data_dir, results_dir)
    return rows


def render(rows: list[Check]) -> str:
    table = [("check", "", "found", "what to do")] + [(r.name, r.level, r.found, r.advice) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(3)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row[:3], widths)) + "  " + row[3]
                     for row in table).rstrip()


def doctor(ds: Dataset, data_dir: Path, results_dir: Path = Path("results")) -> list[Check]:
    """Print the table; raise UserError naming what is missing when a row FAILs."""
    rows = run_checks(ds, Path(data_dir), results_dir=Path(results_dir))
    print(render(rows))
    failed = [r for r in rows if r.level == "FAIL"]
    if failed:
        raise UserError(f"{len(failed)} requirement(s) missing: "
                        + "; ".join(f"{r.name}: {r.advice}" for r in failed))
    warned = sum(r.level == "warn" for r in rows)
    print(f"\nready ({warned} warning(s))" if warned else "\nready")
    return rows
