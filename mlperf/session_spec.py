"""A Backend.AI batch session's spec: `invoke session.create`'s options checked and turned into the
client's `session create` command, the request the manager gets, and the startup command inside.

Separate from the lifecycle tasks (mlperf.session) because it talks to nobody: it decides from the
options alone what to ask for, which `invoke session.create --dry-run` prints without a client.
The rules for session and vfolder names live here; the tasks and the results download check with them.
"""
from __future__ import annotations

import os
import re
import shlex
from dataclasses import dataclass, field
from datetime import datetime

from mlperf.errors import UserError
from mlperf.files import shown
from mlperf.backendai_cli import CLIENT
from mlperf.storage import WORK   # a session's home: scratch, except for the vfolders mounted under it

ARCH = "x86_64"            # what the image is built for; the client's default is this machine's (arm64 on a Mac)
EXIT_MARK = "invoke session: the benchmark exited with code"   # the batch result says only SUCCESS/FAILURE
ENV_PREFIXES = ("NCCL_", "MLPERF_", "TORCH_")
_NAME = re.compile(r"^(?=.{4,64}$)\w[\w.-]*\w$", re.ASCII)     # the manager's rule (23.09 api/session.py)
VFOLDER_NAME = re.compile(r"^[A-Za-z0-9_][\w.-]*$", re.ASCII)   # no ':' or '=': the client splits -v on them
_SIZE = re.compile(r"^(\d+(?:\.\d+)?)([kmgtp]?)$", re.IGNORECASE)
# Where a cluster's containers go: multi-node spreads them over agents (a real cluster, one node per
# machine); single-node puts all of them on one agent, which must have the resources for all of them
# together (a rehearsal on one machine, or several GPU groups of one big host). The manager's words.
CLUSTER_MODES = ("multi-node", "single-node")


@dataclass(frozen=True)
class Spec:
    name: str
    image: str
    vfolder: str
    dataset: str
    runs: int
    gpus: int
    nodes: int
    cpu: str
    mem: str
    shmem: str
    max_wait: int
    env: dict = field(default_factory=dict)
    cluster_mode: str = "single-node"

    def startup_command(self) -> str:
        root = f"{WORK}/{self.vfolder}"
        argv = ["invoke", "all", "--dataset", self.dataset, "--data-dir", f"{root}/data",
                "--results-dir", f"{root}/results", "--runs", str(self.runs)]
        if self.nodes > 1:
            argv += ["--nodes", "all"]
        # Run through /bin/sh by the kernel runner; the exit code goes to the console, where
        # `status` finds it, since Backend.AI 23.09 keeps only SUCCESS or FAILURE.
        return f'{shlex.join(argv)}; code=$?; echo "{EXIT_MARK} $code"; exit $code'

    def argv(self, client: str = CLIENT) -> list[str]:
        """`backend.ai session create ...` as the 23.09 client (and later ones) spell it."""
        argv = [client, "session", "create", "--type", "batch", "--name", self.name, "--arch", ARCH,
                "--no-reuse", "--max-wait", str(self.max_wait)]
        if self.nodes > 1:
            argv += ["--cluster-size", str(self.nodes), "--cluster-mode", self.cluster_mode]
        argv += ["-r", f"cpu={self.cpu}", "-r", f"mem={self.mem}"]
        if self.gpus:
            argv += ["-r", f"cuda.device={self.gpus}"]
        argv += ["--resource-opts", f"shmem={self.shmem}", "-v", self.vfolder]
        for key, value in sorted(self.env.items()):
            argv += ["-e", f"{key}={value}"]
        return argv + ["-c", self.startup_command(), self.image]

    def as_request(self) -> dict:
        """What the manager is asked for, in the names of its REST API (POST /session)."""
        resources = {"cpu": self.cpu, "mem": self.mem, **({"cuda.device": str(self.gpus)} if self.gpus else {})}
        return {"name": self.name, "type": "batch", "image": self.image, "architecture": ARCH,
                "cluster_size": self.nodes, "cluster_mode": self.cluster_mode,
                "resources": resources, "resource_opts": {"shmem": self.shmem}, "mounts": [self.vfolder],
                "mount_path": f"{WORK}/{self.vfolder}", "environ": dict(sorted(self.env.items())),
                "startup_command": self.startup_command(), "max_wait_seconds": self.max_wait}


def default_image(tag: str | None, base: str) -> str:
    """The image `invoke image` builds: mlperf.image.tag, else its default name for the base."""
    from mlperf.image import default_tag

    return tag or default_tag(base)


