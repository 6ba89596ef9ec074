"""What the step benchmarks report beside their times: a model whose loss went non-finite times NaN
boxes, not training, so its ratio is withheld; the mask branch's RoIs per image say how much work
the timed steps did (on an H100 every model at a constant 0.01 diverged within ten steps and still
printed a rate: BENCHMARKS.md)."""
import math
import re

import pytest
import torch

from benchmarks.train_throughput import StepWork, learning_rates, print_table, synthetic_batch
from object_detection.model import build_model
from object_detection.recipe import CLOSED_PROFILE, PROFILES, RECIPES


def test_a_model_whose_loss_was_not_finite_gets_no_ratio(capsys):
    runs = [{"variant": "torchvision-bf16", "batch": 12, "img_per_s": 60.0, "losses_finite": True},
            {"variant": "ours", "batch": 12, "img_per_s": 150.0, "losses_finite": False},
            {"variant": "ours-other", "batch": 12, "img_per_s": 120.0, "losses_finite": True}]
    print_table(runs, "torchvision-bf16")
    assert math.isnan(runs[1]["ratio_vs_torchvision-bf16"]) and runs[2]["ratio_vs_torchvision-bf16"] == 2.0
    assert "a loss was not finite" in capsys.readouterr().out

    runs[0]["losses_finite"] = False  # a diverged baseline: no ratio for anyone
    print_table(runs, "torchvision-bf16")
    assert all(math.isnan(r["ratio_vs_torchvision-bf16"]) for r in runs)


def test_step_work_counts_the_mask_rois_and_finds_the_first_non_finite_loss():
    torch.manual_seed(0)
    model = build_model(81, backbone_weights=None, min_size=256, max_size=320, proposals_per_image=100,
                        rois_per_image=64, recipe=RECIPES["reference"]).train()
    images, targets = synthetic_batch(2, "cpu", seed=3, shapes="legacy")
    work = StepWork(model)
    for _ in range(2):
        work.add(sum(model([image.float() / 255 for image in images], targets).values()))
    work.add(torch.tensor(float("nan")))
    report = work.report(images_per_step=2)
    assert report["losses_finite"] is False and report["first_nonfinite_step"] == 2
    # every ground-truth box is among the positives the mask branch gets: at least that many RoIs
    assert report["mask_rois_per_image"] >= sum(len(t["boxes"]) for t in targets) / 2
    model(images=[image.float() / 255 for image in images], targets=targets)  # the hook is gone
    assert len(work.mask_rois) == 2


def test_the_benchmark_steps_at_the_closed_schedule_or_a_given_rate():
    assert learning_rates("schedule", 12) == PROFILES[CLOSED_PROFILE].schedule_for(12)
    constant = learning_rates("0.01", 12)
    assert constant.lr_of_step(0) == constant.lr_of_step(500) == 0.01
    with pytest.raises(SystemExit, match="--lr fast: give 'schedule' or a learning rate"):
        learning_rates("fast", 12)


def test_a_round_that_runs_out_of_memory_leaves_no_counter_on_the_model(monkeypatch):
    """The benchmark goes on to the next round after an out-of-memory step: StepWork's hook must be off
    the model then, or it would count that round's mask RoIs into a report of its own."""
    import benchmarks.train_throughput as bench

    model = build_model(81, backbone_weights=None, min_size=64, max_size=96, recipe=RECIPES["reference"])
    steps = []

    def step_until_memory_runs_out(*args):
        steps.append(1)
        if len(steps) > 1:  # the first timed step, after one warm-up step
            raise torch.OutOfMemoryError("CUDA out of memory")
        return torch.tensor(1.0), {}

    monkeypatch.setattr(bench, "train_step", step_until_memory_runs_out)
    batches = [synthetic_batch(1, "cpu", seed=0, shapes="legacy")]
    with pytest.raises(torch.OutOfMemoryError):
        bench.time_steps(model, None, batches, torch.device("cpu"), None, None, iterations=2, warmup=1)
    assert len(steps) == 2 and not model.roi_heads.mask_head._forward_hooks


