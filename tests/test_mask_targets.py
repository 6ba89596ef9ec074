"""The reference recipe's mask targets (object_detection/mask_targets.py) against the reference's own
computation: maskrcnn-benchmark's PolygonInstance.crop and resize (float32 tensors) and pycocotools'
frPyObjects, merge and decode, RoI by RoI, as mlcommons/training object_detection's
structures/segmentation_mask.py and modeling/roi_heads/mask_head/loss.py run them."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from torchvision.models.detection.roi_heads import maskrcnn_loss

from conftest import ROOT
from object_detection import mask_targets as MT
from tests.support.polygons import H, W, random_instances

M = 28


def reference_target(polygons: list[list[float]], box: list[float], height: int, width: int) -> np.ndarray:
    """One RoI's target as maskrcnn-benchmark makes it."""
    xmin, ymin, xmax, ymax = map(float, box)
    xmin, ymin = min(max(xmin, 0), width - 1), min(max(ymin, 0), height - 1)
    xmax, ymax = min(max(xmax, 0), width), min(max(ymax, 0), height)
    xmax, ymax = max(xmax, xmin + 1), max(ymax, ymin + 1)
    w, h = xmax - xmin, ymax - ymin
    ratio_w, ratio_h = float(M) / float(w), float(M) / float(h)
    scaled = []
    for flat in polygons:
        p = torch.as_tensor(flat, dtype=torch.float32).clone()
        p[0::2] = p[0::2] - xmin
        p[1::2] = p[1::2] - ymin
        if ratio_w == ratio_h:
            p = p * ratio_w
        else:
            p[0::2] *= ratio_w
            p[1::2] *= ratio_h
        scaled.append(p.numpy().astype(np.float64))
    return mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(scaled, M, M)))


def targets_of(images) -> list[torch.Tensor]:
    """polygon_targets of a batch given as (edges, owner, polygons, RoIs, matched, image size) per image."""
    return MT.polygon_targets([{"polygon_edges": e, "polygon_owner": o, "polygons": n} for e, o, n, *_ in images],
                              [rois for *_, rois, _, _ in images], [m for *_, m, _ in images],
                              [shape for *_, shape in images])


@pytest.mark.slow
def test_the_targets_are_the_reference_s_bit_for_bit():
    cases = random_instances(600)
    edges, owner = MT.polygon_edges([polygons for polygons, _ in cases])
    boxes = torch.tensor([box for _, box in cases], dtype=torch.float32)
    ours = targets_of([(edges, owner, 3, boxes, torch.arange(len(cases)), (H, W))])[0]
    assert ours.shape == (len(cases), M, M) and ours.dtype == torch.float32
    differing = [i for i, (polygons, _) in enumerate(cases)
                 if not np.array_equal(reference_target(polygons, boxes[i].tolist(), H, W), ours[i].numpy())]
    assert differing == []
    covered = ours.mean((1, 2))
    assert (covered == 0).any() and (covered == 1).any() and ((covered > 0) & (covered < 1)).sum() > 300


def test_rois_pick_their_matched_instance_and_padding_draws_nothing():
    square = [[10.0, 10.0, 50.0, 10.0, 50.0, 50.0, 10.0, 50.0]]
    long_one = [[v for i in range(30) for v in (100.0 + 5 * i, 100.0 + 40 * (i % 2))]
                + [245.0, 200.0, 100.0, 200.0]]
    edges, owner = MT.polygon_edges([square, long_one])
    assert edges.shape == (2, 32, 4) and (owner[0] >= 0).sum() == 4 and (owner[1] >= 0).all()
    boxes = torch.tensor([[10.0, 10.0, 50.0, 50.0], [100.0, 100.0, 245.0, 200.0], [10.0, 10.0, 50.0, 50.0]])
    ours = targets_of([(edges, owner, 1, boxes, torch.tensor([0, 1, 1]), (H, W))])[0]
    for k, (instance, box) in enumerate([(square, boxes[0]), (long_one, boxes[1]), (long_one, boxes[2])]):
        assert np.array_equal(ours[k].numpy(), reference_target(instance, box.tolist(), H, W))
    assert ours[0].sum() > 700                       # the square fills its own box
    assert ours[2].sum() == 0                        # the other instance lies outside this box


