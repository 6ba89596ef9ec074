"""object_detection.sync_free against the torchvision code it replaces, piece by piece, on the CPU.

Scores are drawn distinct (greedy NMS orders by score; with ties any order is right), and the
inputs are crowded enough that suppression chains are long, which is where a fixed-point NMS
would go wrong if it stopped early.
"""
from __future__ import annotations

import collections
import copy
import json
import os
import subprocess
import sys
import traceback
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torchvision.models.detection._utils import Matcher
from torchvision.models.detection.rpn import RegionProposalNetwork
from torch.overrides import TorchFunctionMode
from torchvision.ops import MultiScaleRoIAlign, nms

from object_detection.fast import Options, mask_branch, padded_heads, sync_free
from object_detection.fast import nms as fast_nms
from object_detection.fast.sampler import BatchedBalancedSampler
from benchmarks.train_throughput import synthetic_batch, with_polygons
from conftest import ROOT
from object_detection.model import build_model
from object_detection.recipe import RECIPES
from tests.support.boxes import crowded_boxes
from tests.support.same_training import assert_trains_the_same


@pytest.mark.parametrize("seed", range(6))
def test_fixed_point_nms_keeps_what_torchvision_nms_keeps(seed):
    g = torch.Generator().manual_seed(seed)
    groups, k = 5, 300
    boxes = torch.stack([crowded_boxes(k, g) for _ in range(groups)])
    scores = torch.rand(groups, k, generator=g)
    order = scores.argsort(dim=1, descending=True)
    boxes = boxes.gather(1, order[..., None].expand(-1, -1, 4))       # sorted by score, as the RPN hands them
    scores = scores.gather(1, order)
    valid = torch.rand(groups, k, generator=g) > 0.2                  # small or low-scoring boxes
    threshold = [0.3, 0.5, 0.7][seed % 3]
    keep = fast_nms.fixed_point_nms(boxes, valid, threshold, passes_per_check=1 + seed % 2)
    assert keep.shape == valid.shape and keep.is_contiguous()  # 300 runs padded to 384, sliced back
    assert torch.equal(fast_nms.greedy_nms(boxes, valid, threshold), keep)  # the CPU path agrees
    for i in range(groups):
        idx = valid[i].nonzero()[:, 0]
        expected = idx[nms(boxes[i, idx], scores[i, idx], threshold)]
        assert sorted(keep[i].nonzero()[:, 0].tolist()) == sorted(expected.tolist())


def test_fixed_point_nms_handles_chunks_and_empty_groups(monkeypatch):
    monkeypatch.setattr(fast_nms, "NMS_CHUNK_ENTRIES", 2 * 128 * 128)  # two groups (50 padded to 128) a chunk
    g = torch.Generator().manual_seed(7)
    boxes = torch.stack([crowded_boxes(50, g) for _ in range(5)])
    valid = torch.ones(5, 50, dtype=torch.bool)
    valid[3] = False                                                    # a level with nothing valid
    keep = fast_nms.fixed_point_nms(boxes, valid, 0.5)
    assert keep.shape == (5, 50) and keep.is_contiguous()
    assert torch.equal(fast_nms.greedy_nms(boxes, valid, 0.5), keep)
    assert not keep[3].any()
    for i in (0, 1, 2, 4):
        assert keep[i].tolist() == (torch.zeros(50, dtype=torch.bool).index_fill_(
            0, nms(boxes[i], -torch.arange(50.0), 0.5), True)).tolist()


def make_rpn(cls, post_nms: int = 300) -> RegionProposalNetwork:
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.rpn import RPNHead

    rpn = RegionProposalNetwork(AnchorGenerator(), RPNHead(8, 3), 0.7, 0.3, 256, 0.5,
                                dict(training=400, testing=400), dict(training=post_nms, testing=post_nms), 0.7)
    rpn.__class__ = cls
    return rpn


