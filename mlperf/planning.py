"""A training run resolved before anything starts: the flags, this host and the recipe's system
configurations turned into a `Plan`, which `invoke train --dry-run` prints and mlperf.launch starts.

Separate from the launcher because it starts nothing: a dry run plans without GPUs, and a series
(mlperf.results.series) plans its runs before the first starts. The refusals a plan collects are
mlperf.preflight's.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path

from mlperf import host
from mlperf.errors import UserError
from mlperf.host import Cluster
from mlperf.preflight import check_resources, refuse_rejected_lr, warn_without_rcp
from object_detection.run_request import RunRequest


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


@dataclass
class Plan:
    """A training run resolved before anything starts: what `--dry-run` prints and `train` runs.

    `missing` lists what this host lacks for it (GPUs, the dataset, the backbone, shared memory);
    a real run refuses to start while it is not empty, a dry run only reports it.
    """
    ds: object
    data_dir: Path
    cfg: object
    profile: str
    device: str
    nproc: int
    cluster: Cluster | None
    all_nodes: bool
    log: Path
    request: RunRequest               # what the user asked beyond dataset and hardware (seed, speed, ...)
    gpu_model: str = ""
    gpu_bf16: bool | None = None
    missing: list[str] = field(default_factory=list)

    @property
    def nnodes(self) -> int:
        return self.cluster.nnodes if self.cluster else 1

    @property
    def global_batch(self) -> int:
        return self.cfg.per_gpu_batch * self.nproc * self.nnodes

    @property
    def threads(self) -> int:
        """CPU threads per training process: this host's cores shared by its processes.
        MLPERF_THREADS_PER_PROCESS overrides; Backend.AI's corecount label sets OMP_NUM_THREADS to
        every core of the session, which torchrun would keep for each of its processes."""
        given = os.environ.get("MLPERF_THREADS_PER_PROCESS", "")
        if given:
            if not given.isdigit() or int(given) < 1:
                raise UserError(f"MLPERF_THREADS_PER_PROCESS={given!r} is not a whole number >= 1")
            return int(given)
        return max(1, host.usable_cores() // self.nproc)

    @property
    def workers(self) -> int:
        """Data-loader workers per process: the configuration's, at most the process's cores but one."""
        return 0 if self.cfg.workers == 0 else min(self.cfg.workers, max(1, self.threads - 1))

    @property
    def amp(self) -> str:
        if self.device == "cpu":
            return "off (CPU)"
        if self.gpu_bf16 is None:
            return "bf16 where the GPUs have it (compute capability 8.0+), else fp16"
        return "bf16" if self.gpu_bf16 else "fp16 with a gradient scaler"

    def trainer_args(self) -> list[str]:
        """Arguments of `python -m object_detection.train` for this run."""
        from object_detection.recipe import PROFILES

        ds, cfg, root = self.ds, self.cfg, self.ds.root(self.data_dir).resolve()
        args = ["-m", "object_detection.train", f"--data-root={root}", f"--dataset={ds.name}",
                f"--profile={self.profile}", f"--per-gpu-batch={cfg.per_gpu_batch}", f"--eval-batch={cfg.eval_batch}",
                f"--workers={self.workers}", f"--result-log={self.log}", f"--config-name={cfg.name}",
                f"--device={self.device}", f"--num-classes={ds.categories + 1}"]
        for split in ("train", "val"):
            args += [f"--{split}-images={ds.splits[split].images}", f"--{split}-annotations={ds.splits[split].annotations}"]
        if ds.splits["val"].count is not None:
            args.append(f"--eval-images={ds.splits['val'].count}")
        if PROFILES[self.profile].pretrained:
            args.append(f"--backbone={ds.downloads(root.parent) / ds.backbone}")
        if ds.targets:
            args += [f"--bbox-target={ds.targets['BBOX']}", f"--segm-target={ds.targets['SEGM']}"]
        args += self.request.trainer_argv()
        from mlperf.project import sources_digest  # the log names the code that ran (invoke package checks it)
        args.append(f"--sources-digest={sources_digest()}")
        return args

    def recipe_summary(self) -> dict:
        """How the model computes, piece by piece (object_detection.recipe.Recipe), in the words a
        reviewer compares with the reference's: what `--dry-run` shows as "reference"."""
        from mlperf import pagecache
        from object_detection.recipe import MSRA_PIXEL_MEAN_BGR, PROFILES, iterations_per_epoch, train_samples

        profile = PROFILES[self.profile]
        r = profile.recipe
        backbone = None
        if profile.pretrained and self.ds.backbone:
            from mlperf.datasets.state import with_published

            ds = with_published(self.ds, self.data_dir)  # the md5 fetch read from its publisher, once known
            spec = next((f for f in ds.files if f.name == ds.backbone), None)
            checksum = spec.checksum_source if spec is not None else "the user's own file"
            backbone = f"{ds.backbone} ({checksum})"
        images = train_samples(self.ds.name, self.ds.splits["train"].count if "train" in self.ds.splits else None)
        per_epoch = iterations_per_epoch(r.epoch, images, self.global_batch) if images else None
        mean = "/".join(str(m) for m in MSRA_PIXEL_MEAN_BGR)
        selection = (f"top {profile.proposals_per_image} x {self.cfg.per_gpu_batch} images = "
                     f"{profile.logged_image_candidates(self.cfg.per_gpu_batch)} over the per-GPU batch"
                     if r.proposals_per == "batch" else f"top {profile.proposals_per_image} per image")
        return {
            "recipe": r.name, "backbone": backbone, "stride_in_1x1": r.stride_in_1x1,
            "input": f"BGR, 0-255, mean {mean}, std 1" if r.input == "BGR255" else "RGB, 0-1, ImageNet mean and std",
            "box_loss_beta": r.box_loss_beta, "rpn_loss_beta": round(r.rpn_loss_beta, 6),
            "box_width": "x1 - x0 + 1" if r.box_offset else "x1 - x0", "anchors": r.anchors,
            "rpn_straddle_thresh": r.straddle_thresh, "warmup": r.warmup, "proposal_selection": selection,
            "heads_init": r.heads_init, "image_filter": r.image_filter, "resize": r.resize,
            "mask_targets": ("each RoI's polygons rasterised at 28x28 as pycocotools does" if r.mask_targets == "polygons"
                             else "the full mask sampled by RoIAlign"),
            "training_images": images, "iterations_per_epoch": per_epoch,
            "cache_clear": {"drop_caches": "sync, then /proc/sys/vm/drop_caches",
                            "fadvise": "sync, then posix_fadvise(DONTNEED) on every file of the dataset "
                                       "(/proc/sys/vm/drop_caches is not writable here)"}[pagecache.method()],
        }

    def describe(self) -> dict:
        """The resolved run, as `invoke train --dry-run` prints it."""
        from object_detection.recipe import PROFILES, RULESET, division, rcp_position

        profile = PROFILES[self.profile]
        ruleset = self.request.ruleset or RULESET
        schedule = profile.schedule_for(self.global_batch, ruleset)
        closed = division(self.ds.name, self.profile) == "closed"
        return {
            "config": self.cfg.name, "dataset": self.ds.name, "division": division(self.ds.name, self.profile),
            "profile": self.profile, "device": self.device, "gpu": self.gpu_model or None,
            "nodes": self.nnodes, "processes_per_node": self.nproc, "per_gpu_batch": self.cfg.per_gpu_batch,
            "global_batch": self.global_batch,
            "schedule": {"lr": schedule.lr, "warmup_steps": schedule.warmup_steps,
                         "warmup_factor": schedule.warmup_factor, "decay_steps": list(schedule.decay_steps),
                         "from": schedule.source},
            "rcp": rcp_position(self.global_batch, ruleset)[1] if closed else "open division: not judged by RCPs",
            "proposals_per_image": profile.proposals_per_image,
            "num_image_candidates_logged": profile.logged_image_candidates(self.cfg.per_gpu_batch),
            "reference": self.recipe_summary(),
            "amp": self.amp, "speed": self.request.speed or "fast",
            "loader_workers_per_process": self.workers, "threads_per_process": self.threads,
            "submitter": self.request.submitter, "status": self.request.status, "ruleset": ruleset,
            "log": str(self.log), "missing": self.missing,
        }


