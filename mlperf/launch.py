"""The torchrun command for `invoke train`: local GPUs or CPU, or a Backend.AI cluster session.

Pre-flight checks turn the usual mistakes (no dataset, not verified, too many GPUs, Backend.AI's
64 MB /dev/shm) into one line before any process starts.
"""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

from mlperf import PROJECT_ROOT, host
from mlperf.errors import UserError
from mlperf.host import Cluster

# Bytes one decoded training image with its masks takes in shared memory on its way from a worker:
# 640x480 RGB plus about seven 640x480 uint8 masks, the COCO average.
SHM_BYTES_PER_IMAGE = 640 * 480 * (3 + 7)
PREFETCH_FACTOR = 2


def torchrun_args(nproc: int, cluster: Cluster | None, node_rank: int | None = None) -> list[str]:
    """torchrun's own arguments: standalone on one host, static rendezvous across a cluster."""
    args = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}"]
    if cluster is None:
        return args + ["--standalone"]
    rank = cluster.node_rank if node_rank is None else node_rank
    return args + [f"--nnodes={cluster.nnodes}", f"--node-rank={rank}",
                   f"--master-addr={cluster.master_addr}", f"--master-port={cluster.master_port}"]


def print_configs() -> None:
    from object_detection.recipe import CONFIGS

    print(f"{'name':<16} {'gpus':>4} {'batch/gpu':>9} {'global':>6} {'workers':>7}  profile     description")
    for cfg in CONFIGS.values():
        print(f"{cfg.name:<16} {cfg.gpus:>4} {cfg.per_gpu_batch:>9} {cfg.global_batch:>6} {cfg.workers:>7}  "
              f"{cfg.profile:<11} {cfg.description}")


def describe_config(name: str) -> dict:
    """A named configuration as a dict, for the system description."""
    from object_detection.recipe import CONFIGS

    if name not in CONFIGS:
        raise UserError(f"unknown configuration {name!r}: see `invoke train --list-configs`")
    return CONFIGS[name].as_dict()


def choose_config(name: str | None, gpus: list[host.Gpu], dataset: str):
    from object_detection.recipe import CONFIGS, pick_config

    if name is None:
        return pick_config(len(gpus), gpus[0].name if gpus else "", dataset)
    if name not in CONFIGS:
        raise UserError(f"unknown configuration {name!r}: choose one of {', '.join(CONFIGS)} "
                        "(see `invoke train --list-configs`)")
    return CONFIGS[name]


def shm_needed(processes: int, workers: int, batch: int, image_scale: float = 1.0) -> int:
    """Bytes of /dev/shm the data-loader workers fill at most: every worker's prefetched batches."""
    return int(processes * workers * PREFETCH_FACTOR * batch * SHM_BYTES_PER_IMAGE * image_scale)


def image_scale(cfg) -> float:
    """A configuration's images in shared memory, relative to COCO's (shapes' are a quarter at most)."""
    from object_detection.recipe import CLOSED_PROFILE

    return 1.0 if cfg.profile == CLOSED_PROFILE else 0.25


def shm_problem(processes: int, workers: int, batch: int, image_scale: float = 1.0) -> str | None:
    """Why the data-loader workers would run out of shared memory mid-epoch (None: they will not)."""
    need = shm_needed(processes, workers, batch, image_scale)
    shm = host.shm_bytes()
    if not need or shm is None or shm[1] >= need:
        return None
    return (f"/dev/shm has {shm[1] / 2**20:.0f} MiB free but {processes} processes x {workers} data-loader "
            f"workers need about {need / 2**20:.0f} MiB: on Backend.AI start the session with more shared "
            f"memory (e.g. --resource-opts shmem={max(1, -(-need // 2**30))}g), or pass fewer workers")


def check_shm(processes: int, workers: int, batch: int, image_scale: float = 1.0) -> None:
    """Refuse to start when data-loader workers would run out of shared memory mid-epoch."""
    problem = shm_problem(processes, workers, batch, image_scale)
    if problem:
        raise UserError(problem)