def test_proposal_filtering_matches_torchvision():
    g = torch.Generator().manual_seed(3)
    levels = [900, 500, 120]                          # the last level has fewer than pre_nms_top_n
    images = 3
    proposals = torch.stack([crowded_boxes(sum(levels), g, span=300) for _ in range(images)])
    proposals[0, :40, 2:] = proposals[0, :40, :2]     # zero-size boxes: removed before NMS
    objectness = torch.randn(images, sum(levels), generator=g)
    shapes = [(320, 300), (250, 330), (333, 333)]
    stock = make_rpn(RegionProposalNetwork).train()
    ours = make_rpn(sync_free.SyncFreeRPN).train()
    want_boxes, want_scores = stock.filter_proposals(proposals, objectness, shapes, levels)
    got_boxes, got_scores = ours.filter_proposals(proposals, objectness, shapes, levels)
    for wb, ws, gb, gs in zip(want_boxes, want_scores, got_boxes, got_scores):
        assert len(wb) == len(gb) > 0
        torch.testing.assert_close(gs, ws)                  # same order: best first over all levels
        torch.testing.assert_close(gb, wb)


def test_padded_proposals_are_the_survivors_then_unit_squares_beyond_the_image():
    """padded_heads: every image's row as wide as the widest, its survivors first and as the cut
    lists have them, then unit squares marked invalid (the rest of the row may hold boxes of
    negative width, for which the poolers have no level) beyond the image, where RoIAlign samples
    nothing and its backward adds nothing."""
    g = torch.Generator().manual_seed(3)
    levels = [900, 500, 120]
    proposals = torch.stack([crowded_boxes(sum(levels), g, span=300) for _ in range(3)])
    proposals[0, :40, 2] = proposals[0, :40, 0] - 0.5                 # negative width: removed before NMS
    objectness = torch.randn(3, sum(levels), generator=g)
    shapes = [(320, 300), (250, 330), (333, 333)]
    cut = make_rpn(sync_free.SyncFreeRPN).train()
    padded = make_rpn(padded_heads.PaddedRPN).train()
    cut.proposals_per = padded.proposals_per = "batch"  # the reference's: rows of 3 x 300 for 3 images
    want, _ = cut.filter_proposals(proposals, objectness, shapes, levels)
    got, _ = padded.filter_proposals(proposals, objectness, shapes, levels)
    assert isinstance(got, padded_heads.PaddedProposals) and len({len(b) for b in got}) == 1
    for wanted, row, valid in zip(want, got, got.valid):
        n = len(wanted)
        assert valid[:n].all() and not valid[n:].any() and n < len(row)
        assert torch.equal(row[:n], wanted)
        assert (row[n:] == torch.tensor([-128.0, -128.0, -127.0, -127.0])).all()


def test_matcher_matches_torchvision_including_low_quality_ties():
    g = torch.Generator().manual_seed(5)
    quality = (torch.rand(7, 400, generator=g) * 10).round() / 10   # coarse values: many ties
    for allow in (True, False):
        stock = Matcher(0.7, 0.3, allow_low_quality_matches=allow)
        ours = copy.copy(stock)
        ours.__class__ = sync_free.SyncFreeMatcher
        assert torch.equal(ours(quality.clone()), stock(quality.clone()))


def test_roi_align_by_level_matches_torchvision():
    g = torch.Generator().manual_seed(9)
    features = {str(i): torch.randn(2, 4, 64 >> i, 64 >> i, generator=g) for i in range(4)}
    boxes = [crowded_boxes(60, g, span=200).clamp(0, 255), crowded_boxes(45, g, span=200).clamp(0, 255) * 0.5]
    boxes[1][:5] = torch.tensor([0.0, 0.0, 250.0, 250.0])          # large: the coarsest level
    stock = MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2)
    ours = MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2)
    ours.__class__ = sync_free.SyncFreeRoIAlign
    expected = stock(features, boxes, [(256, 256), (256, 256)])
    got = ours(features, boxes, [(256, 256), (256, 256)])
    torch.testing.assert_close(got, expected)