def plan(*, dataset, data_dir: Path, gpus=None, nodes=None, batch_size=None, config=None, device=None,
         log: Path, request: RunRequest | None = None, dry_run: bool = False) -> Plan:
    """Resolve a run. Bad input is a UserError at once; what the host lacks is collected in
    `missing`, which is a UserError (its first line) once planning is done, unless `dry_run`,
    which only reports it (a user checks an 8-GPU run before spending it)."""
    from mlperf.datasets import Dataset, resolve
    from mlperf.results.logs import check_ruleset
    from object_detection.recipe import division

    ds = dataset if isinstance(dataset, Dataset) else resolve(dataset)
    request = request or RunRequest()
    ruleset, speed = request.ruleset, request.speed
    if ruleset is not None:
        check_ruleset(ruleset)
    missing: list[str] = []
    lacking = missing.append

    if device not in (None, "cpu", "cuda"):
        raise UserError(f"--device must be cpu or cuda, not {device!r}")
    if speed is not None:
        from object_detection.fast import options_for  # torch-free: the switch's names only

        try:
            options_for(speed, "cpu")
        except ValueError as bad:
            raise UserError(str(bad)) from None
    detected = [] if device == "cpu" else host.gpus()  # a CPU run needs no detection (torch: seconds)
    usable = host.torch_cuda_devices() if detected else 0
    cfg = choose_config(config, detected if usable and device != "cpu" else [], ds.name)
    device = device or ("cuda" if usable or (config is not None and cfg.gpus > 0) else "cpu")
    if device == "cuda" and usable == 0:
        lacking("--device cuda asked but torch sees no GPU: check `nvidia-smi`, or use --device cpu"
                if config is None or cfg.gpus == 0 else
                f"configuration {cfg.name} is for {cfg.gpus} GPU(s), but torch sees none here: run it on a "
                "GPU host, or pick another with --config")
    nproc = _processes(gpus, config, cfg, device, usable, lacking)
    cluster = host.cluster_from_env()
    if nodes is not None and nodes != "all":
        raise UserError(f"--nodes takes 'all', not {nodes!r}")
    if nodes is not None and cluster is None:
        raise UserError("--nodes all needs a Backend.AI cluster session (BACKENDAI_CLUSTER_HOSTS lists "
                        "fewer than two hosts): run plain `invoke train` on a single host")
    processes = nproc * (cluster.nnodes if cluster else 1)
    if batch_size is not None:
        per, rest = divmod(int(batch_size), processes)
        if rest or per == 0:
            raise UserError(f"global batch {batch_size} does not split evenly over {processes} processes")
        cfg = replace(cfg, per_gpu_batch=per)
    global_batch = cfg.per_gpu_batch * processes
    profile = _profile(ds, cfg, device)
    if ds.targets and division(ds.name, profile) == "closed":
        raise UserError(f"manifest {ds.source}: a closed-division run's quality targets are MLPerf's: remove "
                        "'targets' (they are for open-division datasets)")
    refuse_rejected_lr(ds, profile, global_batch, ruleset, processes)
    if not dry_run:  # dry runs show it in "rcp"
        warn_without_rcp(ds, profile, global_batch, ruleset)
    result = Plan(ds=ds, data_dir=Path(data_dir), cfg=cfg, profile=profile, device=device,
                  nproc=nproc, cluster=cluster, all_nodes=nodes is not None, log=Path(log).resolve(),
                  request=replace(request, seed=None if request.seed is None else int(request.seed),
                                  max_epochs=None if request.max_epochs is None else int(request.max_epochs)),
                  gpu_model=detected[0].name if detected else "", missing=missing,
                  gpu_bf16=detected[0].has_bf16 if detected else _config_bf16(cfg))
    check_resources(result, lacking)
    train_count = ds.splits["train"].count if "train" in ds.splits else None
    if train_count is not None and train_count < global_batch:  # after the host's lacks: those come first
        lacking(f"dataset {ds.name} has {train_count} training images, fewer than one global batch "
                f"({global_batch}): pass --batch-size {train_count} or less, or use a bigger dataset")
    if missing and not dry_run:
        raise UserError(missing[0])
    return result


