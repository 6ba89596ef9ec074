"""The reference recipe's model pieces (object_detection.reference) pinned to maskrcnn-benchmark's
definitions on fixed inputs. Expected values are worked out by hand from the reference's formulas
(anchor_generator.py, box_coder.py, rpn/loss.py, rpn/inference.py, box_head/loss.py), not taken
from its code; and the fast model (object_detection.fast) against the stock reference model."""
from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from object_detection import reference
from object_detection.fast import STOCK, Options
from object_detection.mask_targets import polygon_edges
from object_detection.model import build_model
from object_detection.recipe import PROFILES, RECIPES

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- anchors


def test_cell_anchors_are_detectrons():
    # stride 4, size 32: the 4x4 base box centred at 1.5; ratio 0.5 -> round(sqrt(32)) = 6 wide,
    # round(6 * 0.5) = 3 high, times 32/4 -> 48 x 24 around the centre, corners inclusive.
    torch.testing.assert_close(reference.cell_anchors(4, 32), torch.tensor(
        [[-22.0, -10.0, 25.0, 13.0], [-14.0, -14.0, 17.0, 17.0], [-10.0, -22.0, 13.0, 25.0]]))
    # stride 16, size 128: the classic Faster R-CNN anchor of ratio 0.5 (23 x 12 -> 184 x 96 at 7.5)
    torch.testing.assert_close(reference.cell_anchors(16, 128)[0], torch.tensor([-84.0, -40.0, 99.0, 55.0]))


