"""What a scored series shows a person: the table, the score line, summary.json/.md and the plot."""
from __future__ import annotations

import io
import json
from dataclasses import asdict
from pathlib import Path

from mlperf.files import atomic_write
from mlperf.results.logs import RunLog
from mlperf.results.score import RunResult, Score
from object_detection.recipe import BENCHMARK, QUALITY_TARGETS


def format_table(runs: list[RunResult]) -> str:
    """The per-run table, as Markdown (readable as plain text too)."""
    def num(x, fmt):
        return format(x, fmt) if x is not None else "-"

    rows = ["| run | minutes | epochs | BBOX | SEGM | status | compliance |",
            "| ---: | ---: | ---: | ---: | ---: | --- | --- |"]
    for r in runs:
        compliance = {True: "pass", False: "FAIL", None: "-"}[r.compliant]
        status = r.status + (" (dropped)" if r.dropped else "")
        epochs = num(r.epochs, "g") if r.epochs is not None else "-"
        rows.append(f"| {r.index} | {num(r.minutes, '.2f')} | {epochs} | {num(r.bbox, '.4f')} | "
                    f"{num(r.segm, '.4f')} | {status} | {compliance} |")
    return "\n".join(rows)


def format_score(s: Score) -> str:
    rcp = f"\nRCP: {s.rcp}" if s.rcp else ""
    if s.minutes is None:
        return f"score: none: {s.note}{rcp}"
    return f"score: {s.minutes:.2f} minutes ({s.note}; runs {', '.join(map(str, s.used))}){rcp}"


