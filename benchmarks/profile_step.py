"""Where a training step's time goes: per-stage wall time (synchronised) and the top operators.

    python -m benchmarks.profile_step --batch 16
    python -m benchmarks.profile_step --batch 16 --syncs [--tvsync]   # host waits per step, by code site
    python -m benchmarks.profile_step --batch 12 --timeline   # free-running steps: the GPU's busy and idle time
    python -m benchmarks.profile_step --batch 12 --layouts    # sums and copies on mixed layouts or dtypes
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import itertools
import json
import tempfile
import time
from pathlib import Path

import torch

from benchmarks import calibrated_backbones
from benchmarks.train_throughput import (SWITCHED_LEVERS, StepWork, learning_rates, our_model, pinned, synthetic_batch,
                                         warm_as_the_trainer, with_polygons)
from object_detection.engine import make_optimizer, set_lr, to_device


def parse_args():
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--syncs", action="store_true", help="count host synchronisations per step, by site")
    p.add_argument("--timeline", action="store_true",
                   help="free-running steps (no synchronisation): how much of a step the GPU is busy, the idle gaps "
                        "by the kernels around them, and the kernels by GPU time")
    p.add_argument("--layouts", action="store_true",
                   help="the elementwise operators of one step whose operands differ in memory layout or dtype "
                        "(the unvectorised kernels), by shape (benchmarks.layouts)")
    p.add_argument("--shapes", action="store_true", help="also list the heaviest elementwise operators by input shape")
    p.add_argument("--sources", action="store_true",
                   help="also list the elementwise operators' GPU time by where they come from (the model's code "
                        "line in the forward, the autograd function in the backward)")
    p.add_argument("--tvsync", action="store_true", help="torchvision's heads (no object_detection.fast.sync_free)")
    p.add_argument("--nofuse", action="store_true", help="biases added separately (no object_detection.fast.fuse_bias)")
    p.add_argument("--roialign", action="store_true",
                   help="multi-scale RoIAlign in one kernel (object_detection.fast.roi_align)")
    p.add_argument("--padheads", action="store_true", help="proposals and samples at fixed sizes (fast.Options.padded_heads)")
    p.add_argument("--nmsscan", action="store_true", help="NMS without host waits (fast.Options.nms_scan)")
    p.add_argument("--graphs", action="store_true",
                   help="backbone, FPN and RPN head as CUDA graphs on the fixed canvas (fast.Options.cuda_graphs)")
    for suffix, (lever, what) in SWITCHED_LEVERS.items():
        p.add_argument(f"--{suffix}", action="store_true", help=f"{what} (fast.Options.{lever})")
    p.add_argument("--recipe", choices=["reference", "torchvision"], default="reference",
                   help="the closed profile's model (reference) or the open profiles' (torchvision)")
    p.add_argument("--calibrate-on", type=Path, metavar="DIR",
                   help="the random backbone's BatchNorm statistics from 16 JPEGs of DIR (as the trainer's on a "
                        "set), not from random pixels: the weights decide the heads' work (BENCHMARKS.md)")
    return p.parse_args()


def model_and_batches(args, device) -> tuple[torch.nn.Module, list]:
    """The model the flags name, warmed as the trainer warms it, and two pinned synthetic batches."""
    reference_weights, backbone = calibrated_backbones(args.calibrate_on)
    model = our_model(device, backbone, channels_last="rpn", sync_free=not args.tvsync, fuse_bias=not args.nofuse,
                      recipe=args.recipe, roi_align=args.roialign, padded_heads=args.padheads,
                      nms_scan=args.nmsscan or args.padheads, cuda_graphs=args.graphs,
                      reference_weights=reference_weights,
                      levers=tuple(lever for suffix, (lever, _) in SWITCHED_LEVERS.items() if getattr(args, suffix)))
    warm_as_the_trainer(model, args.batch, torch.bfloat16)
    batches = [synthetic_batch(args.batch, "cpu", seed=s) for s in range(2)]
    if args.polys:  # the closed profile's targets, as its trainer gets them
        batches = [(images, with_polygons(targets)) for images, targets in batches]
    return model, [pinned(b) for b in batches]


def main() -> None:
    args = parse_args()
    device = torch.device("cuda")
    model, batches = model_and_batches(args, device)
    opt = make_optimizer(model, 0.01, fused=True)
    schedule, steps_done = learning_rates("schedule", args.batch), itertools.count()  # as train_throughput's steps

    stages, synchronised = {}, [True]

    def timed(name, fn):
        def wrapper(*a, **k):
            if not synchronised[0]:
                return fn(*a, **k)
            torch.cuda.synchronize()
            t = time.perf_counter()
            out = fn(*a, **k)
            torch.cuda.synchronize()
            stages[name] = stages.get(name, 0) + time.perf_counter() - t
            return out
        return wrapper

    model.transform.forward = timed("transform", model.transform.forward)
    model.backbone.forward = timed("backbone+fpn", model.backbone.forward)
    model.rpn.forward = timed("rpn", model.rpn.forward)
    model.roi_heads.forward = timed("roi_heads", model.roi_heads.forward)

    def step(i):
        set_lr(opt, schedule, next(steps_done))
        images, targets = to_device(*batches[i % 2], device)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = sum(model(images, targets).values())
        opt.zero_grad(set_to_none=True)
        if not synchronised[0]:
            loss.backward()
            opt.step()
            return loss
        torch.cuda.synchronize()
        t = time.perf_counter()
        loss.backward()
        torch.cuda.synchronize()
        stages["backward"] = stages.get("backward", 0) + time.perf_counter() - t
        t = time.perf_counter()
        opt.step()
        torch.cuda.synchronize()
        stages["optimizer"] = stages.get("optimizer", 0) + time.perf_counter() - t
        return loss

    for i in range(3):
        step(i)
    if args.syncs:
        count_syncs(lambda: step(0))
        return
    if args.timeline:
        synchronised[0] = False
        gpu_timeline(step, args.steps, args.batch)
    else:
        timed_stages(step, args, stages, model)
    if args.layouts:  # last: one run with it before the timings had the NMS's compiled function run eagerly
        from benchmarks.layouts import print_mixed_layouts

        print_mixed_layouts(lambda: step(0))


def timed_stages(step, args, stages: dict, model) -> None:
    """Synchronised steps: the step's time by stage, then the operator tables."""
    stages.clear()
    work = StepWork(model)
    t0 = time.perf_counter()
    for i in range(args.steps):
        work.add(step(i))
    total = time.perf_counter() - t0
    print(f"batch {args.batch}: {total / args.steps * 1000:.1f} ms/step (synchronised stages); {work.report(args.batch)}")
    for k, v in stages.items():
        print(f"  {k:<14} {v / args.steps * 1000:8.1f} ms")

    operator_tables(step, args.shapes, args.sources, model)