def test_rpn_loss_matches_torchvision_on_the_same_draw():
    g = torch.Generator().manual_seed(11)
    labels = [torch.randint(-1, 2, (700,), generator=g).float() for _ in range(3)]
    regression = [torch.randn(700, 4, generator=g) for _ in range(3)]
    objectness = torch.randn(2100, 1, generator=g)
    deltas = torch.randn(2100, 4, generator=g)
    stock, ours = make_rpn(RegionProposalNetwork), make_rpn(sync_free.SyncFreeRPN)
    stock.fg_bg_sampler = ours.fg_bg_sampler = BatchedBalancedSampler(256, 0.5)
    torch.manual_seed(0)
    expected = stock.compute_loss(objectness, deltas, labels, regression)
    torch.manual_seed(0)
    got = ours.compute_loss(objectness, deltas, labels, regression)
    for e, o in zip(expected, got):
        torch.testing.assert_close(o, e)


@pytest.mark.parametrize("score_thresh", [0.05, 0.6, 1.0])
def test_detections_match_torchvision_postprocessing(score_thresh):
    """Evaluation path: every (image, class) suppressed at once equals torchvision's per-image
    batched_nms, also when the threshold leaves few candidates per class (the groups are cut
    after the last valid one) or none."""
    model = build_model(5, backbone_weights=None, min_size=96, max_size=128, speed=Options(sync_free=True)).eval()
    model.roi_heads.score_thresh = score_thresh
    stock_heads = copy.copy(model.roi_heads)
    stock_heads.__class__ = sync_free.RoIHeads
    g = torch.Generator().manual_seed(2)
    proposals = [crowded_boxes(300, g, span=90), crowded_boxes(200, g, span=90)]
    logits = torch.randn(500, 5, generator=g) * 3
    regression = torch.randn(500, 20, generator=g) * 0.1
    shapes = [(128, 120), (110, 128)]
    expected = stock_heads.postprocess_detections(logits, regression, proposals, shapes)
    got = model.roi_heads.postprocess_detections(logits, regression, proposals, shapes)
    for e, o in zip(expected, got):
        for a, b in zip(e, o):
            torch.testing.assert_close(b, a)
    assert (sum(map(len, got[0])) > 0) == (score_thresh < 1)


