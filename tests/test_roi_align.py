"""The one-kernel multi-scale RoIAlign (object_detection.fast.roi_align) computes torchvision's
roi_align: run as written by Triton's interpreter on the CPU (tests/support/roi_align_checks.py),
forward and backward, against torchvision's per-level roi_align on the same values. On the GPU
`python -m benchmarks.train_throughput --check` checks it again at COCO's sizes (check_roi_align)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT
from object_detection.fast import Options, options_for
from object_detection.model import build_model

pytest.importorskip("triton")


@pytest.fixture(scope="module")
def report() -> dict:
    proc = subprocess.run([sys.executable, "-m", "tests.support.roi_align_checks"], cwd=ROOT, timeout=600,
                          env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("case", ["4-float32-7-legacy", "4-float32-14-legacy", "3-float32-7-aligned",
                                  "1-float32-7-legacy", "4-float32-14-legacy-channels_last"])
def test_pools_and_backpropagates_as_torchvision_in_float32(report, case):
    """Every level, both pooler sizes, both alignments, RoIs beyond the map and degenerate ones: the
    same pooled values, bit for bit (same arithmetic in the same order), and the same gradients up to
    the order of the float32 atomic additions. Also with the pooled RoIs written channels_last (the
    mask pooler under fast.Options.mask_channels_last) and their gradient read in that layout."""
    got = report[case]
    assert got["forward"] == 0.0
    assert got["backward"] <= 1e-6 * got["grad_scale"] * 10
    assert got["dtype_kept"] and got["channels_last_grads"] and got["layout_asked"]


@pytest.mark.slow
def test_bf16_maps_pool_as_torchvision_pools_their_float32_values(report):
    """Under autocast torchvision pools the bf16 maps cast to float32; the kernel reads the same
    values and rounds only its output (half a bf16 ulp of values up to ~4) and its gradients."""
    got = report["4-bfloat16-7-legacy"]
    assert got["forward"] <= 2 ** -6
    assert got["backward"] <= 2 ** -7 * got["grad_scale"]
    assert got["dtype_kept"] and got["channels_last_grads"]


@pytest.mark.slow
def test_the_models_poolers_give_the_same_detections(report):
    got = report["model"]
    assert got["kinds"] == ["FusedRoIAlignSyncFreeRoIAlign"] * 2
    assert got["detections"] == [5, 5] and got["same_labels"]
    assert got["boxes"] == got["scores"] == got["masks"] == 0.0


@pytest.mark.slow
def test_no_rois_pool_to_an_empty_batch(report):
    assert report["empty_shape"] == [0, 8, 7, 7]


def test_heads_take_channels_last_maps_only_where_the_kernel_pools_them():
    """With the lever (the trainer's default on GPUs) the RoI heads get the channels_last maps as they
    are; without it (`--speed fast-without:roi_align`) they get contiguous ones, which torchvision's
    roi_align wants (fast.channels_last)."""
    def maps_seen(speed: Options):
        model = build_model(81, backbone_weights=None, min_size=96, max_size=128, speed=speed).eval()
        seen = []
        inner = model.roi_heads.box_roi_pool.forward
        model.roi_heads.box_roi_pool.forward = lambda x, *a: seen.append(x) or inner(x, *a)
        with torch.no_grad():
            model([torch.rand(3, 96, 128)])
        return list(seen[0].values())

    assert all(f.is_contiguous(memory_format=torch.channels_last) and not f.is_contiguous()
               for f in maps_seen(Options(channels_last=True, roi_align=True)))
    assert all(f.is_contiguous() for f in maps_seen(Options(channels_last=True, roi_align=False)))
    assert options_for("fast", "cuda").roi_align and not options_for("stock", "cuda").roi_align
    assert not options_for("fast-without:roi_align", "cuda").roi_align
