"""`invoke compare`: a result beside published results (or any other logs), and where the time went.

Each side is a folder of result logs scored by the project's scorer (a series keeps the compliance
verdicts `invoke time` recorded; other logs are not checked again: published ones passed review).
Its runs are cut into the parts of the scored time, run_start to run_stop:

    startup    run_start to the first epoch's start
    training   the epochs themselves (epoch_start to epoch_stop; block_start/stop where a log has no epochs)
    the rest   evaluation the training did not hide, and any gap between epochs

averaged over the runs the score averages, so that their sum is the score. The difference of two
scores is then split exactly: convergence (more or fewer epochs, at the mean cost of an epoch on
both sides), training speed (epoch time), evaluation (exposed time per epoch), each at the mean
epoch count of both sides, and init (startup). The four add up to the difference of the scores.
"""
from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from mlperf.errors import UserError
from mlperf.files import atomic_write, read_json, shown
from mlperf.results import catalog
from mlperf.results.logs import RunLog, parse_log, records, result_files
from mlperf.results.score import Score, run_result, score
from object_detection.recipe import BENCHMARK

# COCO train2017 images with annotations: what a closed-division epoch trains on. Logs are not taken at
# their word here: NVIDIA's v3.0 logs say train_samples 40000, with 117266 images per epoch at their rate.
CLOSED_EPOCH_IMAGES = 117266
PARTS = ("convergence (epochs)", "training speed", "evaluation", "init (run_start to first epoch)")


@dataclass
class RunParts:
    """One run's scored time cut into parts (minutes), and what a reader compares."""
    index: int
    minutes: float
    init: float | None              # init_start to run_start: before the clock, not in the score
    startup: float                  # run_start to the first epoch
    training: float                 # inside epochs
    epochs: float                   # epochs trained
    converged: float | None         # epoch whose evaluation met the targets
    images_per_epoch: int | None

    @property
    def rest(self) -> float:
        return self.minutes - self.startup - self.training


@dataclass
class Side:
    """One column of the comparison: a scored folder of logs."""
    label: str
    where: str
    accelerator: str
    accelerators: int | None
    parsed: dict[int, RunLog]
    runs: dict[int, RunParts]
    sc: Score
    note: str = ""
    extra: dict = field(default_factory=dict)

    def mean(self, attr: str) -> float | None:
        values = [getattr(self.runs[i], attr) for i in self.sc.used]
        values = [v for v in values if v is not None]
        return sum(values) / len(values) if values else None

    @property
    def score(self) -> float:
        return self.sc.minutes

    @property
    def epoch_minutes(self) -> float:
        return self.mean("training") / self.mean("epochs")

    @property
    def eval_minutes(self) -> float:
        """Evaluation (and gaps) not hidden behind training, per epoch."""
        return self.mean("rest") / self.mean("epochs")

    def rate(self, per_accelerator: bool = False) -> float | None:
        images = self.mean("images_per_epoch")
        if images is None:
            return None
        total = images / (self.epoch_minutes * 60)
        if per_accelerator:
            return total / self.accelerators if self.accelerators else None
        return total


def run_parts(index: int, log: RunLog) -> RunParts:
    """The parts of one run's time, from its records (epochs, else blocks, as the log has them)."""
    init_start = None
    spans: dict[str, list[float]] = {"epoch": [], "block": []}
    counts: dict[str, float] = {"epoch": 0, "block": 0}
    first: dict[str, float | None] = {"epoch": None, "block": None}
    open_at: dict[str, float | None] = {"epoch": None, "block": None}
    images = None
    for _, rec in records(Path(log.path)):
        key, t, meta = rec.get("key"), rec.get("time_ms"), rec.get("metadata")
        meta = meta if isinstance(meta, dict) else {}
        if not _finite(t):
            continue
        if key == "init_start" and init_start is None:
            init_start = t
        elif key == "train_samples" and _finite(rec.get("value")):
            images = int(rec["value"])
        kind, _, edge = str(key).partition("_")
        if kind in spans and edge == "start" and (log.run_start_ms is None or t >= log.run_start_ms):
            open_at[kind] = t
            first[kind] = t if first[kind] is None else first[kind]
        elif kind in spans and edge == "stop" and open_at[kind] is not None:
            spans[kind].append(t - open_at[kind])
            counts[kind] += meta["epoch_count"] if kind == "block" and _finite(meta.get("epoch_count")) else 1
            open_at[kind] = None
    kind = "epoch" if spans["epoch"] else "block"
    if str(log.submission.get("division", "")).lower() == "closed":
        images = CLOSED_EPOCH_IMAGES
    start = log.run_start_ms
    begin = first[kind] if first[kind] is not None else log.run_stop_ms
    return RunParts(index=index, minutes=log.minutes, init=None if init_start is None else (start - init_start) / 60000,
                    startup=(begin - start) / 60000, training=sum(spans[kind]) / 60000, epochs=counts[kind],
                    converged=log.converged_epoch, images_per_epoch=images)