def plot(parsed: dict[int, RunLog], path: Path, title: str, dropped: set[int] = frozenset()) -> None:
    """Eval accuracy against minutes since run_start, BBOX and SEGM side by side, each with its
    target: a colour per run, dropped runs grey and dashed, each run's first evaluation that met
    both targets marked, the y axis zoomed to where the runs approach and cross the targets, the
    legend outside the axes."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    targets = next((log.targets for log in parsed.values() if log.targets_from_log), QUALITY_TARGETS)
    runs = [(i, log) for i, log in sorted(parsed.items()) if log.evals and log.run_start_ms is not None]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), dpi=100, sharex=True)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for column, (ax, metric) in enumerate(zip(axes, ("BBOX", "SEGM"))):
        for n, (i, log) in enumerate(runs):
            xs = [(t - log.run_start_ms) / 60000 for t, *_ in log.evals]
            ys = [e[2 + column] for e in log.evals]
            style = dict(color="0.6", linestyle="--") if i in dropped else dict(color=colours[n % len(colours)])
            ax.plot(xs, ys, marker=".", label=f"run {i}" + (" (dropped)" if i in dropped else ""), **style)
            crossed = next((k for k, e in enumerate(log.evals)
                            if e[2] >= targets["BBOX"] and e[3] >= targets["SEGM"]), None)
            if crossed is not None:
                ax.plot(xs[crossed], ys[crossed], marker="*", markersize=13, color=style["color"],
                        markeredgecolor="black", linestyle="none")
        ax.axhline(targets[metric], color="black", linewidth=1, label=f"target {targets[metric]:g}")
        ax.set_ylim(*_zoom([e[2 + column] for _, log in runs for e in log.evals], targets[metric]))
        ax.set(title=f"{metric} (COCO mAP)", xlabel="minutes since run_start")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("eval accuracy")
    handles, labels = axes[0].get_legend_handles_labels()
    handles.append(plt.Line2D([], [], marker="*", markersize=11, color="white", markerfacecolor="0.5",
                              markeredgecolor="black"))
    labels.append("targets met")
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(0.86, 0.5), fontsize=8, frameon=False)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 0.85, 1))
    png = io.BytesIO()
    fig.savefig(png, format="png")
    plt.close(fig)
    atomic_write(path, png.getvalue())


def _zoom(values: list[float], target: float) -> tuple[float, float]:
    """The y band where runs approach and cross `target`: from about 60% of it (or the lowest late
    value, when runs end below that) to just above the best value."""
    if not values:
        return 0.0, max(target * 1.2, 1e-3)
    top = max(max(values), target) * 1.06
    late = sorted(values)[len(values) // 2:]  # the upper half: where the curves approach the target
    bottom = min(target * 0.6, min(late) * 0.95)
    return max(0.0, bottom), max(top, bottom + 1e-3)


# Said beside the model's name wherever a summary names it: a reader must not take a demo for MLPerf's.
_MODEL_NOTES = {"r50-fpn": " (MLPerf's Mask R-CNN R50-FPN)",
                "r18-fpn-slim": " (the CPU demo's small Mask R-CNN, not MLPerf's R50-FPN: open division only)"}


def model_line(model: str) -> str:
    return f"Model {model}{_MODEL_NOTES.get(model, '')}"


def write_summary(out_dir: Path, *, name: str, runs: list[RunResult], parsed: dict[int, RunLog],
                  sc: Score, ruleset: str, extra: dict | None = None) -> dict:
    """summary.json, summary.md and plot.png in out_dir; returns the summary mapping."""
    targets = next((log.targets for log in parsed.values() if log.targets_from_log), QUALITY_TARGETS)
    first = next(iter(parsed.values()), None)
    model = (first.model if first else None) or ""
    summary = {
        "name": name,
        "benchmark": BENCHMARK,
        "ruleset": ruleset,
        "division": first.submission.get("division", "") if first else "",
        "platform": first.submission.get("platform", "") if first else "",
        "model": model,
        "targets": targets,
        "score": asdict(sc),
        "runs": [asdict(r) for r in runs],
        **(extra or {}),
    }
    atomic_write(out_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    md = [f"# {BENCHMARK} result series `{name}`", "",
          f"Ruleset {ruleset}; quality targets BBOX {targets['BBOX']:g}, SEGM {targets['SEGM']:g}."
          + (f" {model_line(model)}." if model else ""), "",
          format_table(runs), "", format_score(sc), ""]
    reasons = [f"- run {r.index}: {r.reason}" + (f": {r.messages[0]}" if r.messages else "")
               for r in runs if r.dropped]
    if reasons:
        md += ["Dropped runs:", "", *reasons, ""]
    left_out = [f"- {line}" for line in skipped_lines(runs)]
    if left_out:
        md += ["Log lines left out:", "", *left_out, ""]
    md += ["![eval accuracy against time](plot.png)", ""]
    atomic_write(out_dir / "summary.md", "\n".join(md))
    plot(parsed, out_dir / "plot.png", f"{BENCHMARK} {name}: eval accuracy", {r.index for r in runs if r.dropped})
    return summary


SKIPPED_SHOWN = 3   # per run: a log of a thousand bad lines says so without a thousand lines


def skipped_lines(runs: list[RunResult]) -> list[str]:
    """One line per log line the reader left out (the first few of each run), and how many more."""
    out = []
    for r in runs:
        for what in r.skipped[:SKIPPED_SHOWN]:
            out.append(f"run {r.index}: {what}: left out")
        if len(r.skipped) > SKIPPED_SHOWN:
            out.append(f"run {r.index}: {len(r.skipped) - SKIPPED_SHOWN} more log lines left out")
    return out


def report(runs: list[RunResult], sc: Score, out_dir: Path, hint: str | None = None, model: str = "") -> None:
    print(format_table(runs))
    if model:
        print(model_line(model))
    for r in runs:
        if r.dropped:
            detail = f": {r.messages[0]}" if r.messages else ""
            print(f"run {r.index} dropped: {r.reason}{detail}")
    for line in skipped_lines(runs):
        print(line)
    if hint:
        print(hint)
    print(format_score(sc))
    print(f"summary: {out_dir / 'summary.md'}, {out_dir / 'summary.json'}, plot {out_dir / 'plot.png'}")