@pytest.mark.parametrize("edges_at_once", [MT.EDGES_AT_ONCE, 200])
def test_a_batch_is_drawn_at_once_whatever_its_images_sizes_and_edge_counts(edges_at_once, monkeypatch):
    """Images of several sizes, instances of different edge counts, an image without RoIs: one
    rasterisation for the batch, each image's targets as the reference makes them in its own image."""
    monkeypatch.setattr(MT, "EDGES_AT_ONCE", edges_at_once)  # 200: a few RoIs a chunk, as a very long polygon makes
    sizes = [(480, 640), (800, 1067), (100, 90)]
    images, wanted = [], []
    for k, (height, width) in enumerate(sizes):
        cases = random_instances(30 + 20 * k, seed=10 + k)
        edges, owner = MT.polygon_edges([polygons for polygons, _ in cases])
        boxes = torch.tensor([box for _, box in cases], dtype=torch.float32)
        matched = torch.arange(len(cases)).flip(0) if k == 1 else torch.arange(len(cases))
        rois = boxes[matched]
        if k == 2:
            rois, matched = rois[:0], matched[:0]
        images.append((edges, owner, 3, rois, matched, (height, width)))
        wanted.append([reference_target(cases[int(m)][0], roi.tolist(), height, width)
                       for roi, m in zip(rois, matched)])
    drawn = targets_of(images)
    assert [len(d) for d in drawn] == [30, 50, 0]
    for got, want in zip(drawn, wanted):
        assert all(np.array_equal(g.numpy(), w) for g, w in zip(got, want))


def test_resize_and_flip_of_the_edges_follow_the_reference():
    edges, owner = MT.polygon_edges([[[10.5, 20.25, 300.0, 20.25, 155.5, 400.75]]])
    scaled = MT.scale_edges(edges, (480, 640), (800, 1067))   # PolygonInstance.resize: float32 products
    reference = torch.tensor([10.5, 20.25, 300.0, 20.25, 155.5, 400.75], dtype=torch.float32)
    reference[0::2] *= 1067 / 640
    reference[1::2] *= 800 / 480
    assert torch.equal(scaled[0, :, :2].reshape(-1), reference)
    flipped = MT.flip_edges(edges, owner, 640, 1)            # PolygonInstance.transpose: W - x - 1
    assert flipped[0, :, 0].tolist() == [628.5, 339.0, 483.5] and torch.equal(flipped[..., 1], edges[..., 1])


def test_full_masks_still_go_through_torchvision_s_loss():
    """An image without polygons (RLE annotations, the shapes sets) keeps torchvision's targets."""
    torch.manual_seed(0)
    logits = torch.randn(5, 4, M, M)
    proposals = [torch.tensor([[0.0, 0.0, 30.0, 30.0], [5.0, 5.0, 60.0, 40.0], [10.0, 0.0, 20.0, 70.0]]),
                 torch.tensor([[1.0, 2.0, 50.0, 60.0], [0.0, 0.0, 79.0, 79.0]])]
    matched = [torch.tensor([0, 1, 0]), torch.tensor([0, 0])]
    targets = [{"labels": torch.tensor([1, 3]), "masks": (torch.rand(2, 80, 80) > 0.5).to(torch.uint8)},
               {"labels": torch.tensor([2]), "masks": (torch.rand(1, 80, 80) > 0.5).to(torch.uint8)}]
    ours = MT.mask_loss(logits, proposals, targets, matched, [(80, 80), (80, 80)])
    theirs = maskrcnn_loss(logits, proposals, [t["masks"] for t in targets], [t["labels"] for t in targets], matched)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a GPU (run on the device machine)"))])