def _processes(gpus, config, cfg, device: str, usable: int, lacking) -> int:
    """Training processes on this host: --gpus, else the named configuration's GPUs, else every GPU."""
    if gpus is None:
        return (cfg.gpus if config is not None and cfg.gpus else usable or 1) if device == "cuda" else 1
    if not str(gpus).isdigit() or int(gpus) < 1:
        raise UserError(f"--gpus must be a whole number of at least 1, not {gpus!r} (use --device cpu to train "
                        "on the CPU)")
    nproc = int(gpus)
    if device == "cuda" and nproc > usable:
        lacking(f"--gpus {nproc} asked but only {usable} GPU(s) are visible: use --gpus {usable} or fewer")
    if device == "cpu" and nproc > host.usable_cores():
        raise UserError(f"--gpus {nproc} on the CPU means {nproc} training processes, but this host has "
                        f"{host.usable_cores()} core(s): use --gpus {host.usable_cores()} or fewer")
    return nproc


def _profile(ds, cfg, device: str) -> str:
    """The manifest's profile if it names one (e.g. MLPerf's recipe on another COCO-format set:
    open division), else the configuration's, with the shapes profiles for other datasets."""
    from object_detection.recipe import CLOSED_DATASET, CLOSED_PROFILE

    if ds.profile is not None:
        return ds.profile
    if ds.name == CLOSED_DATASET and cfg.profile != CLOSED_PROFILE:
        raise UserError(f"configuration {cfg.name} is for the {cfg.profile} profile, not {CLOSED_DATASET}: pick "
                        "another with --config (see --list-configs)")
    if ds.name != CLOSED_DATASET and cfg.profile == CLOSED_PROFILE:
        return "shapes" if device == "cuda" else "shapes-cpu"
    return cfg.profile


def _config_bf16(cfg) -> bool | None:
    """bf16 on the GPUs a configuration names, where they say (V100: no)."""
    if not cfg.gpu_match:
        return None
    return not any(name in ("V100", "T4", "P100") for name in cfg.gpu_match)