def test_transform_scales_boxes_and_normalises_bit_for_bit_as_torchvision():
    from torchvision.models.detection.transform import GeneralizedRCNNTransform, resize_boxes

    from object_detection.fast.transform import SyncFreeTransform, scale_boxes

    g = torch.Generator().manual_seed(4)
    boxes = crowded_boxes(50, g, span=400)
    for old, new in [((480, 640), (800, 1066)), ((427, 640), (800, 1199)), ((333, 500), (799, 1200))]:
        assert torch.equal(scale_boxes(boxes, old, new), resize_boxes(boxes, old, new))
    args = (800, 1333, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    ours, stock = SyncFreeTransform(*args), GeneralizedRCNNTransform(*args)
    image = torch.rand(3, 60, 80, generator=g)
    assert torch.equal(ours.normalize(image), stock.normalize(image))
    target = {"boxes": boxes[:3].clamp(0, 60), "labels": torch.tensor([1, 2, 3]),
              "masks": torch.zeros(3, 60, 80, dtype=torch.uint8)}
    for t in (ours, stock):
        t.eval()
    (a, ta), (b, tb) = ours.resize(image, dict(target)), stock.resize(image, dict(target))
    assert torch.equal(a, b) and torch.equal(ta["boxes"], tb["boxes"]) and torch.equal(ta["masks"], tb["masks"])


def test_box_coder_is_bit_for_bit_torchvision():
    from torchvision.models.detection._utils import BoxCoder

    g = torch.Generator().manual_seed(6)
    stock = BoxCoder((10.0, 10.0, 5.0, 5.0))
    ours = copy.copy(stock)
    ours.__class__ = sync_free.SyncFreeBoxCoder
    anchors = crowded_boxes(300, g)
    deltas = torch.randn(300, 8, generator=g)
    gt = crowded_boxes(300, g)
    for dtype in (torch.float32, torch.bfloat16):
        codes = deltas.to(dtype)
        assert torch.equal(ours.decode_single(codes, anchors), stock.decode_single(codes, anchors))
    assert torch.equal(ours.encode_single(gt, anchors), stock.encode_single(gt, anchors))


def batch_targets(g: torch.Generator, counts=(3, 1, 7)):
    targets = []
    for n in counts:
        boxes = crowded_boxes(n, g, span=150)
        targets.append({"boxes": boxes, "labels": torch.randint(1, 81, (n,), generator=g)})
    return targets


def test_batched_anchor_assignment_matches_torchvision_per_image():
    g = torch.Generator().manual_seed(12)
    targets = batch_targets(g)
    anchor = crowded_boxes(2000, g, span=200)
    anchors = [anchor] * len(targets)             # what AnchorGenerator hands every image of a batch
    ours = make_rpn(sync_free.SyncFreeRPN)
    ours.proposal_matcher.__class__ = sync_free.SyncFreeMatcher
    got_labels, got_boxes = ours.assign_targets_to_anchors(anchors, targets)
    want_labels, want_boxes = RegionProposalNetwork.assign_targets_to_anchors(ours, anchors, targets)
    for gl, gb, wl, wb in zip(got_labels, got_boxes, want_labels, want_boxes):
        assert torch.equal(gl, wl)
        assert torch.equal(gb[wl == 1], wb[wl == 1])  # the boxes that are regressed to


def test_batched_proposal_assignment_matches_torchvision_per_image():
    model = build_model(81, backbone_weights=None, min_size=96, max_size=128)
    heads = model.roi_heads
    g = torch.Generator().manual_seed(13)
    targets = batch_targets(g, counts=(2, 5, 4))
    proposals = [crowded_boxes(n, g, span=150) for n in (300, 120, 260)]
    gt_boxes = [t["boxes"] for t in targets]
    gt_labels = [t["labels"] for t in targets]
    got = heads.assign_targets_to_proposals(proposals, gt_boxes, gt_labels)
    want = sync_free.RoIHeads.assign_targets_to_proposals(heads, proposals, gt_boxes, gt_labels)
    for g_list, w_list in zip(got, want):
        for a, b in zip(g_list, w_list):
            assert torch.equal(a, b)


def test_nms_falls_back_to_eager_once_when_compiling_fails(capsys):
    """torch.compile fails at the first call when the GPU host has no toolchain: the step goes on."""
    calls = []

    def broken(*args):
        calls.append(args)
        raise RuntimeError("no C compiler")

    relax = fast_nms._eager_if_compiling_fails(broken, fast_nms._relax)
    suppresses = fast_nms._suppresses(crowded_boxes(16, torch.Generator().manual_seed(1))[None], 0.5)
    valid = torch.ones(1, 16, dtype=torch.bool)
    expected = fast_nms._relax(suppresses, valid, valid)
    assert torch.equal(relax(suppresses, valid, valid), expected)
    assert torch.equal(relax(suppresses, valid, valid), expected)
    assert len(calls) == 1 and "running it eagerly" in capsys.readouterr().err


@pytest.mark.slow
def test_scan_nms_keeps_what_torchvision_nms_keeps():
    """fast.nms.scan_nms, the walk the GPU runs (no host wait), as Triton's interpreter runs it on the
    CPU: crowded groups at three thresholds, several chunks, one box, none valid, none at all."""
    pytest.importorskip("triton")
    proc = subprocess.run([sys.executable, "-m", "tests.support.nms_scan_checks"], cwd=ROOT, timeout=600,
                          env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report == dict.fromkeys(report, True) and len(report) == 6


class HostWaits(TorchFunctionMode):
    """The calls that read a tensor's values on the host (on a GPU each waits for it), by innermost
    object_detection frame. CPU-only ones are left out: NMS (on a GPU fast.nms's scan reads nothing)
    and torchvision's random choice of the input size (a CPU tensor on every device)."""

    READS = {"tolist", "item", "__bool__", "__int__", "__float__", "__index__", "nonzero"}

    def __init__(self):
        super().__init__()
        self.sites = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in self.READS:
            frames = traceback.extract_stack()[:-1]
            ours = [f for f in frames if "object_detection" in f.filename]
            if ours and not any("fast/nms.py" in f.filename or f.name == "torch_choice" for f in frames):
                self.sites[f"{Path(ours[-1].filename).name} {ours[-1].name}"] += 1
        return func(*args, **(kwargs or {}))


def test_padded_heads_train_the_same_function_with_one_host_wait():
    """fast.Options.padded_heads against the sync-free heads it extends, on the reference recipe's
    model with polygon targets and an image without boxes: the samplers take every candidate (no
    random draw), so losses and gradients must agree, and the forward reads one thing from the device
    (the mask branch's RoI count) besides the per-level poolers' counts, which fast.roi_align removes."""
    models = {}
    for padded in (False, True):
        torch.manual_seed(0)
        models[padded] = build_model(81, backbone_weights=None, min_size=64, max_size=96, recipe=RECIPES["reference"],
                                     speed=replace(Options.for_device("cpu"), padded_heads=padded)).train()
        for sampler in (models[padded].rpn.fg_bg_sampler, models[padded].roi_heads.fg_bg_sampler):
            sampler.batch_size_per_image = 100_000
        models[padded].rpn._pre_nms_top_n["training"], models[padded].rpn._post_nms_top_n["training"] = 300, 60
    models[True].load_state_dict(models[False].state_dict())
    images, targets = synthetic_batch(3, "cpu", seed=1)
    images, targets = [image.float() / 255 for image in images], with_polygons(targets)
    targets[1] = {**targets[1], "boxes": targets[1]["boxes"][:0], "labels": targets[1]["labels"][:0],
                  "polygon_edges": targets[1]["polygon_edges"][:0], "polygon_owner": targets[1]["polygon_owner"][:0]}
    losses, waits = {}, {}
    for padded, model in models.items():
        with torch.no_grad():
            model(images, targets)  # the poolers' one-time set-up reads the maps' sizes
        with HostWaits() as counted:
            losses[padded] = model(images, targets)
        sum(losses[padded].values()).backward()
        waits[padded] = counted.sites
    assert losses[True].keys() == losses[False].keys()
    assert_trains_the_same(models[True], models[False], losses[True], losses[False], loss_rtol=1e-5, loss_atol=1e-7,
                           grad_rtol=1e-4, grad_atol=1e-6)
    assert waits[True] == {"padded_heads.py forward_padded": 1, "sync_free.py forward": 2, "sync_free.py check_boxes": 1}
    assert sum(waits[False].values()) > sum(waits[True].values())


@pytest.mark.parametrize("padded", [False, True], ids=["sync_free", "padded_heads"])
def test_the_mask_branch_on_bucketed_channels_last_rois_trains_the_same_function(padded):
    """fast.Options.mask_roi_bucket and mask_channels_last against the mask branch on the positives
    alone in NCHW: the branch sees a multiple of MASK_ROI_BUCKET RoIs, and the losses and every
    gradient are the ones without the padding (an image without boxes among them)."""
    models, seen = {}, {}
    for levers in (False, True):
        torch.manual_seed(0)
        speed = replace(Options.for_device("cpu"), padded_heads=padded, nms_scan=padded, channels_last=True,
                        mask_channels_last=levers, mask_roi_bucket=levers)
        models[levers] = build_model(81, backbone_weights=None, min_size=64, max_size=96,
                                     recipe=RECIPES["reference"], speed=speed).train()
        models[levers].rpn._pre_nms_top_n["training"], models[levers].rpn._post_nms_top_n["training"] = 300, 60
        seen[levers] = []
        models[levers].roi_heads.mask_head.register_forward_hook(
            lambda module, inputs, output, seen=seen[levers]: seen.append(inputs[0]))
    models[True].load_state_dict(models[False].state_dict())
    images, targets = synthetic_batch(3, "cpu", seed=2)
    images, targets = [image.float() / 255 for image in images], with_polygons(targets)
    targets[1] = {**targets[1], "boxes": targets[1]["boxes"][:0], "labels": targets[1]["labels"][:0],
                  "polygon_edges": targets[1]["polygon_edges"][:0], "polygon_owner": targets[1]["polygon_owner"][:0]}
    losses = {}
    for levers, model in models.items():
        torch.manual_seed(5)  # the same sampler draws in both models
        losses[levers] = model(images, targets)
        sum(losses[levers].values()).backward()
    positives, rois = len(seen[False][0]), seen[True][0]
    assert 0 < positives < len(rois) and len(rois) % mask_branch.MASK_ROI_BUCKET == 0
    assert rois.is_contiguous(memory_format=torch.channels_last) and not seen[False][0].is_contiguous(
        memory_format=torch.channels_last)
    # channels_last kernels sum in another order: gradients up to 2.4e-4 of their largest element apart
    assert_trains_the_same(models[True], models[False], losses[True], losses[False], loss_rtol=1e-5, loss_atol=1e-7,
                           grad_rtol=1e-4, grad_atol_of_largest=1e-3)


def test_the_warm_up_meets_every_mask_bucket_and_trains_nothing():
    """The trainer's warm-up (engine.warm_up) under fast.Options.mask_roi_bucket runs the mask branch
    once at every bucket size a step can reach (here 3 images x 32 positives: 64 and 128), so no
    step of the run meets a size first; the weights stay as they were and no gradient is left."""
    from contextlib import nullcontext

    from object_detection.engine import warm_up

    speed = replace(Options.for_device("cpu"), mask_channels_last=True, channels_last=True, mask_roi_bucket=True)
    model = build_model(81, backbone_weights=None, min_size=64, max_size=96, rois_per_image=128,
                        recipe=RECIPES["reference"], speed=speed)
    before = copy.deepcopy(model.state_dict())
    sizes = []
    model.roi_heads.mask_head.register_forward_hook(
        lambda module, inputs, output: sizes.append((len(inputs[0]), module.training)))
    warm_up(model, nullcontext, batch=3, eval_batch=1, size=(64, 96), device=torch.device("cpu"))
    assert [n for n, training in sizes if training][-2:] == [64, 128]
    assert all(n % mask_branch.MASK_ROI_BUCKET == 0 for n, training in sizes if training)
    assert all(p.grad is None for p in model.parameters()) and model.training
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name


@pytest.mark.parametrize("lengths", [[3, 3, 3], [5, 0, 2], [0, 0], [1]])
def test_pad_rows_is_pad_sequence(lengths):
    """fast.sampler.pad_rows (a few operators for the batch) against torch's pad_sequence (a copy per
    row): boxes, labels and matches, rows of one length, of several, and empty ones."""
    from torch.nn.utils.rnn import pad_sequence

    from object_detection.fast.sampler import pad_rows

    g = torch.Generator().manual_seed(sum(lengths))
    for rows, value in (([torch.rand(n, 4, generator=g) for n in lengths], 0),
                        ([torch.randint(1, 81, (n,), generator=g) for n in lengths], -1),
                        ([torch.randint(-2, 9, (n,), generator=g) for n in lengths], -1)):
        want = pad_sequence(rows, batch_first=True, padding_value=value)
        got = pad_rows(rows, padding_value=value)
        assert got.dtype == want.dtype and got.shape == want.shape and torch.equal(got, want)


@pytest.mark.parametrize("shapes", [[(2, 5), (3, 5)], [(2, 5), (0, 3), (1, 7), (3, 1)], [(0, 4), (1, 2)]])
def test_pad_blocks_is_each_block_padded_then_concatenated(shapes):
    """fast.sampler.pad_blocks (the polygon targets' edges and owners of a batch) against F.pad per
    block and one cat: [instances, edges, 4] floats padded with zeros, [instances, edges] with -1."""
    import torch.nn.functional as F

    from object_detection.fast.sampler import pad_blocks

    g = torch.Generator().manual_seed(len(shapes))
    longest = max(length for _, length in shapes)
    edges = [torch.rand(n, length, 4, generator=g) for n, length in shapes]
    owner = [torch.randint(0, 3, (n, length), generator=g) for n, length in shapes]
    want = torch.cat([F.pad(e, (0, 0, 0, longest - e.shape[1])) for e in edges])
    assert torch.equal(pad_blocks(edges), want)
    want = torch.cat([F.pad(o, (0, longest - o.shape[1]), value=-1) for o in owner])
    got = pad_blocks(owner, padding_value=-1)
    assert got.dtype == want.dtype and torch.equal(got, want)
