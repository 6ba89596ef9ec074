"""Benchmarks of the training step, the data loader and evaluation (BENCHMARKS.md has the results)."""
import json
import os
from pathlib import Path


def save_result(result: dict, output: Path) -> None:
    """Write a benchmark's JSON to `output`, and a copy under $OUT where the device runner collects
    files (benchmarks/gpu_session.sh)."""
    text = json.dumps(result, indent=1)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], output.name).write_text(text)


# torchvision's ImageNet normalisation (GeneralizedRCNNTransform's defaults), RGB in [0, 1]
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def random_backbone(path: Path = Path("/tmp/bench_resnet50-calibrated.pth"), images: Path | None = None) -> Path:
    """Random ResNet-50 weights (torchvision's layout) whose BatchNorm statistics are measured on
    normalised images, saved once to `path`: 16 of the JPEGs in `images` at their own size, or
    random pixels.

    Speed does not depend on the weights' values, but frozen BatchNorm with torchvision's initial
    statistics (mean 0, variance 1) normalises nothing: the activations of 50 random layers grow
    until the losses are not finite within a few steps at MLPerf's learning rate, and a benchmark
    that diverges times NaN boxes rather than training. Measured statistics keep each layer's output
    near unit scale on such images, as ImageNet weights do on photographs. Calibrate on the images a
    run trains on: on an H100 the closed profile's bf16 run on the coco-shaped set diverged within
    100 steps from statistics of random pixels, and trained from the set's own (BENCHMARKS.md)."""
    import torch
    import torchvision

    if path.exists():
        return path
    torch.manual_seed(0)
    net = torchvision.models.resnet50()
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None  # a plain average over the calibration batches
    net.train()
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)

    def normalised(jpeg: Path):
        pixels = torchvision.io.decode_jpeg(torchvision.io.read_file(str(jpeg)), torchvision.io.ImageReadMode.RGB)
        return ((pixels.float() / 255 - mean) / std)[None]

    if images is None:
        batches = (torch.randn(8, 3, 224, 224) for _ in range(4))
    else:
        batches = (normalised(jpeg) for jpeg in sorted(images.glob("*.jpg"))[:16])
    with torch.no_grad():
        for batch in batches:
            net(batch)
    torch.save(net.state_dict(), path)
    return path


def random_msra_backbone(path: Path = Path("/tmp/bench_R-50-calibrated.pkl"), images: Path | None = None) -> Path:
    """random_backbone's weights as Detectron's R-50.pkl, for the reference recipe's model: conv1
    divided by the standard deviation it no longer gets (the reference feeds BGR pixels in 0-255
    minus the mean, not divided by ImageNet's deviation), so both recipes see the same activations."""
    import pickle

    import torch

    from object_detection.reference import msra_blobs

    if path.exists():
        return path
    source = random_backbone(path.with_suffix(".pth"), images) if images is not None else random_backbone()
    state = torch.load(source, weights_only=True)
    rgb_std = torch.tensor(IMAGENET_STD) * 255
    state["conv1.weight"] = state["conv1.weight"] / rgb_std.view(1, 3, 1, 1)
    with open(path, "wb") as handle:
        pickle.dump(msra_blobs(state), handle, protocol=2)
    return path


def calibrated_backbones(images: Path | None) -> tuple[Path | None, Path]:
    """(R-50.pkl or None, torchvision's .pth): random backbones whose BatchNorm statistics come from 16
    JPEGs of the folder `images` (one pair of files per folder, kept), or from random pixels when it is
    None (the .pkl then being random_msra_backbone's default, which our_model takes by itself). A folder
    without JPEGs is refused with one line."""
    import hashlib

    if images is None:
        return None, random_backbone()
    if not any(images.glob("*.jpg")):
        raise SystemExit(f"--calibrate-on {images}: no .jpg files there; give a folder of JPEGs "
                         "(e.g. /tmp/mlperf-epoch-level/coco-shaped/train2017 after benchmarks.epoch_level)")
    tag = hashlib.sha1(str(images.resolve()).encode()).hexdigest()[:12]
    msra = random_msra_backbone(Path(f"/tmp/bench_R-50-calibrated-on-{tag}.pkl"), images=images)
    return msra, msra.with_suffix(".pth")  # torchvision's layout, made on the way