def _finite(value) -> bool:
    """A JSON number a duration can be made of (bools, NaN and infinities are not)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def side_of(folder: Path, label: str, *, accelerator: str = "", accelerators: int | None = None,
            verdicts: dict | None = None, note: str = "") -> Side:
    """Parse and score a folder of result_*.txt as one side; bad logs are one UserError each."""
    logs = result_files(folder)
    if not logs:
        raise UserError(f"no result_*.txt in {folder}: give a folder of MLPerf {BENCHMARK} result logs")
    parsed = {}
    for i, path in logs.items():
        parsed[i] = parse_log(path)
        if parsed[i].run_start_ms is None and not parsed[i].evals and not parsed[i].submission:
            raise UserError(f"{path} holds no MLPerf log records (:::MLLOG lines): it is not a result log")
    other = sorted({str(log.benchmark) for log in parsed.values() if log.benchmark not in (None, BENCHMARK)})
    if other:
        raise UserError(f"{folder} holds logs of another benchmark (submission_benchmark {', '.join(map(shown, other))}),"
                        f" not {BENCHMARK}: compare {BENCHMARK} results only")
    results = [run_result(i, log, (verdicts or {}).get(i)) for i, log in parsed.items()]
    sc = score(results)
    if sc.minutes is None:
        raise UserError(f"{label} has no score ({sc.note}): there is nothing to compare; see `invoke time --from-logs {folder}`")
    runs = {r.index: run_parts(r.index, parsed[r.index]) for r in results if not r.dropped}
    if not all(runs[i].epochs for i in sc.used):
        raise UserError(f"{folder}: a scored run has no epoch_start/epoch_stop (or block) records: its time cannot "
                        "be cut into epochs, so it cannot be compared")
    return Side(label, str(folder), accelerator, accelerators, parsed, runs, sc, note)


def breakdown(a: Side, b: Side) -> dict[str, float]:
    """a's score minus b's, in minutes, split into PARTS that add up to it exactly."""
    na, nb = a.mean("epochs"), b.mean("epochs")
    ua, ub = a.epoch_minutes + a.eval_minutes, b.epoch_minutes + b.eval_minutes
    return dict(zip(PARTS, ((na - nb) * (ua + ub) / 2, (a.epoch_minutes - b.epoch_minutes) * (na + nb) / 2,
                            (a.eval_minutes - b.eval_minutes) * (na + nb) / 2, a.mean("startup") - b.mean("startup"))))


# --- where the sides come from -----------------------------------------------------------------------


def _count(value) -> int | None:
    try:
        return int(str(value).strip())
    except ValueError:
        return None


def _hardware(desc: dict) -> tuple[str, int | None]:
    per_node, nodes = _count(desc.get("accelerators_per_node", "")), _count(desc.get("number_of_nodes", "")) or 1
    return str(desc.get("accelerator_model_name") or ""), None if per_node is None else per_node * nodes


def series_side(results_dir: Path, name: str) -> tuple[Side, Path]:
    """A series of `invoke time`, scored with the compliance verdicts it recorded; and its folder."""
    from mlperf.files import UnsafeName, plain_name
    from mlperf.results.series import read_settings

    try:
        plain_name(name, "--series")
    except UnsafeName as bad:
        raise UserError(f"{bad}: give the name of a series under --results-dir") from None
    root = Path(results_dir) / name
    if not (root / "series.json").is_file():
        raise UserError(f"{root} is not a result series (no series.json): give a --series name under --results-dir, "
                        "or a folder of logs with --from-logs")
    settings = read_settings(root / "series.json")
    logs = root / "results" / settings["system"] / BENCHMARK
    summary = read_json(root / "summary.json")
    verdicts = {r["index"]: (r["compliant"], r.get("messages") or []) for r in summary.get("runs", [])
                if isinstance(r, dict) and r.get("compliant") is not None}
    model, count = _hardware(read_json(root / "systems" / f"{settings['system']}.json"))
    return side_of(logs, f"yours: {name}", accelerator=model, accelerators=count, verdicts=verdicts), root


def folder_side(folder: Path) -> Side:
    """Logs in a folder (a published result's, an earlier series'); the hardware from a system
    description beside them or where a submission tree keeps it (<org>/systems/<system>.json)."""
    from mlperf.results.series import find_logs_folder

    folder = find_logs_folder(Path(folder))
    system = folder.parent.name if folder.name == BENCHMARK else folder.name
    desc = {}
    for candidate in (folder / "system_desc.json", folder.parent.parent.parent / "systems" / f"{system}.json"):
        if candidate.is_file() and (desc := read_json(candidate)):
            break
    model, count = _hardware(desc)
    name = folder.name if folder.name != BENCHMARK else f"{folder.parent.name}-{BENCHMARK}"
    return side_of(folder, name, accelerator=model, accelerators=count,
                   note="compliance not checked again here (`invoke time --from-logs` does)")


def published_side(item: dict, data_dir: Path, mirror: str | None, source: Path | None) -> Side:
    folder = catalog.fetch_logs(item, data_dir, mirror=mirror, source=source)
    return side_of(folder, item["id"], accelerator=item["accelerator"], accelerators=item["accelerators"],
                   note=f"published in {item['repository']}; compliance checked at review")


def others(with_: list[str], mine: Side, data_dir: Path, mirror: str | None, source: Path | None) -> list[Side]:
    """The sides to compare with: each --with (a folder, else a catalog id), or by default the
    published results of the same accelerator and count (then the nearest count). Every id is
    checked before anything is downloaded."""
    entries = catalog.load()
    if not with_:
        picked = catalog.pick(mine.accelerator, mine.accelerators or 0, entries)
        if not picked:
            raise UserError(f"no published result ran on {shown(mine.accelerator or 'no accelerator')}: pass --with ID "
                            "(see `invoke compare --catalog`) or --with FOLDER")
        print(f"compare: with the published results of {picked[0]['accelerators']}x {picked[0]['accelerator']}: "
              + ", ".join(e["id"] for e in picked))
        with_ = [e["id"] for e in picked]
    wanted = [("folder", Path(w)) if Path(w).is_dir() else ("id", catalog.entry(w, entries)) for w in with_]
    return [folder_side(what) if kind == "folder" else published_side(what, data_dir, mirror, source)
            for kind, what in wanted]


# --- what a person reads -----------------------------------------------------------------------------


def _num(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def rows(sides: list[Side]) -> list[tuple[str, list[str]]]:
    """(metric, one cell per side): the means over each side's scored runs."""
    def hardware(s: Side) -> str:
        if not s.accelerators:
            return f"no accelerator ({s.parsed[min(s.parsed)].submission.get('platform') or 'CPU'})"
        return f"{s.accelerators}x {s.accelerator or '?'}"

    return [
        ("hardware", [hardware(s) for s in sides]),
        ("time to train (score), min", [f"{s.score:.2f}" for s in sides]),
        ("runs scored", [f"{len(s.sc.used)} of {len(s.parsed)}" for s in sides]),
        ("init before run_start, min (not scored)", [_num(s.mean("init"), ".2f") for s in sides]),
        ("startup after run_start, min", [_num(s.mean("startup"), ".2f") for s in sides]),
        ("epochs to converge", [_num(s.mean("converged"), ".1f") for s in sides]),
        ("epochs trained", [_num(s.mean("epochs"), ".1f") for s in sides]),
        ("mean epoch time, s", [f"{s.epoch_minutes * 60:.1f}" for s in sides]),
        ("training rate, images/s", [_num(s.rate(), ".1f") for s in sides]),
        ("per accelerator, images/s", [_num(s.rate(True), ".1f") for s in sides]),
        ("evaluation exposed per epoch, s", [f"{s.eval_minutes * 60:.1f}" for s in sides]),
    ]


