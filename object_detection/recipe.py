"""Every MLPerf fact the project uses, in one place: the benchmark, its quality targets, ruleset and
run count, the division rule, learning-rate schedules by global batch size, input profiles, and
the named system configurations. No torch import: the automation (mlperf/) reads this too.

Schedules come from the MLCommons reference convergence points (RCPs) shipped in the installed
mlperf-logging package, so they match what the RCP checker will judge a submission against.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from importlib import resources

BENCHMARK = "maskrcnn"
RULESET = "3.1.0"                # the last MLPerf Training ruleset with Mask R-CNN
RUNS = 5                         # result files MLPerf requires for maskrcnn
BBOX_TARGET = 0.377              # COCO val2017 box mAP
SEGM_TARGET = 0.339              # and mask mAP, both reached at one evaluation
QUALITY_TARGETS = {"BBOX": BBOX_TARGET, "SEGM": SEGM_TARGET}
CLOSED_DATASET, CLOSED_PROFILE = "coco2017", "coco"
# train2017 images that the reference's filter keeps (the train_samples of every published log)
CLOSED_TRAIN_SAMPLES = 117266


def train_samples(dataset: str, images: int | None) -> int | None:
    """Training images a run of `dataset` will use, known before its data is read (for plans):
    MLPerf's count for COCO 2017; else the manifest's count of images."""
    return CLOSED_TRAIN_SAMPLES if dataset == CLOSED_DATASET else images


def division(dataset: str, profile: str) -> str:
    """The closed division is COCO 2017 with the reference recipe; anything else is open."""
    return "closed" if dataset == CLOSED_DATASET and profile == CLOSED_PROFILE else "open"

# The reference implementation's own 16-image recipe (maskrcnn-benchmark e2e_mask_rcnn_R_50_FPN_1x).
REFERENCE_16 = dict(batch=16, lr=0.02, decay_steps=(60000, 80000), warmup_steps=500,
                    warmup_factor=1.0 / 3, image_candidates=1000)


@dataclass(frozen=True)
class Schedule:
    """SGD schedule: a warmup over warmup_steps, then x0.1 at each decay step (maskrcnn-benchmark's
    WarmupMultiStepLR, which the reference and NVIDIA's submissions run)."""
    batch: int
    lr: float
    decay_steps: tuple[int, int]
    warmup_steps: int
    warmup_factor: float
    image_candidates: int            # the RCP's num_image_candidates (per GPU batch: see proposals_per_image)
    source: str                      # where it came from, for the log and the system description
    epochs_to_converge: tuple[float, ...] = ()
    # "linear" (Detectron's): each group's rate times a factor rising from warmup_factor to 1.
    # "mlperf_linear": each group's rate minus (warmup_steps - iteration) x warmup_factor, one absolute
    # amount for every group, so the weights rise from lr - warmup_steps x warmup_factor (0 at the
    # RCPs) and the biases (2 x lr) from lr. The RCPs' warmup factors are mlperf_linear's.
    warmup: str = "linear"
    # The scheduler iteration of the first optimizer step: maskrcnn-benchmark steps its scheduler
    # before the optimizer (its step k takes iteration k), torchvision's references after (k - 1).
    first_iteration: int = 0

    def lr_at(self, iteration: int, base_factor: float = 1.0) -> float:
        """The learning rate at a scheduler iteration, of a parameter group whose base rate is
        base_factor x lr (the biases: 2)."""
        base = self.lr * base_factor
        if iteration < self.warmup_steps:
            if self.warmup == "mlperf_linear":
                base -= (self.warmup_steps - iteration) * self.warmup_factor
            else:
                alpha = iteration / self.warmup_steps
                base *= self.warmup_factor * (1 - alpha) + alpha
        decays = sum(iteration >= s for s in self.decay_steps)
        return base * (0.1 ** decays)

    def lr_of_step(self, steps_done: int, base_factor: float = 1.0) -> float:
        """The learning rate of the optimizer step that follows `steps_done` steps."""
        return self.lr_at(steps_done + self.first_iteration, base_factor)

    def scaled_to(self, batch: int) -> "Schedule":
        """The linear scaling rule: lr times batch/self.batch, warmup and decays at the same epochs;
        mlperf_linear's absolute factor scaled so the warmup starts from the same fraction of lr."""
        if batch == self.batch:
            return self
        scale = batch / self.batch
        warmup_steps = round(self.warmup_steps / scale)
        factor = self.warmup_factor
        if self.warmup == "mlperf_linear":
            start = (self.lr - self.warmup_steps * self.warmup_factor) / self.lr
            factor = round(self.lr * scale * (1 - start) / warmup_steps, 12)
        return replace(self, batch=batch, lr=round(self.lr * scale, 6),
                       decay_steps=tuple(round(s / scale) for s in self.decay_steps),
                       warmup_steps=warmup_steps, warmup_factor=factor,
                       source=f"linear scaling of {self.source} to batch {batch}", epochs_to_converge=())


def reference_points(ruleset: str = RULESET) -> dict[int, Schedule]:
    """RCP schedules by global batch size, read from mlperf-logging's rcps_maskrcnn.json."""
    path = resources.files("mlperf_logging") / "rcp_checker" / f"training_{ruleset}" / f"rcps_{BENCHMARK}.json"
    table = {}
    for name, entry in json.loads(path.read_text()).items():
        hp = entry["Hyperparams"]
        table[int(entry["BS"])] = Schedule(
            batch=int(entry["BS"]), lr=float(hp["opt_base_learning_rate"]),
            decay_steps=tuple(int(s) for s in hp["opt_learning_decay_steps"]),
            warmup_steps=int(hp["opt_learning_rate_warmup_steps"]),
            warmup_factor=float(hp["opt_learning_rate_warmup_factor"]),
            image_candidates=int(hp["num_image_candidates"]),
            source=f"training_{ruleset} {name}", warmup="mlperf_linear",
            epochs_to_converge=tuple(float(e) for e in entry.get("Epochs to converge", ())),
        )
    return table


def rulesets() -> list[str]:
    """MLPerf Training rulesets with Mask R-CNN, as the installed mlperf-logging knows them (an RCP
    table and closed-division compliance rules for it), oldest first."""
    root = resources.files("mlperf_logging")
    found = []
    for folder in (root / "rcp_checker").iterdir():
        version = folder.name.removeprefix("training_")
        if (folder.name.startswith("training_") and (folder / f"rcps_{BENCHMARK}.json").is_file()
                and (root / "compliance_checker" / folder.name / f"closed_{BENCHMARK}.yaml").is_file()):
            found.append(version)
    return sorted(found, key=lambda v: tuple(int(part) for part in v.split(".")))


def rcp_position(global_batch: int, ruleset: str = RULESET) -> tuple[str, str]:
    """Where a global batch stands among the reference convergence points (RCPs) the RCP checker
    judges a closed-division result by: ("rcp" | "interpolated" | "below" | "outside", in words)."""
    batches = sorted(reference_points(ruleset))
    if global_batch in batches:
        return "rcp", f"the RCP at global batch {global_batch}"
    below = [b for b in batches if b < global_batch]
    above = [b for b in batches if b > global_batch]
    if below and above:
        return "interpolated", f"interpolated between the RCPs at {below[-1]} and {above[0]}"
    if above:
        return "below", (f"global batch {global_batch} is below MLPerf's smallest reference convergence point "
                         f"for {BENCHMARK} ({batches[0]}, ruleset {ruleset}): the RCP checker accepts a "
                         f"closed-division result only if it converges in no fewer epochs than that one")
    return "outside", (f"global batch {global_batch} is above MLPerf's reference convergence points for "
                       f"{BENCHMARK} ({batches[0]}-{batches[-1]}, ruleset {ruleset}): the RCP checker will not "
                       f"accept a closed-division result at it without a new RCP")


def schedule_for(global_batch: int, ruleset: str = RULESET) -> Schedule:
    """The RCP schedule for a global batch size; the reference's own 1x recipe at 16 (Detectron's
    linear warmup, its config's default); else the nearest RCP's, linearly scaled: a closed result
    is then judged by interpolation, and closed_batch_problem says whether its lr can pass."""
    table = reference_points(ruleset)
    if global_batch in table:
        return table[global_batch]
    if global_batch == REFERENCE_16["batch"]:
        r = REFERENCE_16
        return Schedule(batch=16, lr=r["lr"], decay_steps=r["decay_steps"], warmup_steps=r["warmup_steps"],
                        warmup_factor=r["warmup_factor"], image_candidates=r["image_candidates"],
                        source="reference maskrcnn-benchmark 1x (16 images)")
    nearest = min(table, key=lambda b: abs(b - global_batch))
    return table[nearest].scaled_to(global_batch)


def closed_lr_accepted(lr: float, global_batch: int, ruleset: str = RULESET) -> bool:
    """Whether MLPerf's compliance checker takes this opt_base_learning_rate in a closed maskrcnn
    result (closed_maskrcnn.yaml: a multiple of 0.02; from 2.0.0 on, below batch 16, also 0.02 / n),
    with the checker's own tolerance."""
    def whole(value: float) -> bool:
        return abs(round(value) - value) < 0.00001

    small = tuple(int(part) for part in ruleset.split(".")) >= (2, 0, 0) and global_batch < 16
    return whole(lr / 0.02) or (small and lr > 0 and whole(0.02 / lr))


def closed_batches(ruleset: str = RULESET, processes: int = 1) -> list[int]:
    """Global batches among the RCPs' (from the smallest to the largest), multiples of the process
    count, whose closed schedule the compliance checker accepts."""
    batches = reference_points(ruleset)
    first = -(-min(batches) // processes) * processes
    return [b for b in range(first, max(batches) + 1, processes)
            if closed_lr_accepted(PROFILES[CLOSED_PROFILE].schedule_for(b, ruleset).lr, b, ruleset)]


def closed_batch_problem(global_batch: int, ruleset: str = RULESET, processes: int = 1) -> str | None:
    """Why a closed run at this global batch would log a learning rate the compliance checker
    rejects (every one of its logs would fail after the GPU time is spent), with the batches that
    work; None when it passes."""
    schedule = PROFILES[CLOSED_PROFILE].schedule_for(global_batch, ruleset)
    if closed_lr_accepted(schedule.lr, global_batch, ruleset):
        return None
    working = ", ".join(map(str, closed_batches(ruleset, processes))) or "none on this many processes"
    return (f"global batch {global_batch} would train at learning rate {schedule.lr:g} ({schedule.source}), "
            f"which MLPerf's {ruleset} compliance checker rejects in the closed division (it takes multiples "
            f"of 0.02): use a global batch of {working} (--batch-size)")


def iterations_per_epoch(epoch_rule: str, images: int, global_batch: int) -> int:
    """Training steps between evaluations. "ceil": the reference's epoch of its endless stream,
    images // batch + 1 (no image left out; 1222 at 96 for COCO's 117266); "floor": full batches only."""
    return images // global_batch + (1 if epoch_rule == "ceil" else 0)


@dataclass(frozen=True)
class Recipe:
    """How the model computes, piece by piece: the MLPerf reference's (maskrcnn-benchmark as
    mlcommons/training object_detection and NVIDIA's submissions run it) or torchvision's own.
    The closed division must be the reference's (training_rules.adoc: graph, loss, initialisation,
    data state); the open profiles keep torchvision's."""
    name: str
    backbone: str                    # "msra-r50": Detectron's R-50.pkl; "torchvision": an ImageNet state dict
    stride_in_1x1: bool              # ResNet bottlenecks stride in the 1x1 convolution (reference) or the 3x3
    input: str                       # "BGR255": BGR 0-255 minus the pixel mean, std 1; "RGB1": torchvision's
    box_loss_beta: float             # smooth-L1 beta of the box head
    rpn_loss_beta: float             # and of the RPN
    box_offset: int                  # 1: a box x0..x1 is x1 - x0 + 1 wide (anchors, coder, flip, clip, results)
    anchors: str                     # "maskrcnn-benchmark": cell anchors centred at (stride-1)/2; "torchvision"
    straddle_thresh: float | None    # RPN ignores anchors crossing the image border by more; None: keeps all
    proposals_per: str               # "batch": post-NMS top (n x images) over the per-GPU batch; "image": n each
    heads_init: str                  # "reference": fc6/fc7 kaiming a=1, cls std 0.01, bbox std 0.001; "torchvision"
    warmup: str                      # "mlperf_linear": lr - (warmup - it) * factor per group; "linear": Detectron's
    epoch: str                       # "ceil": an epoch is ceil(images / batch) steps of one endless stream; "floor"
    image_filter: str                # "reference": maskrcnn-benchmark's has_valid_annotation; "usable": a usable box
    resize: str                      # "round": the reference's get_size; "scale": torchvision's scale factor
    mask_targets: str                # "polygons": each RoI's polygons rasterised at 28x28 (mask_targets.py); "roi_align"

    def describe(self) -> dict:
        return asdict(self)


# Detectron's MSRA R-50 (catalog://ImageNetPretrained/MSRA/R-50) takes BGR pixels in 0-255 minus this mean.
MSRA_PIXEL_MEAN_BGR = (102.9801, 115.9465, 122.7717)

RECIPES = {
    "reference": Recipe(name="reference", backbone="msra-r50", stride_in_1x1=True, input="BGR255",
                        box_loss_beta=1.0, rpn_loss_beta=1.0 / 9, box_offset=1, anchors="maskrcnn-benchmark",
                        straddle_thresh=0.0, proposals_per="batch", heads_init="reference",
                        warmup="mlperf_linear", epoch="ceil", image_filter="reference", resize="round",
                        mask_targets="polygons"),
    "torchvision": Recipe(name="torchvision", backbone="torchvision", stride_in_1x1=False, input="RGB1",
                          box_loss_beta=1.0 / 9, rpn_loss_beta=1.0 / 9, box_offset=0, anchors="torchvision",
                          straddle_thresh=None, proposals_per="image", heads_init="torchvision",
                          warmup="linear", epoch="floor", image_filter="usable", resize="scale",
                          mask_targets="roi_align"),
}


@dataclass(frozen=True)
class Profile:
    """Input sizes, quality targets and schedule overrides for a dataset."""
    name: str
    min_size: int = 800
    max_size: int = 1333
    bbox_target: float = BBOX_TARGET
    segm_target: float = SEGM_TARGET
    max_epochs: int = 40
    pretrained: bool = True          # start from the ImageNet backbone (frozen BN); False: random init
    schedule: Schedule | None = None  # None: the RCP schedule of the global batch size
    proposals_per_image: int = 1000  # RPN post-NMS proposals per image in training, at every batch size
    rois_per_image: int = 512        # RoI-head samples per image (the reference's 512)
    test_candidates: int = 1000      # RPN post-NMS proposals per image at test time
    detections_per_image: int = 100  # kept per image at test time (COCO's maximum)
    model: str = "r50-fpn"           # object_detection.model.MODELS; only the CPU demo differs
    recipe: Recipe = RECIPES["torchvision"]  # the closed profile: RECIPES["reference"]

    def logged_image_candidates(self, per_gpu_batch: int) -> int:
        """num_image_candidates as the log states it. The rules allow "1000 or 1000 x batches per
        chip": the RCP table's 6000 at global batch 48-272 is the reference's 6 images per GPU x
        1000, each image getting 1000. Logged per GPU batch, as NVIDIA's v3.0 logs do (12000 at 12)."""
        return self.proposals_per_image * per_gpu_batch

    def targets(self, bbox: float | None = None, segm: float | None = None) -> dict[str, float]:
        """The quality targets of a run: the profile's, unless given."""
        return {"BBOX": self.bbox_target if bbox is None else bbox, "SEGM": self.segm_target if segm is None else segm}

    def schedule_for(self, global_batch: int, ruleset: str = RULESET) -> Schedule:
        """A profile's own schedule is written for its batch; other batches follow the linear
        scaling rule. Without one: the reference convergence point of the global batch. The
        reference recipe runs maskrcnn-benchmark's scheduler (each schedule's own warmup, stepped
        before the optimizer); torchvision's keeps Detectron's linear warmup, stepped after."""
        schedule = self.schedule.scaled_to(global_batch) if self.schedule else schedule_for(global_batch, ruleset)
        if self.recipe.warmup == "mlperf_linear":
            return replace(schedule, first_iteration=1)
        return replace(schedule, warmup="linear", first_iteration=0)


PROFILES = {
    # MLPerf closed division as the rules fix it.
    CLOSED_PROFILE: Profile(name=CLOSED_PROFILE, recipe=RECIPES["reference"]),
    # Synthetic shapes, open division. Random init with trainable norm layers: no download needed.
    # Demonstration targets: reachable on one GPU in minutes; the CPU profile's are lower still.
    "shapes": Profile(
        name="shapes", min_size=384, max_size=512, bbox_target=0.5, segm_target=0.45, max_epochs=40,
        pretrained=False,
        schedule=Schedule(batch=16, lr=0.04, decay_steps=(3000, 4000), warmup_steps=200,
                          warmup_factor=0.001, image_candidates=1000, source="shapes profile")),
    "shapes-cpu": Profile(
        # A 2-core CPU runs the MLPerf R50-FPN at ~1 image/s: it shows every step working, never
        # learning. So the CPU demo trains the small Mask R-CNN (same parts: ResNet-18 body, 64-channel
        # FPN, slim heads) at 96-128 px, with fewer proposals, RoIs and detections (the mask head's cost
        # grows with them). 8 epochs of the 256-image shapes set; it passes its targets by epoch 4-5.
        name="shapes-cpu", min_size=96, max_size=128, bbox_target=0.05, segm_target=0.05, max_epochs=8,
        pretrained=False, proposals_per_image=200, rois_per_image=64, test_candidates=100, detections_per_image=20,
        model="r18-fpn-slim",
        schedule=Schedule(batch=8, lr=0.06, decay_steps=(192, 224), warmup_steps=60,
                          warmup_factor=0.01, image_candidates=200, source="shapes CPU profile")),
}


LOADER_WORKERS = 8               # data-loader workers per process, unless a configuration says otherwise
EVAL_BATCH = 8                   # images per process per evaluation step, likewise


@dataclass(frozen=True)
class SystemConfig:
    """What one MLPerf submitter keeps per system: batch, workers, profile."""
    name: str
    description: str
    per_gpu_batch: int
    gpus: int                        # GPUs per node this config is for (0: CPU)
    nodes: int = 1
    workers: int = LOADER_WORKERS
    eval_batch: int = EVAL_BATCH
    profile: str = CLOSED_PROFILE
    gpu_match: tuple[str, ...] = field(default_factory=tuple)  # substrings of the GPU model name

    @property
    def global_batch(self) -> int:
        return self.per_gpu_batch * max(self.gpus, 1) * self.nodes

    def as_dict(self) -> dict:
        return {**asdict(self), "global_batch": self.global_batch}


CONFIGS = {c.name: c for c in [
    SystemConfig("dgx8-v100-16g", "8x V100-16GB (the original target cluster)", per_gpu_batch=6, gpus=8,
                 gpu_match=("V100",)),
    # Evaluation is bound by the host (kernel launches), so larger batches help where memory allows:
    # 127 against 100 img/s at 32 and 8 images on an H200 (BENCHMARKS.md).
    SystemConfig("dgx8-a100", "8x A100", per_gpu_batch=12, gpus=8, eval_batch=32, gpu_match=("A100",)),
    SystemConfig("dgx8-h100", "8x H100/H200", per_gpu_batch=12, gpus=8, eval_batch=32,
                 gpu_match=("H100", "H200")),
    SystemConfig("1xgpu-16", "one large GPU (A100/H100/H200), reference batch 16", per_gpu_batch=16, gpus=1,
                 eval_batch=32, gpu_match=("A100", "H100", "H200")),
    SystemConfig("1xgpu-8", "one GPU, batch 8 (the smallest reference point)", per_gpu_batch=8, gpus=1),
    SystemConfig("shapes-1xgpu", "shapes convergence demo on one GPU", per_gpu_batch=16, gpus=1,
                 workers=8, eval_batch=16, profile="shapes"),
    SystemConfig("shapes-cpu", "shapes on the CPU (laptops, CI)", per_gpu_batch=8, gpus=0, workers=1,
                 eval_batch=8, profile="shapes-cpu"),
]}


def pick_config(gpu_count: int, gpu_model: str, dataset: str) -> SystemConfig:
    """The configuration for the detected hardware, the way submitters keep one per system."""
    if gpu_count == 0:
        return CONFIGS["shapes-cpu"]
    if division(dataset, CLOSED_PROFILE) == "open":
        return CONFIGS["shapes-1xgpu"] if gpu_count == 1 else replace(
            CONFIGS["shapes-1xgpu"], name=f"shapes-{gpu_count}xgpu", gpus=gpu_count,
            description=f"shapes on {gpu_count} GPUs")
    for cfg in CONFIGS.values():
        if cfg.gpus == gpu_count and cfg.profile == CLOSED_PROFILE and any(m in gpu_model for m in cfg.gpu_match):
            return cfg
    per_gpu = 16 if gpu_count == 1 else 12 if gpu_count >= 8 else 8
    return SystemConfig(f"{gpu_count}xgpu", f"{gpu_count}x {gpu_model or 'GPU'} (generic)",
                        per_gpu_batch=per_gpu, gpus=gpu_count)
