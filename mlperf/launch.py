"""Starting `invoke train`: torchrun on this host's GPUs or CPU, or on every host of a Backend.AI
cluster over SSH, after MLPerf's cache_clear and, in a cluster, once its master's name resolves.

What runs is resolved before, by mlperf.planning (refused there by mlperf.preflight's checks); this
module only builds the torchrun command and starts it.
"""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

from mlperf import PROJECT_ROOT
from mlperf.errors import UserError
from mlperf.host import Cluster
from mlperf.planning import plan

LOOPBACK = "127.0.0.1"
# Seconds a cluster run waits for its master's name to resolve (a cluster's names may appear just
# after its containers start) before giving up with one line; MLPERF_MASTER_WAIT overrides it.
MASTER_WAIT = 60.0


def torchrun_args(nproc: int, cluster: Cluster | None, node_rank: int | None = None) -> list[str]:
    """torchrun's own arguments: standalone on one host, static rendezvous across a cluster.

    On one host the workers meet on the loopback: standalone alone would send them to this host's
    name, which a container need not resolve (Backend.AI's host networking: `main1`), and c10d then
    retries it without end."""
    args = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}"]
    if cluster is None:
        return args + ["--standalone", f"--local-addr={LOOPBACK}"]
    rank = cluster.node_rank if node_rank is None else node_rank
    return args + [f"--nnodes={cluster.nnodes}", f"--node-rank={rank}",
                   f"--master-addr={cluster.master_addr}", f"--master-port={cluster.master_port}"]


def launcher_args(nproc: int, cluster: Cluster | None) -> list[str]:
    """What starts the trainer (its arguments follow): for one process on one host the trainer's own
    Python, as its one rank (launcher_env), since torchrun's agent would cost the run another torch
    import and a rendezvous and gives one process nothing; torchrun otherwise."""
    return [sys.executable] if _one_process(nproc, cluster) else torchrun_args(nproc, cluster)


def launcher_env(nproc: int, cluster: Cluster | None) -> dict[str, str]:
    """The rank variables a trainer started without torchrun gets, so that none it inherits counts."""
    return {"WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0"} if _one_process(nproc, cluster) else {}


def _one_process(nproc: int, cluster: Cluster | None) -> bool:
    return nproc == 1 and cluster is None


def train(*, dry_run: bool = False, **arguments) -> int:
    """Start training (see mlperf.planning.plan for the arguments); returns the exit code of torchrun
    or the one trainer (0: the run ended, converged or aborted; 128+N: killed by signal N). `dry_run`:
    print the resolved run as JSON and return 0."""
    p = plan(dry_run=dry_run, **arguments)
    if dry_run:
        print(json.dumps(p.describe(), indent=2))
        return 0
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    env["OMP_NUM_THREADS"] = str(p.threads)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), env.get("PYTHONPATH")]))
    env.update(launcher_env(p.nproc, p.cluster))
    print(f"config {p.cfg.name}: {p.nnodes} node(s) x {p.nproc} {p.device} process(es), "
          f"{p.cfg.per_gpu_batch} images each; log {p.log}", flush=True)
    if p.cluster is not None:
        wait_for_master(p.cluster.master_addr)
    trainer = p.trainer_args() + ["--cache-cleared"]  # by the launcher on every host, just before torchrun
    if p.all_nodes:
        return run_on_all_nodes(p.cluster, p.nproc, trainer, env, clear_cache=p.ds.root(p.data_dir).resolve())
    clear_page_cache(p.ds.root(p.data_dir).resolve())
    code = subprocess.call(launcher_args(p.nproc, p.cluster) + trainer, env=env, cwd=PROJECT_ROOT,
                           preexec_fn=_terminated_with_parent)
    return code if code >= 0 else 128 - code  # a shell's code for a trainer a signal ended


def clear_page_cache(data: Path) -> None:
    """MLPerf's cache_clear, before the run (mlperf.pagecache); a folder that cannot be walked is
    one error line."""
    from mlperf import pagecache

    try:
        pagecache.clear([data])
    except OSError as error:
        raise UserError(f"could not clear the page cache of the dataset at {error.filename or data} "
                        f"({error.strerror}): check its permissions") from None


def wait_for_master(address: str, wait: float | None = None) -> None:
    """Return once the cluster's master address resolves; after `wait` seconds (MASTER_WAIT, or
    MLPERF_MASTER_WAIT), one error line naming it instead of torchrun retrying it without end."""
    import socket
    import time

    if wait is None:
        text = os.environ.get("MLPERF_MASTER_WAIT", str(MASTER_WAIT))
        try:
            wait = float(text)
        except ValueError:
            raise UserError(f"MLPERF_MASTER_WAIT={text!r} is not a number of seconds") from None
    deadline = time.monotonic() + wait
    while True:
        try:
            socket.getaddrinfo(address, None)
            return
        except (socket.gaierror, UnicodeError) as exc:
            if time.monotonic() >= deadline:
                reason = getattr(exc, "strerror", None) or exc
                raise UserError(f"the cluster's master host {address!r} does not resolve here ({reason}; waited "
                                f"{wait:.0f} s): start the session on a network where its hosts resolve each "
                                f"other (not host networking), or set MLPERF_MASTER_ADDR to the master's IP "
                                f"address") from None
        time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))


def _terminated_with_parent() -> None:
    """In torchrun's process (or the one trainer's), before it starts: SIGTERM when this launcher dies
    (Linux), however it dies (kill -9 too), so that torchrun stops its trainers (each gets SIGKILL
    when torchrun goes: object_detection.train.die_with_launcher), or the trainer stops, and nothing
    keeps the GPUs or writes the log on."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def run_on_all_nodes(cluster: Cluster, nproc: int, trainer: list[str], env: dict, clear_cache: Path | None = None) -> int:
    """Start torchrun on every host over the cluster's SSH (the session's ~/.ssh/config, or
    MLPERF_SSH_CONFIG), in parallel, once every other host has been checked and given main1's
    project and venv where it lacked them (mlperf.cluster.prepare_hosts). The data must already be
    at the same path on every host: a vfolder the session mounts on all of them.
    """
    from mlperf import remote
    from mlperf.cluster import env_words, prepare_hosts

    ssh_config = os.environ.get("MLPERF_SSH_CONFIG") or None
    prepare_hosts(cluster, nproc, trainer, env, ssh_config)
    prefix = env_words(env)
    commands = {}
    for rank, name in enumerate(cluster.hosts):
        cmd = torchrun_args(nproc, cluster, node_rank=rank) + trainer
        clear = "" if clear_cache is None else \
            f"{shlex.join([sys.executable, '-m', 'mlperf.pagecache', str(clear_cache)])} && "
        commands[name] = f"cd {shlex.quote(str(PROJECT_ROOT))} && {clear}env {prefix} {shlex.join(cmd)}"
    return remote.run_parallel(commands, ssh_config=ssh_config)


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