def dataset_paths(ds, data_dir: Path):
    """The dataset's root, after checking it was fetched and verified."""
    dataset = ds.name
    root = ds.root(data_dir)
    missing = [s.annotations for s in ds.splits.values() if not (root / s.annotations).is_file()]
    if not root.is_dir() or missing:
        raise UserError(f"dataset {dataset} not found at {root}: run `invoke fetch --dataset {dataset}` "
                        f"(and `invoke verify`), or point --data-dir at it")
    from mlperf.datasets.verify import is_verified

    if not is_verified(ds, data_dir):
        raise UserError(f"dataset {dataset} at {root} is not verified: run `invoke verify --dataset {dataset}`")
    return root


def trainer_args(*, ds, root: Path, cfg, log: Path, seed, max_epochs, resume: bool,
                 device: str, ruleset: str | None = None) -> list[str]:
    """Arguments of `python -m object_detection.train` for a configuration."""
    from object_detection.recipe import CLOSED_DATASET, CLOSED_PROFILE, PROFILES

    profile = cfg.profile
    if ds.name == CLOSED_DATASET and profile != CLOSED_PROFILE:
        raise UserError(f"configuration {cfg.name} is for the {profile} profile, not {CLOSED_DATASET}: pick "
                        "another with --config (see --list-configs)")
    if ds.name != CLOSED_DATASET and profile == CLOSED_PROFILE:
        profile = "shapes" if device == "cuda" else "shapes-cpu"
    args = ["-m", "object_detection.train", f"--data-root={root}", f"--dataset={ds.name}",
            f"--profile={profile}", f"--per-gpu-batch={cfg.per_gpu_batch}", f"--eval-batch={cfg.eval_batch}",
            f"--workers={cfg.workers}", f"--result-log={log}", f"--config-name={cfg.name}", f"--device={device}"]
    for split, prefix in (("train", "train"), ("val", "val")):
        s = ds.splits[split]
        args += [f"--{prefix}-images={s.images}", f"--{prefix}-annotations={s.annotations}"]
    if PROFILES[profile].pretrained:
        if not ds.backbone:
            raise UserError(f"dataset {ds.name} names no backbone weights file: add `backbone:` to its manifest")
        weights = ds.downloads(root.parent) / ds.backbone
        if not weights.is_file():
            raise UserError(f"backbone weights {weights} missing: run `invoke fetch --dataset {ds.name}`")
        args.append(f"--backbone={weights}")
    if seed is not None:
        args.append(f"--seed={int(seed)}")
    if max_epochs is not None:
        args.append(f"--max-epochs={int(max_epochs)}")
    if resume:
        args.append("--resume")
    if ruleset:
        args.append(f"--ruleset={ruleset}")
    return args