def test_the_timeline_counts_overlapping_streams_once_and_charges_each_gap_to_its_neighbours():
    from benchmarks.profile_step import gpu_activity

    def kernel(name, ts, dur, cat="kernel"):
        return {"cat": cat, "name": name, "ts": ts, "dur": dur}

    events = [kernel("conv", 0, 100), kernel("copy", 50, 100, "gpu_memcpy"),  # two streams: busy 0-150
              {"cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": 10, "dur": 5},  # the host's: not the GPU's
              kernel("nms", 400, 50),            # idle 150-400 after the copy ended last
              kernel("tiny", 460, 5),            # a 10 µs launch gap: not a wait
              kernel("conv", 1000, 100)]         # idle 465-1000
    activity = gpu_activity(events)
    assert activity["span"] == 1100 and activity["busy"] == 150 + 50 + 5 + 100
    assert dict(activity["gaps"]) == {"copy -> nms": 250, "tiny -> conv": 535}
    assert activity["idle_in_gaps"] == 785 and activity["kernels"]["conv"] == 200


def test_elementwise_operators_are_charged_to_the_code_that_ran_them():
    """profile_step --sources: an operator in the forward is charged to the project's line that ran it,
    one in the backward to the autograd function (here a real CPU profile of fast.bias_act)."""
    from torch.profiler import ProfilerActivity, profile

    from benchmarks.profile_step import op_sources
    from object_detection.fast.bias_act import bias_act

    x = torch.randn(2, 4, 5, 5, requires_grad=True)
    with profile(activities=[ProfilerActivity.CPU], with_stack=True) as prof:
        (bias_act(x, torch.randn(4), torch.randn(2, 4, 5, 5)) * 3).sum().backward()
    rows = op_sources(prof.events(), ("aten::add", "aten::mul"), lambda e: e.cpu_time_total)
    charged = {(name, re.sub(r"\(\d+\)", "", source)): calls for name, source, calls, _ in rows}  # no line numbers
    assert charged == {("aten::add", "object_detection/fast/bias_act.py: forward"): 2,  # the bias, the residual
                       ("aten::mul", "backward of MulBackward0"): 1,
                       ("aten::mul", "elsewhere"): 1}  # the test's own line: neither ours nor torchvision's


def test_without_python_stacks_operators_are_charged_to_the_module_that_ran_them():
    """Where the profiler records no Python stacks (Python 3.12 with torch 2.11 on the GPU machine),
    profile_step --sources charges a forward operator to the innermost module running it, labelled
    by labelled_modules, and still a backward one to its autograd function."""
    from torch.profiler import ProfilerActivity, profile

    from benchmarks.profile_step import labelled_modules, op_sources

    class Affine(torch.nn.Module):
        def forward(self, x):
            return x * 2 + 1

    model = torch.nn.Sequential(Affine(), torch.nn.ReLU())
    x = torch.randn(3, 4, requires_grad=True)
    with profile(activities=[ProfilerActivity.CPU]) as prof, labelled_modules(model):
        model(x).sum().backward()
    model(x)  # the hooks are gone: a forward after the profile is not labelled
    rows = op_sources(prof.events(), ("aten::add", "aten::mul", "aten::relu"), lambda e: e.cpu_time_total)
    charged = {(name, source): calls for name, source, calls, _ in rows}
    assert charged == {("aten::mul", "module: 0 (Affine)"): 1, ("aten::add", "module: 0 (Affine)"): 1,
                       ("aten::relu", "module: 1 (ReLU)"): 1, ("aten::mul", "backward of MulBackward0"): 1}
    assert not model._forward_hooks and not model[0]._forward_pre_hooks


def test_mixed_layouts_flags_operands_of_different_layouts_or_dtypes():
    """benchmarks.layouts (profile_step --layouts): a channels_last map plus a contiguous one, or plus a
    map of another dtype, is flagged with its operands (output last); two channels_last maps are not."""
    from benchmarks.layouts import mixed_layouts

    nhwc = torch.randn(2, 4, 5, 6).to(memory_format=torch.channels_last)
    nchw, half = torch.randn(2, 4, 5, 6), nhwc.bfloat16()
    rows = mixed_layouts(lambda: (nhwc + nchw, nhwc + nhwc, nhwc.add_(half)))
    assert rows == [("add", (2, 4, 5, 6), "nhwc:float32 nchw:float32 nhwc:float32", 1, 3 * 240 * 4),
                    ("add_", (2, 4, 5, 6), "nhwc:float32 nhwc:bfloat16 nhwc:float32", 1, 2 * 240 * 4 + 240 * 2)]