def test_anchors_of_a_feature_map_shift_by_the_fixed_stride():
    from torchvision.models.detection.image_list import ImageList

    generator = reference.ReferenceAnchorGenerator()
    images = ImageList(torch.zeros(2, 3, 800, 1344), [(800, 1333), (790, 1344)])
    maps = [torch.zeros(2, 1, 800 // s, 1344 // s) for s in (4, 8, 16, 32)] + [torch.zeros(2, 1, 13, 21)]
    anchors = generator(images, maps)
    assert len(anchors) == 2 and anchors[0] is anchors[1]  # the same anchors for every image
    per_level = [3 * m.shape[-2] * m.shape[-1] for m in maps]
    levels = anchors[0].split(per_level)
    # location-major, ratio-minor; x moves first along a row
    torch.testing.assert_close(levels[0][3:6], reference.cell_anchors(4, 32) + torch.tensor([4.0, 0, 4, 0]))
    # P6 of an 800-pixel side has 13 rows: its stride is 64 (torchvision would take 800 // 13 = 61)
    row_13 = levels[4].view(13, 21, 3, 4)[12, 0]
    torch.testing.assert_close(row_13, reference.cell_anchors(64, 512) + torch.tensor([0, 768.0, 0, 768]))
    assert levels[0].dtype == torch.float32
    # kept for the map sizes last seen (they depend on nothing else), the oldest dropped
    assert generator(images, maps)[0] is anchors[0]
    generator.KEPT_SIZES = 2
    for rows in (7, 9):
        generator(images, maps[:4] + [torch.zeros(2, 1, rows, 21)])
    fresh = generator(images, maps)[0]
    assert fresh is not anchors[0] and torch.equal(fresh, anchors[0]) and len(generator._kept) == 2


# ---------------------------------------------------------------- box coding


def test_box_coding_uses_inclusive_widths():
    coder = reference.ReferenceBoxCoder((1.0, 1.0, 1.0, 1.0))
    proposal = torch.tensor([[0.0, 0.0, 9.0, 9.0]])     # 10 x 10 with the +1, centre (5, 5)
    gt = torch.tensor([[0.0, 0.0, 19.0, 9.0]])          # 20 x 10, centre (10, 5)
    codes = coder.encode_single(gt, proposal)
    torch.testing.assert_close(codes, torch.tensor([[0.5, 0.0, float(np.log(2.0)), 0.0]]))
    torch.testing.assert_close(coder.decode_single(codes, proposal), gt)
    # the RoI head's weights (10, 10, 5, 5) scale the same deltas
    head = reference.ReferenceBoxCoder((10.0, 10.0, 5.0, 5.0))
    torch.testing.assert_close(head.encode_single(gt, proposal), torch.tensor([[5.0, 0.0, 5 * float(np.log(2.0)), 0.0]]))
    # torchvision's coder (no +1) gives other codes for the same boxes
    from torchvision.models.detection._utils import BoxCoder

    assert not torch.allclose(BoxCoder((1.0, 1.0, 1.0, 1.0)).encode_single(gt, proposal), codes)


def test_the_fast_box_coder_codes_as_the_reference_when_layered_over_it():
    from object_detection.fast import sync_free
    from object_detection.fast.patch import mix_in

    g = torch.Generator().manual_seed(0)
    boxes = torch.rand(50, 2, generator=g) * 300
    boxes = torch.cat([boxes, boxes + 5 + torch.rand(50, 2, generator=g) * 100], dim=1)
    gt = boxes + torch.randn(50, 4, generator=g) * 3
    stock = reference.ReferenceBoxCoder((10.0, 10.0, 5.0, 5.0))
    fast = mix_in(reference.ReferenceBoxCoder((10.0, 10.0, 5.0, 5.0)), sync_free.SyncFreeBoxCoder)
    torch.testing.assert_close(fast.encode([gt], [boxes])[0], stock.encode([gt], [boxes])[0])
    codes = torch.randn(50, 8, generator=g)
    torch.testing.assert_close(fast.decode(codes, [boxes]), stock.decode(codes, [boxes]))


# ---------------------------------------------------------------- the RPN


def test_straddling_anchors_are_ignored():
    anchors = torch.tensor([[-1.0, 0, 5, 5], [0, 0, 9, 9], [0, 0, 10, 9], [2, 3, 9, 10], [2, 3, 9, 9.5]])
    visible = reference.visible_anchors(anchors, (10, 10), 0.0)  # (height, width)
    assert visible.tolist() == [False, True, False, False, True]
    labels = reference.ignore_straddling([torch.ones(5)], [anchors], [(10, 10)], 0.0)[0]
    assert labels.tolist() == [-1, 1, -1, -1, 1]
    assert reference.ignore_straddling([torch.ones(5)], [anchors], [(10, 10)], None)[0].tolist() == [1] * 5


def rpn(cls, proposals_per: str):
    from torchvision.models.detection.rpn import RPNHead

    from object_detection.fast.patch import mix_in

    made = reference.ReferenceRPN(reference.ReferenceAnchorGenerator(), RPNHead(8, 3), 0.7, 0.3, 256, 0.5,
                                  dict(training=300, testing=100), dict(training=50, testing=50), 0.7)
    made.proposals_per = proposals_per
    if cls is not None:
        mix_in(made, cls)
    return made.train()


@pytest.mark.parametrize("fast", [False, True])
def test_training_proposals_are_the_best_over_the_batch(fast):
    from object_detection.fast import sync_free

    g = torch.Generator().manual_seed(5)
    levels = [400, 200]
    boxes = torch.rand(2, sum(levels), 2, generator=g) * 200
    proposals = torch.cat([boxes, boxes + 4 + torch.rand(2, sum(levels), 2, generator=g) * 10], dim=2)
    objectness = torch.randn(2, sum(levels), generator=g)
    objectness[1] += 3.0                                 # the second image's proposals all score higher
    shapes = [(240, 240), (240, 240)]
    per_image = rpn(sync_free.SyncFreeRPN if fast else None, "image")
    per_batch = rpn(sync_free.SyncFreeRPN if fast else None, "batch")
    _, image_scores = per_image.filter_proposals(proposals, objectness, shapes, levels)
    _, batch_scores = per_batch.filter_proposals(proposals, objectness, shapes, levels)
    assert [len(s) for s in image_scores] == [50, 50]
    # 100 over the batch: the second image takes more than its 50, the first what is left
    assert sum(len(s) for s in batch_scores) == 100 and len(batch_scores[1]) > 50
    threshold = torch.cat(batch_scores).min()
    everything, _ = rpn(sync_free.SyncFreeRPN if fast else None, "batch").eval().filter_proposals(
        proposals, objectness, shapes, levels)  # (evaluation keeps per image: 50 each)
    assert all(len(b) == 50 for b in everything)
    assert all((s >= threshold).all() for s in batch_scores)


def test_fast_and_stock_batch_selection_agree():
    from object_detection.fast import sync_free

    g = torch.Generator().manual_seed(9)
    levels = [500, 250, 60]
    boxes = torch.rand(3, sum(levels), 2, generator=g) * 250
    proposals = torch.cat([boxes, boxes + 4 + torch.rand(3, sum(levels), 2, generator=g) * 20], dim=2)
    objectness = torch.randn(3, sum(levels), generator=g)
    shapes = [(260, 250), (250, 260), (255, 255)]
    want_boxes, want_scores = rpn(None, "batch").filter_proposals(proposals, objectness, shapes, levels)
    got_boxes, got_scores = rpn(sync_free.SyncFreeRPN, "batch").filter_proposals(proposals, objectness, shapes, levels)
    for wb, ws, gb, gs in zip(want_boxes, want_scores, got_boxes, got_scores):
        order = ws.argsort(descending=True)              # the stock keeps level order; fast, best first
        torch.testing.assert_close(gs, ws[order])
        torch.testing.assert_close(gb, wb[order])


# ---------------------------------------------------------------- losses and initialisation


def test_box_head_loss_has_beta_one():
    labels = [torch.tensor([1, 0])]
    targets = [torch.tensor([[0.5, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])]
    logits = torch.zeros(2, 3)
    regression = torch.zeros(2, 12)
    regression[0, 4:8] = torch.tensor([2.0, 0.0, 0.0, 0.0])  # class 1's deltas of the positive
    _, beta_one = reference.fastrcnn_loss(logits, regression, labels, targets, beta=1.0)
    # |2 - 0.5| = 1.5 >= beta: 1.5 - 0.5 = 1.0, over the 2 sampled RoIs
    assert beta_one.item() == pytest.approx(0.5)
    _, ninth = reference.fastrcnn_loss(logits, regression, labels, targets, beta=1 / 9)
    assert ninth.item() == pytest.approx((1.5 - 0.5 / 9) / 2)
    from object_detection.fast.sync_free import fastrcnn_loss_masked

    _, masked = fastrcnn_loss_masked(logits, regression, labels, targets, beta=1.0)
    assert masked.item() == pytest.approx(0.5)


def test_heads_start_as_the_reference_initialises_them():
    torch.manual_seed(0)
    model = build_model(81, backbone_weights=None, min_size=64, max_size=96, recipe=RECIPES["reference"],
                        speed=STOCK)
    predictor, head = model.roi_heads.box_predictor, model.roi_heads.box_head
    assert predictor.cls_score.weight.std().item() == pytest.approx(0.01, rel=0.05)
    assert predictor.bbox_pred.weight.std().item() == pytest.approx(0.001, rel=0.05)
    fan_in = head.fc6.weight.shape[1]
    # kaiming_uniform a=1: U(-b, b), b = sqrt(3 / fan_in), std b / sqrt(3)
    assert head.fc6.weight.std().item() == pytest.approx(1 / np.sqrt(fan_in), rel=0.05)
    biases = [predictor.cls_score.bias, predictor.bbox_pred.bias, head.fc6.bias, head.fc7.bias,
              model.roi_heads.mask_predictor.mask_fcn_logits.bias, model.roi_heads.mask_predictor.conv5_mask.bias]
    assert all(bool((b == 0).all()) for b in biases)


def test_closed_profile_is_the_reference_recipe_and_open_ones_keep_torchvisions():
    assert PROFILES["coco"].recipe is RECIPES["reference"]
    assert PROFILES["shapes"].recipe is RECIPES["torchvision"]
    assert PROFILES["shapes-cpu"].recipe is RECIPES["torchvision"]


def synthetic_targets(g, height, width, classes=5, polygons=False):
    boxes = torch.tensor([[10.0, 12.0, 60.0, 50.0], [30.0, 5.0, 90.0, 70.0]])
    if polygons:  # as the loader gives COCO's polygons to the reference recipe (mask_targets.py)
        edges, owner = polygon_edges([[[x0, y0, x1, y0, x1, y1, x0, y1]] for x0, y0, x1, y1 in boxes.tolist()])
        return {"boxes": boxes, "labels": torch.tensor([1, 3]), "polygon_edges": edges, "polygon_owner": owner,
                "polygons": 1}
    masks = torch.zeros(2, height, width, dtype=torch.uint8)
    for mask, (x0, y0, x1, y1) in zip(masks, boxes.int().tolist()):
        mask[y0:y1, x0:x1] = 1
    return {"boxes": boxes, "labels": torch.tensor([1, 3]), "masks": masks}


@pytest.mark.slow
@pytest.mark.parametrize("empty, polygons", [(False, False), (True, False), (False, True)])
def test_the_fast_reference_model_computes_the_stock_reference_losses(empty, polygons):
    g = torch.Generator().manual_seed(1)
    images = [torch.rand(3, 96, 128, generator=g), torch.rand(3, 100, 120, generator=g)]
    targets = [synthetic_targets(g, 96, 128, polygons=polygons), synthetic_targets(g, 100, 120)]
    if empty:  # a crowd-only image: the reference's filter keeps it, with no box to learn
        targets[1] = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
                      "masks": torch.zeros(0, 100, 120, dtype=torch.uint8)}
    losses = {}
    for name, speed in (("stock", STOCK), ("fast", Options())):
        torch.manual_seed(0)
        model = build_model(5, backbone_weights=None, min_size=96, max_size=128, recipe=RECIPES["reference"],
                            proposals_per_image=100, speed=speed).train()
        torch.manual_seed(7)  # the samplers' draws
        losses[name] = {k: v.item() for k, v in model(images, targets).items()}
    assert losses["stock"].keys() == losses["fast"].keys()
    assert all(np.isfinite(v) for v in losses["fast"].values()), losses
    for key, value in losses["stock"].items():
        assert losses["fast"][key] == pytest.approx(value, rel=1e-3, abs=1e-5), key


# ---------------------------------------------------------------- the MSRA R-50 file


def synthetic_msra_pickle(path: Path, *, wrap: bool = False, seed: int = 0) -> dict:
    """An R-50.pkl with the real key layout (Detectron blob names and shapes, fc1000 and momentum
    blobs included), written as Python 2's cPickle wrote it (protocol 2)."""
    from torchvision.models import resnet50

    names = reference._msra_names()
    shapes = {name: tuple(v.shape) for name, v in resnet50().state_dict().items()}
    rng = np.random.default_rng(seed)
    blobs = {theirs: rng.standard_normal(shapes[ours]).astype(np.float32) for ours, theirs in names.items()}
    blobs["fc1000_w"] = rng.standard_normal((1000, 2048)).astype(np.float32)
    blobs["fc1000_b"] = np.zeros(1000, np.float32)
    blobs["conv1_w_momentum"] = np.zeros((64, 3, 7, 7), np.float32)
    with open(path, "wb") as handle:
        pickle.dump({"blobs": blobs} if wrap else blobs, handle, protocol=2)
    return blobs


@pytest.mark.slow
@pytest.mark.parametrize("wrap", [False, True])
def test_msra_pickle_converts_to_the_reference_backbone(tmp_path, wrap):
    blobs = synthetic_msra_pickle(tmp_path / "R-50.pkl", wrap=wrap)
    body = reference.msra_resnet50(tmp_path / "R-50.pkl")
    state = body.state_dict()
    torch.testing.assert_close(state["layer3.2.conv2.weight"], torch.from_numpy(blobs["res4_2_branch2b_w"]))
    torch.testing.assert_close(state["layer1.0.downsample.1.weight"], torch.from_numpy(blobs["res2_0_branch1_bn_s"]))
    torch.testing.assert_close(state["bn1.bias"], torch.from_numpy(blobs["res_conv1_bn_b"]))
    assert bool((state["layer2.0.bn1.running_var"] == 1).all()) and body.bn1.eps == 0.0
    assert body.layer2[0].conv1.stride == (2, 2) and body.layer2[0].conv2.stride == (1, 1)
    # conv1 reversed over its input channels: RGB in, the same function as the file's BGR network
    rgb = torch.rand(1, 3, 32, 32)
    bgr_conv = torch.nn.functional.conv2d(rgb.flip(1), torch.from_numpy(blobs["conv1_w"]), stride=2, padding=3)
    torch.testing.assert_close(body.conv1(rgb), bgr_conv, rtol=1e-4, atol=1e-4)


def test_msra_input_is_bgr_255_minus_the_pixel_mean():
    model = build_model(81, backbone_weights=None, min_size=64, max_size=96, recipe=RECIPES["reference"])
    image = torch.rand(3, 64, 64)
    normalised = model.transform.normalize(image)
    expected = image * 255 - torch.tensor([122.7717, 115.9465, 102.9801])[:, None, None]  # RGB order
    torch.testing.assert_close(normalised, expected, rtol=1e-5, atol=1e-3)


def test_a_pickle_that_would_run_code_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "ran"

    class Hostile:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    with open(tmp_path / "R-50.pkl", "wb") as handle:
        pickle.dump({"conv1_w": Hostile()}, handle, protocol=2)
    with pytest.raises(reference.BackboneFileError, match="refused"):
        reference.read_msra_pickle(tmp_path / "R-50.pkl")
    assert not marker.exists()


@pytest.mark.slow
def test_the_trainer_refuses_a_hostile_backbone_in_one_line(tmp_path):
    marker = tmp_path / "ran"
    command = f"touch {marker}".encode()
    with open(tmp_path / "R-50.pkl", "wb") as handle:  # os.system("touch <marker>") as pickle opcodes
        handle.write(b"\x80\x02cposix\nsystem\nX" + len(command).to_bytes(4, "little") + command + b"\x85R.")
    done = subprocess.run([sys.executable, "-m", "object_detection.train", "--data-root", str(tmp_path),
                           "--backbone", str(tmp_path / "R-50.pkl"), "--profile", "coco", "--device", "cpu",
                           "--result-log", str(tmp_path / "result_0.txt"), "--per-gpu-batch", "8"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "posix.system" in lines[0], done.stderr
    assert not marker.exists()


def test_results_of_the_reference_model_have_inclusive_widths():
    from object_detection.coco_results import detections_to_coco

    output = {"boxes": torch.tensor([[10.0, 10.0, 19.0, 29.0]]), "labels": torch.tensor([1]),
              "scores": torch.tensor([0.9])}
    assert detections_to_coco([output], [7], [0, 1], box_offset=1)[0]["bbox"] == [10.0, 10.0, 10.0, 20.0]
    assert detections_to_coco([output], [7], [0, 1])[0]["bbox"] == [10.0, 10.0, 9.0, 19.0]