def train(*, dataset, data_dir: Path, gpus=None, nodes=None, batch_size=None, config=None, seed=None,
          max_epochs=None, resume=False, device=None, log: Path, ruleset: str | None = None) -> int:
    """Start training; returns torchrun's exit code (0: the run ended, converged or aborted).

    `dataset` is a catalog name or a mlperf.datasets.Dataset (from a user's manifest).
    """
    from mlperf.datasets import Dataset, resolve

    ds = dataset if isinstance(dataset, Dataset) else resolve(dataset)
    # A run asked for on the CPU needs no GPU detection (it can import torch: seconds).
    detected = [] if device == "cpu" else host.gpus()
    if detected and device is None and host.torch_cuda_devices() == 0:
        detected = []  # GPUs this torch build cannot use: train on the CPU, as it would anyway
    device = device or ("cuda" if detected else "cpu")
    if device not in ("cpu", "cuda"):
        raise UserError(f"--device must be cpu or cuda, not {device!r}")
    if device == "cuda" and host.torch_cuda_devices() == 0:
        raise UserError("--device cuda asked but torch sees no GPU: check `nvidia-smi`, or use --device cpu")
    cfg = choose_config(config, detected if device == "cuda" else [], ds.name)
    if gpus is None:
        nproc = len(detected) if device == "cuda" else 1
    else:
        nproc = int(gpus)
        if device == "cuda" and nproc > len(detected):
            raise UserError(f"--gpus {nproc} asked but only {len(detected)} GPU(s) are visible: "
                            f"use --gpus {len(detected)} or fewer")
        if nproc < 1:
            raise UserError("--gpus must be at least 1 (use --device cpu to train on the CPU)")
    cluster = host.cluster_from_env()
    nnodes = cluster.nnodes if cluster else 1
    if nodes is not None:
        if nodes != "all":
            raise UserError(f"--nodes takes 'all', not {nodes!r}")
        if cluster is None:
            raise UserError("--nodes all needs a Backend.AI cluster session (BACKENDAI_CLUSTER_HOSTS lists "
                            "fewer than two hosts): run plain `invoke train` on a single host")
    if batch_size is not None:
        per, rest = divmod(int(batch_size), nproc * nnodes)
        if rest or per == 0:
            raise UserError(f"global batch {batch_size} does not split evenly over {nproc * nnodes} processes")
        from dataclasses import replace

        cfg = replace(cfg, per_gpu_batch=per)
    root = dataset_paths(ds, data_dir)
    check_shm(nproc, cfg.workers, cfg.per_gpu_batch, image_scale(cfg))
    log = Path(log).resolve()
    trainer = trainer_args(ds=ds, root=root.resolve(), cfg=cfg, log=log, seed=seed, max_epochs=max_epochs,
                           resume=resume, device=device, ruleset=ruleset)
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    if device == "cpu":  # torchrun would pin every process to one thread
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), env.get("PYTHONPATH")]))
    print(f"config {cfg.name}: {nnodes} node(s) x {nproc} {device} process(es), "
          f"{cfg.per_gpu_batch} images each; log {log}", flush=True)

    if nodes is not None:
        return run_on_all_nodes(cluster, nproc, trainer, env)
    cmd = torchrun_args(nproc, cluster) + trainer
    return subprocess.call(cmd, env=env, cwd=PROJECT_ROOT)


def run_on_all_nodes(cluster: Cluster, nproc: int, trainer: list[str], env: dict) -> int:
    """Start torchrun on every host over SSH (the session's cluster key, port 2200), in parallel.

    The project, the data and this Python must be at the same paths on every host, as a Backend.AI
    cluster session's shared vfolders give them.
    """
    from mlperf import remote

    passed = {k: env[k] for k in ("PYTHONPATH", "OMP_NUM_THREADS", "PYTHONUNBUFFERED", "NCCL_SOCKET_IFNAME",
                                  "NCCL_NVLS_ENABLE", "NCCL_DEBUG") if k in env}
    prefix = " ".join(f"{k}={shlex.quote(v)}" for k, v in passed.items())
    commands = {}
    for rank, name in enumerate(cluster.hosts):
        cmd = torchrun_args(nproc, cluster, node_rank=rank) + trainer
        commands[name] = f"cd {shlex.quote(str(PROJECT_ROOT))} && env {prefix} {shlex.join(cmd)}"
    return remote.run_parallel(commands, ssh_config=os.environ.get("MLPERF_SSH_CONFIG"))


def bench(*, gpus=None, batch_sizes="8,16,32", iterations=None, baseline=True, output=None) -> int:
    """Run `python -m benchmarks.train_throughput`: our training step against torchvision's."""
    if gpus is not None and int(gpus) > 1:
        raise UserError("the throughput benchmark runs on one GPU; multi-GPU scaling runs are not "
                        "implemented yet (see BENCHMARKS.md)")
    cmd = [sys.executable, "-m", "benchmarks.train_throughput", f"--batch-sizes={batch_sizes}"]
    if iterations:
        cmd.append(f"--iterations={int(iterations)}")
    if not baseline:
        cmd.append("--variants=ours-bf16-rpncl-fused")
    if output:
        cmd.append(f"--output={output}")
    return subprocess.call(cmd, cwd=PROJECT_ROOT)