def format_table(sides: list[Side]) -> str:
    table = [("", [s.label for s in sides]), *rows(sides)]
    first = max(len(name) for name, _ in table)
    widths = [max(len(cells[k]) for _, cells in table) for k in range(len(sides))]
    return "\n".join(f"{name:<{first}}  " + "  ".join(f"{c:>{w}}" for c, w in zip(cells, widths)) for name, cells in table)


def format_breakdown(a: Side, b: Side) -> str:
    parts = breakdown(a, b)
    diff = a.score - b.score
    verdict = "the same" if abs(diff) < 0.005 else ("slower" if diff > 0 else "faster")
    lines = [f"{a.label} vs {b.label}: {diff:+.2f} min ({verdict}; {a.score:.2f} vs {b.score:.2f})"]
    width = max(map(len, PARTS))
    lines += [f"  {name:<{width}}  {value:+8.2f} min" for name, value in parts.items()]
    lines.append(f"  {'sum':<{width}}  {sum(parts.values()):+8.2f} min")
    ta, tb = (s.parsed[min(s.parsed)].targets for s in (a, b))
    if ta != tb:
        lines.append(f"  note: the targets differ (BBOX {ta['BBOX']:g}, SEGM {ta['SEGM']:g} against BBOX {tb['BBOX']:g}, "
                     f"SEGM {tb['SEGM']:g}): the epochs to converge are to different goals")
    return "\n".join(lines)