ELEMENTWISE = ("aten::add_", "aten::copy_", "aten::add", "aten::mul", "aten::clamp_min_", "aten::fill_")


def operator_tables(step, shapes: bool, sources: bool = False, model: torch.nn.Module | None = None) -> None:
    """Three steps under the profiler: the operators by host time and by GPU time (with `shapes`,
    first the heaviest elementwise operators by the tensors they work on; with `sources`, by where
    they come from, `model`'s modules labelled for it)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=shapes,
                 with_stack=sources) as prof, labelled_modules(model if sources else None):
        for i in range(3):
            step(i)
    if sources:
        for name, source, calls, total in op_sources(prof.events(), ELEMENTWISE, lambda e: e.device_time_total)[:30]:
            print(f"{name:<18} {calls / 3:6.1f} calls {total / 3 / 1000:7.2f} ms a step  {source}")
    if shapes:
        rows = [e for e in prof.key_averages(group_by_input_shape=True)
                if e.key in ELEMENTWISE]
        rows.sort(key=lambda e: -e.device_time_total)
        for e in rows[:30]:
            print(f"{e.key:<18} {e.count:5d} calls {e.device_time_total / 1000:8.2f} ms  {e.input_shapes}")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=50))
    print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=30, max_name_column_width=70))


def gpu_timeline(step, steps: int, batch: int) -> None:
    """Steps as the trainer runs them (no synchronisation but the model's own), timed once plainly and
    once under the profiler recording only the GPU's activity: the share of the step the GPU is busy
    (the union of its kernels and copies), its idle gaps summed by the kernels before and after them
    (a host wait, or the host launching slower than the GPU runs, shows as a gap), and the kernels by
    GPU time. The profiler slows the host a little, so its wall time is printed beside the plain one."""
    from torch.profiler import ProfilerActivity, profile

    def run() -> float:
        torch.cuda.synchronize()
        t = time.perf_counter()
        for i in range(steps):
            step(i)
        torch.cuda.synchronize()
        return (time.perf_counter() - t) / steps * 1000

    plain = run()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        profiled = run()
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        activity = gpu_activity(json.loads(Path(f.name).read_text())["traceEvents"])
    per_step = {k: v / steps / 1000 for k, v in activity.items() if isinstance(v, float)}  # µs in all -> ms a step
    print(f"batch {batch}: {plain:.1f} ms/step free-running ({batch / plain * 1000:.1f} img/s); profiled "
          f"{profiled:.1f} ms/step, the GPU busy {per_step['busy']:.1f} ms of {per_step['span']:.1f} ms per step "
          f"({per_step['busy'] / per_step['span']:.0%}); idle in gaps over {GAP_US} us: {per_step['idle_in_gaps']:.1f} ms")
    print("largest idle gaps per step (summed by the kernels around them):")
    for site, us in activity["gaps"].most_common(25):
        print(f"  {us / steps / 1000:7.2f} ms  {site}")
    print("kernels by GPU time per step:")
    for name, us in activity["kernels"].most_common(30):
        print(f"  {us / steps / 1000:7.2f} ms  {name}")


def op_sources(events, names, time_of) -> list[tuple[str, str, int, float]]:
    """The profiled operators named `names`, summed by (name, source): in the backward the autograd
    function that ran them, else the innermost frame of the project's or torchvision's code in
    their Python stack (profile(with_stack=True)); heaviest first, as (name, source, calls, time)."""
    totals: dict[tuple[str, str], list] = {}
    for event in events:
        if event.name in names:
            entry = totals.setdefault((event.name, _source(event)), [0, 0.0])
            entry[0] += 1
            entry[1] += time_of(event)
    return sorted(((n, s, c, t) for (n, s), (c, t) in totals.items()), key=lambda row: -row[3])


MODULE_LABEL = "module: "


@contextlib.contextmanager
def labelled_modules(model: torch.nn.Module | None):
    """Each module's forward inside a profiler range named MODULE_LABEL + its name and class, so that
    operators are charged to the module that ran them where the profiler records no Python stacks
    (seen with Python 3.12 and torch 2.11 on the GPU machine)."""
    if model is None:
        yield
        return
    from torch.autograd.profiler import record_function

    open_ranges, handles = [], []
    for name, module in model.named_modules():
        label = f"{MODULE_LABEL}{name or 'model'} ({type(module).__name__})"
        handles.append(module.register_forward_pre_hook(
            lambda _m, _a, label=label: open_ranges.append(record_function(label).__enter__())))
        handles.append(module.register_forward_hook(lambda *_: open_ranges.pop().__exit__(None, None, None)))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _source(event) -> str:
    """The nearest enclosing autograd function, or else Python frame of ours or torchvision's (the
    profiler records Python calls as enclosing events; older versions as each operator's `stack`),
    or else labelled module (labelled_modules)."""
    frames = [f for f in event.stack or [] if _ours(f)]
    parent, module = event.cpu_parent, None
    while parent is not None:
        if parent.name.startswith("autograd::engine::evaluate_function: "):
            return "backward of " + parent.name.split(": ", 1)[1]
        if _ours(parent.name) and not frames:
            return parent.name
        if parent.name.startswith(MODULE_LABEL) and module is None:
            module = parent.name
        parent = parent.cpu_parent
    return frames[0] if frames else module or "elsewhere"


def _ours(frame: str) -> bool:
    return ".py(" in frame and ("object_detection/" in frame or "torchvision/" in frame)


GAP_US = 20  # a launch's own latency is below this: a longer gap is the GPU waiting for the host


def gpu_activity(trace_events: list[dict]) -> dict:
    """From a chrome trace's events: the time (µs) from the first kernel or copy to the end of the last
    (`span`), the time the GPU did any of them (`busy`: their union, streams overlapping counted once),
    the idle gaps longer than GAP_US summed by the work before and after them (`gaps`, `idle_in_gaps`)
    and each kernel's total time (`kernels`)."""
    work = sorted((e["ts"], e["ts"] + e["dur"], e["name"]) for e in trace_events
                  if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in e)
    busy, gaps, kernels = 0.0, collections.Counter(), collections.Counter()
    end, before = work[0][0], work[0][2]
    for start, stop, name in work:
        kernels[name[:90]] += stop - start
        if start - end > GAP_US:
            gaps[f"{before[:45]} -> {name[:45]}"] += start - end
        busy += max(0.0, stop - max(start, end))
        if stop > end:
            end, before = stop, name
    return {"span": float(end - work[0][0]), "busy": float(busy), "idle_in_gaps": float(sum(gaps.values())),
            "gaps": gaps, "kernels": kernels}


def count_syncs(step) -> None:
    """One step under torch.cuda.set_sync_debug_mode("warn"): every operation that makes the host
    wait for the GPU warns; each is charged to the innermost torchvision/object_detection frame."""
    import collections
    import traceback
    import warnings

    sites: collections.Counter = collections.Counter()

    def record(message, category, filename, lineno, file=None, line=None):
        ours = [f for f in traceback.extract_stack()[:-1]
                if "torchvision" in f.filename or "object_detection" in f.filename]
        f = ours[-1] if ours else None
        site = f"{f.filename.split('site-packages/')[-1]}:{f.lineno} {f.name}" if f else f"{filename}:{lineno}"
        sites[site] += 1

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    print(f"host synchronisations in one step: {sum(sites.values())}")
    for site, n in sites.most_common():
        print(f"  {n:5d}  {site}")


if __name__ == "__main__":
    main()