def make_spec(*, name, image, vfolder, dataset, runs, gpus, nodes, cpu, mem, shmem, per_gpu: dict,
              max_wait, cluster_mode=None, environ=os.environ) -> Spec:
    """A checked Spec from the task's options; --cpu/--mem/--shmem default to per_gpu times --gpus,
    --cluster-mode to multi-node for more than one node (one container per agent)."""
    from mlperf.datasets import available

    if dataset not in available():   # the image holds the same catalog
        raise UserError(f"unknown dataset {dataset!r}: choose one of {', '.join(available())}")
    gpus, nodes = _count(gpus, "--gpus", 0), _count(nodes, "--nodes", 1)
    factor = max(gpus, 1)
    name = name or f"mlperf-{dataset}-{datetime.now():%Y%m%d-%H%M%S}"
    check_name(name)
    check_vfolder(vfolder)
    if not str(image) or str(image).startswith("-") or any(ch.isspace() for ch in str(image)):
        # the client takes the image as its last argument: "--help" there would be its own option
        raise UserError(f"--image {shown(str(image))} is not an image name (a name cannot start with '-' or hold "
                        "spaces): pass the name `backend.ai admin image list` shows")
    cpu = _resource(cpu, "cpu", per_gpu, factor)
    if not re.fullmatch(r"\d+(\.\d+)?", cpu) or float(cpu) <= 0:
        raise UserError(f"--cpu {cpu!r} is not a positive number of CPU cores")
    mem, shmem = _resource(mem, "mem", per_gpu, factor), _resource(shmem, "shmem", per_gpu, factor)
    env = {k: v for k, v in environ.items() if k.startswith(ENV_PREFIXES)}
    mode = _cluster_mode(cluster_mode, nodes)
    return Spec(name=name, image=str(image), vfolder=str(vfolder), dataset=str(dataset),
                runs=_count(runs, "--runs", 1), gpus=gpus, nodes=nodes, cpu=cpu, mem=mem, shmem=shmem,
                max_wait=_count(max_wait, "mlperf.session.max_wait", 0), env=env, cluster_mode=mode)


def _cluster_mode(given, nodes: int) -> str:
    """--cluster-mode as given, else multi-node for a cluster; one container is single-node always."""
    if given in (None, ""):
        return "multi-node" if nodes > 1 else "single-node"
    if given not in CLUSTER_MODES:
        raise UserError(f"--cluster-mode {shown(str(given))} is not one of {', '.join(CLUSTER_MODES)}: multi-node puts "
                        "each container on its own agent, single-node all of them on one agent")
    if nodes < 2 and given != "single-node":
        raise UserError(f"--cluster-mode {given} is for a cluster of containers: pass --nodes 2 or more with it")
    return given


def check_vfolder(vfolder, flag: str = "--vfolder") -> str:
    """A vfolder name the client takes as such (not an option, no ':' or '=' it would split -v on)."""
    if not isinstance(vfolder, str) or not VFOLDER_NAME.match(vfolder):
        raise UserError(f"{flag} {shown(vfolder)} is not a vfolder name (letters, digits, _ . -, not starting "
                        "with a dot or -): name the storage folder that holds data/ and results/")
    return vfolder


def check_name(name: str) -> None:
    if not _NAME.match(str(name)):
        raise UserError(f"{shown(str(name))} is not a Backend.AI session name: 4 to 64 letters, digits, _ . -, "
                        "starting and ending with a letter or digit")


def _count(value, flag: str, minimum: int) -> int:
    try:
        number = int(str(value))
    except ValueError:
        number = None
    if number is None or number < minimum:
        raise UserError(f"{flag} {value!r} is not a whole number >= {minimum}")
    return number


def _resource(given, key: str, per_gpu: dict, factor: int) -> str:
    """--cpu/--mem/--shmem as given, else mlperf.session.per_gpu.<key> times `factor` (32g x 8: 256g)."""
    if given not in (None, ""):
        if key != "cpu" and not _SIZE.match(str(given)):
            raise UserError(f"--{key} {given!r} is not a size like 256g or 512m")
        return str(given).lower()
    m = _SIZE.match(str(per_gpu.get(key, "")))
    if not m:
        raise UserError(f"mlperf.session.per_gpu.{key} {per_gpu.get(key)!r} is not a number or a size like 32g: "
                        "fix invoke.yaml")
    return f"{float(m.group(1)) * factor:g}{m.group(2).lower()}"