def markdown(sides: list[Side], title: str) -> str:
    header = ["metric", *[s.label for s in sides]]
    md = [f"# {title}", "", "Means over the runs each score averages.", "",
          "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join([name, *cells]) + " |" for name, cells in rows(sides)]
    md += ["", "## Where the difference comes from (minutes)", "",
           "Convergence: the difference in epochs at the mean cost of an epoch (training and exposed evaluation) of both "
           "sides; training speed and evaluation: the difference per epoch at the mean epoch count of both; init: the "
           "difference in time from run_start to the first epoch. They add up to the difference of the scores.", ""]
    for other in sides[1:]:
        md += ["```", format_breakdown(sides[0], other), "```", ""]
    md += ["![eval accuracy against time](compare.png)", "", "## Each run", ""]
    for s in sides:
        md += [f"### {s.label}", "", f"{s.where}" + (f"; {s.note}" if s.note else ""), "",
               "| run | minutes | init | startup | epochs | converged at | epoch s | exposed eval s/epoch | scored |",
               "|---|---|---|---|---|---|---|---|---|"]
        for i, r in sorted(s.runs.items()):
            md.append(f"| {i} | {r.minutes:.2f} | {_num(r.init, '.2f')} | {r.startup:.2f} | {r.epochs:g} | "
                      f"{_num(r.converged, 'g')} | {_num(r.training / r.epochs * 60 if r.epochs else None, '.1f')} | "
                      f"{_num(r.rest / r.epochs * 60 if r.epochs else None, '.1f')} | {'yes' if i in s.sc.used else 'no'} |")
        md.append("")
    return "\n".join(md)


def plot(sides: list[Side], title: str) -> bytes:
    """Eval accuracy against minutes since run_start, BBOX and SEGM side by side: a colour per side,
    each scored run a line, each side's targets dashed in its colour (one black line where all share them)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), dpi=100, sharex=True)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    shared = len({tuple(sorted(s.parsed[min(s.parsed)].targets.items())) for s in sides}) == 1
    for column, (ax, metric) in enumerate(zip(axes, ("BBOX", "SEGM"))):
        top = 0.0
        for n, s in enumerate(sides):
            colour = colours[n % len(colours)]
            for k, i in enumerate(s.sc.used):
                log = s.parsed[i]
                xs = [(t - log.run_start_ms) / 60000 for t, *_ in log.evals]
                ys = [e[2 + column] for e in log.evals]
                top = max([top, *ys])
                ax.plot(xs, ys, color=colour, marker=".", linewidth=1.2, alpha=0.85,
                        label=f"{s.label} ({s.score:.2f} min)" if k == 0 else None)
            targets = s.parsed[min(s.parsed)].targets
            target = targets[metric]
            if not shared or n == 0:
                named = f"targets (BBOX {targets['BBOX']:g}, SEGM {targets['SEGM']:g})"
                ax.axhline(target, color="black" if shared else colour, linestyle="--", linewidth=1,
                           label=named if shared else f"{s.label} {named}")
            top = max(top, target)
        ax.set(title=f"{metric} (COCO mAP)", xlabel="minutes since run_start", ylim=(0, top * 1.08 or 1))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("eval accuracy")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(3, len(labels)), fontsize=9, frameon=False)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.06 + 0.04 * ((len(labels) - 1) // 3), 1, 1))
    png = io.BytesIO()
    fig.savefig(png, format="png")
    plt.close(fig)
    return png.getvalue()


def summary(sides: list[Side]) -> dict:
    return {"sides": [{"label": s.label, "where": s.where, "accelerator": s.accelerator, "accelerators": s.accelerators,
                       "score": s.score, "used": s.sc.used, **{name: cells[k] for name, cells in rows(sides)}}
                      for k, s in enumerate(sides)],
            "breakdown": [{"with": b.label, "difference": sides[0].score - b.score, "parts": breakdown(sides[0], b)}
                          for b in sides[1:]]}


def write(sides: list[Side], out_dir: Path, title: str) -> None:
    """Print the table and the breakdowns; write compare.png, compare.json and compare.md into out_dir,
    each made whole in memory first (a failure leaves none half-written)."""
    png, md = plot(sides, title), markdown(sides, title)
    doc = json.dumps(summary(sides), indent=2) + "\n"
    print(format_table(sides))
    for other in sides[1:]:
        print(format_breakdown(sides[0], other))
    atomic_write(out_dir / "compare.png", png)
    atomic_write(out_dir / "compare.json", doc)
    atomic_write(out_dir / "compare.md", md)
    print(f"compare: {out_dir / 'compare.md'}, {out_dir / 'compare.json'}, plot {out_dir / 'compare.png'}")


def print_catalog() -> None:
    print(f"{'id':<64} {'accelerators':<35} {'division':<8} {'score':>11}")
    for e in catalog.load().values():
        score_text = "-" if e["score"] is None else f"{e['score']:.2f}"
        print(f"{e['id']:<64} {e['accelerators']:>5}x {e['accelerator']:<28} {e['division']:<8} {score_text:>7} min")


def compare(*, series: str | None, from_logs: str | None, with_: list[str], results_dir: Path, data_dir: Path,
            mirror: str | None = None, source: str | None = None) -> dict:
    """The body of `invoke compare`: yours (a series, or --from-logs) beside each other side."""
    if bool(series) == bool(from_logs):
        raise UserError("give one of --series NAME (a series under --results-dir) or --from-logs DIR")
    if source is not None and not Path(source).is_dir():
        raise UserError(f"--source {source} is not a folder: give the folder holding training_results_vX checkouts")
    if series:
        mine, out_dir = series_side(Path(results_dir), series)
    else:
        mine = folder_side(Path(from_logs))
        mine.label = f"yours: {mine.label}"
        out_dir = Path(results_dir) / f"compare-{mine.label.removeprefix('yours: ')}"
    sides = [mine, *others(list(with_ or []), mine, Path(data_dir), mirror, None if source is None else Path(source))]
    title = f"{BENCHMARK}: {mine.label.removeprefix('yours: ')} beside " + ", ".join(s.label for s in sides[1:])
    write(sides, out_dir, title if len(title) < 110 else title[:107] + "...")
    return summary(sides)
