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
    if s.minutes is None:
        return f"score: none: {s.note}"
    return f"score: {s.minutes:.2f} minutes ({s.note}; runs {', '.join(map(str, s.used))})"


def plot(parsed: dict[int, RunLog], path: Path, title: str) -> None:
    """Eval accuracy against minutes since run_start, a colour per run: BBOX solid, SEGM dashed, targets."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=100)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    targets = next((log.targets for log in parsed.values() if log.targets_from_log), QUALITY_TARGETS)
    for n, (i, log) in enumerate(sorted(parsed.items())):
        if not log.evals or log.run_start_ms is None:
            continue
        c = colours[n % len(colours)]
        xs = [(t - log.run_start_ms) / 60000 for t, *_ in log.evals]
        ax.plot(xs, [e[2] for e in log.evals], "-", color=c, marker=".", label=f"run {i} BBOX")
        ax.plot(xs, [e[3] for e in log.evals], "--", color=c, marker=".", label=f"run {i} SEGM")
    ax.axhline(targets["BBOX"], color="black", linestyle="-", linewidth=1,
               label=f"BBOX target {targets['BBOX']:g}")
    ax.axhline(targets["SEGM"], color="black", linestyle="--", linewidth=1,
               label=f"SEGM target {targets['SEGM']:g}")
    ax.set_xlabel("minutes since run_start")
    ax.set_ylabel("eval accuracy (COCO mAP)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="lower right")
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png")
    plt.close(fig)
    atomic_write(path, png.getvalue())


def write_summary(out_dir: Path, *, name: str, runs: list[RunResult], parsed: dict[int, RunLog],
                  sc: Score, ruleset: str, extra: dict | None = None) -> dict:
    """summary.json, summary.md and plot.png in out_dir; returns the summary mapping."""
    targets = next((log.targets for log in parsed.values() if log.targets_from_log), QUALITY_TARGETS)
    first = next(iter(parsed.values()), None)
    summary = {
        "name": name,
        "benchmark": BENCHMARK,
        "ruleset": ruleset,
        "division": first.submission.get("division", "") if first else "",
        "platform": first.submission.get("platform", "") if first else "",
        "targets": targets,
        "score": asdict(sc),
        "runs": [asdict(r) for r in runs],
        **(extra or {}),
    }
    atomic_write(out_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    md = [f"# {BENCHMARK} result series `{name}`", "",
          f"Ruleset {ruleset}; quality targets BBOX {targets['BBOX']:g}, SEGM {targets['SEGM']:g}.", "",
          format_table(runs), "", format_score(sc), ""]
    reasons = [f"- run {r.index}: {r.reason}" + (f": {r.messages[0]}" if r.messages else "")
               for r in runs if r.dropped]
    if reasons:
        md += ["Dropped runs:", "", *reasons, ""]
    md += ["![eval accuracy against time](plot.png)", ""]
    atomic_write(out_dir / "summary.md", "\n".join(md))
    plot(parsed, out_dir / "plot.png", f"{BENCHMARK} {name}: eval accuracy")
    return summary


def report(runs: list[RunResult], sc: Score, out_dir: Path) -> None:
    print(format_table(runs))
    for r in runs:
        if r.dropped:
            detail = f": {r.messages[0]}" if r.messages else ""
            print(f"run {r.index} dropped: {r.reason}{detail}")
    print(format_score(sc))
    print(f"summary: {out_dir / 'summary.md'}, {out_dir / 'summary.json'}, plot {out_dir / 'plot.png'}")
