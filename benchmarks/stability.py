"""Which part of the closed recipe makes a run stop with a non-finite loss: short runs of the trainer
on the coco-shaped set (benchmarks.epoch_level's), one variant at a time, each a child process.

    python -m benchmarks.stability VARIANT[,VARIANT...]

A variant is words joined by "-": `base` (the closed profile as `invoke train` runs it, bf16 on a GPU
that has it), `ampoff` (fp32), `amp16` (fp16 + GradScaler), `stock` (no speed code: fast.STOCK),
`linwarm` (Detectron's linear warmup instead of mlperf_linear), `beta9` (box-loss beta 1/9),
`headstv` (torchvision's head initialisation), `offset0` (boxes without the +1), `tvrecipe`
(torchvision's recipe in the closed profile), `noisecalib` (BatchNorm statistics of the random backbone
from random pixels instead of the set's images), `pf1` (read the loss every step). The recipe patches
are for diagnosis only: no result of them is a closed-division run. Environment: STABILITY_DATA
(/tmp/mlperf-stability), STABILITY_TRAIN (1800 images), STABILITY_VAL (100), STABILITY_TIMEOUT (150 s a
variant), STABILITY_DEVICE (cuda), STABILITY_BATCH (12). Each child's console and MLPerf log go to
$OUT (or /tmp) as stability-VARIANT.out and .txt; one line per variant says how it ended.
"""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
from pathlib import Path

DATA = Path(os.environ.get("STABILITY_DATA", "/tmp/mlperf-stability"))
TRAIN, VAL = int(os.environ.get("STABILITY_TRAIN", 1800)), int(os.environ.get("STABILITY_VAL", 100))


def child(variant: str, argv: list[str]) -> int:
    """The trainer's main with the variant's patches applied in this process."""
    from object_detection import recipe, reference, train

    words = set(variant.split("-"))
    if "linwarm" in words:
        lr_at = recipe.Schedule.lr_at
        recipe.Schedule.lr_at = lambda self, it, base_factor=1.0: lr_at(
            dataclasses.replace(self, warmup="linear", warmup_factor=0.001), it, base_factor)
    if "beta9" in words:
        reference.ReferenceRoIHeads.box_loss_beta = 1.0 / 9
    profile = recipe.PROFILES["coco"]
    backbone = argv.index("--backbone") + 1
    if "tvrecipe" in words:
        from benchmarks import random_backbone

        profile = dataclasses.replace(profile, recipe=recipe.RECIPES["torchvision"])
        argv[backbone] = str(random_backbone())
    elif "noisecalib" in words:
        from benchmarks import random_msra_backbone

        argv[backbone] = str(random_msra_backbone())
    if "headstv" in words:
        profile = dataclasses.replace(profile, recipe=dataclasses.replace(profile.recipe, heads_init="torchvision"))
    if "offset0" in words:
        profile = dataclasses.replace(profile, recipe=dataclasses.replace(profile.recipe, box_offset=0))
    recipe.PROFILES["coco"] = profile
    return train.main(argv)


def main() -> int:
    if sys.argv[1:2] == ["child"]:
        return child(sys.argv[2], sys.argv[3:])
    from benchmarks.epoch_level import BACKBONE, prepare

    prepare(DATA, TRAIN, VAL)
    root = DATA / "coco-shaped"
    out = Path(os.environ.get("OUT", "/tmp"))
    for variant in sys.argv[1].split(","):
        words = set(variant.split("-"))
        argv = ["--data-root", str(root), "--dataset", "coco-shaped", "--train-images", "train2017",
                "--train-annotations", "annotations/instances_train2017.json", "--val-images", "val2017",
                "--val-annotations", "annotations/instances_val2017.json",
                "--backbone", str(root / "downloads" / BACKBONE), "--num-classes", "81", "--eval-images", str(VAL),
                "--profile", "coco", "--per-gpu-batch", os.environ.get("STABILITY_BATCH", "12"),
                "--max-epochs", "1", "--seed", "1", "--print-freq", "1" if "pf1" in words else "10",
                "--device", os.environ.get("STABILITY_DEVICE", "cuda"), "--status", "research",
                "--result-log", str(out / f"stability-{variant}.txt")]
        if "ampoff" in words:
            argv += ["--amp", "off"]
        if "amp16" in words:
            argv += ["--amp", "fp16"]
        if "stock" in words:
            argv += ["--speed", "stock"]
        started = time.time()
        try:
            proc = subprocess.run([sys.executable, "-m", "benchmarks.stability", "child", variant, *argv], text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  timeout=int(os.environ.get("STABILITY_TIMEOUT", 150)))
            console, code = proc.stdout, proc.returncode
        except subprocess.TimeoutExpired as timeout:
            console, code = (timeout.stdout or b"").decode(errors="replace"), "timeout"
        (out / f"stability-{variant}.out").write_text(console)
        ended = [line for line in console.splitlines() if "diverged" in line or "img/s)" in line][-1:]
        print(f"{variant}: exit {code} in {time.time() - started:.0f} s", *ended, sep="  ", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