def test_a_batch_s_polygon_loss_matches_the_reference_targets(device):
    """mask_loss on polygon targets is BCE against the reference's targets, on either device."""
    cases = random_instances(40, seed=1)
    edges, owner = MT.polygon_edges([polygons for polygons, _ in cases])
    boxes = torch.tensor([box for _, box in cases], dtype=torch.float32)
    labels = torch.randint(1, 4, (len(cases),))
    logits = torch.randn(len(cases), 4, M, M)
    target = {"labels": labels, "polygon_edges": edges, "polygon_owner": owner, "polygons": 3}
    where = torch.device(device)
    on = {k: v.to(where) if torch.is_tensor(v) else v for k, v in target.items()}
    ours = MT.mask_loss(logits.to(where), [boxes.to(where)], [on], [torch.arange(len(cases), device=where)], [(H, W)])
    wanted = torch.stack([torch.from_numpy(reference_target(p, boxes[i].tolist(), H, W)).float()
                          for i, (p, _) in enumerate(cases)])
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits[torch.arange(len(cases)), labels], wanted)
    assert ours.item() == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.slow(seconds=30)
def test_the_one_kernel_draws_the_same_targets_bit_for_bit():
    """fast.rasterise's kernel (`--speed fast-with:mask_targets_kernel`) as Triton's interpreter runs it
    on the CPU, against the tensor operations above: one image, a batch of three sizes with its RoIs
    matched in another order, and an image without RoIs (tests/support/rasterise_checks.py)."""
    pytest.importorskip("triton")
    proc = subprocess.run([sys.executable, "-m", "tests.support.rasterise_checks"], cwd=ROOT, timeout=600,
                          env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report == {"usable": True, "one image": 0, "three images, one matched backwards": 0,
                      "an image without RoIs": 0}


def test_the_lever_hands_the_heads_the_kernel_and_a_cpu_still_draws_with_tensor_operations():
    """The trainer's `--speed fast-with:mask_targets_kernel` reaches the RoI heads; where the kernel
    cannot run (a CPU without the interpreter) the same losses come from the tensor operations."""
    from benchmarks.train_throughput import synthetic_batch, with_polygons
    from object_detection.fast import options_for
    from object_detection.fast.rasterise import crop_and_rasterise
    from object_detection.model import build_model
    from object_detection.recipe import RECIPES

    losses = []
    for speed in ("fast", "fast-with:mask_targets_kernel"):
        torch.manual_seed(0)
        model = build_model(81, backbone_weights=None, min_size=256, max_size=320, proposals_per_image=100,
                            rois_per_image=64, speed=options_for(speed, "cpu"), recipe=RECIPES["reference"]).train()
        assert model.roi_heads.draw_mask_targets is (crop_and_rasterise if speed != "fast" else None)
        images, targets = synthetic_batch(2, "cpu", seed=3, shapes="legacy")
        torch.manual_seed(1)
        losses.append(model([image.float() / 255 for image in images], with_polygons(targets)))
    assert losses[0].keys() == losses[1].keys() and losses[0]["loss_mask"] > 0
    assert all(torch.equal(losses[0][k], losses[1][k]) for k in losses[0])


def test_the_kernel_compiles_for_hopper_without_fused_float64_arithmetic():
    """Triton compiles the kernel for an H100 (sm_90) here too, without a GPU: the float64 divisions are
    IEEE's (div.rn, not Triton's approximate float32 kind) and, with fusion off as crop_and_rasterise
    launches it, no multiply-add is fused (pycocotools rounds a*b and then +c; with fusion on this kernel
    gets 14 fma.rn.f64), so the GPU draws what the interpreter checks above draw."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget

    from object_detection.fast import rasterise

    signature = {"edges_ptr": "*fp32", "boxes_ptr": "*fp32", "limits_ptr": "*fp32", "owner_ptr": "*i64",
                 "out_ptr": "*u8", "count": "i32", "polygons": "i32", "size": "constexpr", "BLOCK": "constexpr"}
    source = triton.compiler.ASTSource(fn=rasterise._kernel, signature=signature,
                                       constexprs={"size": M, "BLOCK": rasterise.BLOCK})
    ptx = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"enable_fp_fusion": False}).asm["ptx"]
    assert "div.rn.f64" in ptx and "div.full" not in ptx
    assert "fma.rn" not in ptx
