"""`invoke all`: fetch, verify, image, time, each skipped when its output is already there and valid.

Each step that finishes writes a stamp, <results_dir>/.all/<dataset>/<step>.done, holding a hash of
its inputs (settings, manifest, project sources) and a fingerprint of its output. On the next call a
step is skipped only when both still match, so a crashed `invoke all` resumes at the step that did
not finish, and a changed input (another manifest, --runs, edited code for the image) redoes the
steps it affects. The time step uses a series named from its inputs (all-<dataset>-<hash>), so a
resumed call continues the same series: finished runs are kept, the missing ones run.
"""
from __future__ import annotations

import hashlib
import json
import os
import shlex
import time
from pathlib import Path

from mlperf.datasets.hashing import hash_file
from mlperf.files import read_json, write_json
from mlperf.project import sources_digest

STEPS = ("fetch", "verify", "image", "time")


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _tree_fingerprint(root: Path) -> list | None:
    """(relative path, size, mtime_ns) of every file under root: cheap, and changes when a file does."""
    if not root.is_dir():
        return None
    out = []
    for dirpath, _, files in os.walk(root):
        for name in files:
            p = Path(dirpath) / name
            st = p.stat()
            out.append((str(p.relative_to(root)), st.st_size, st.st_mtime_ns))
    return sorted(out)


def dataset_fingerprint(ds, data_dir: Path) -> dict | None:
    """What verify judged: each split's annotations (size, mtime) and image folder (entries, mtime),
    and the downloaded archives' sizes; None when the dataset folder is missing."""
    root = ds.root(data_dir)
    if not root.is_dir():
        return None
    fp = {}
    for name, split in sorted(ds.splits.items()):
        ann, images = root / split.annotations, root / split.images
        fp[name] = {
            "annotations": [ann.stat().st_size, ann.stat().st_mtime_ns] if ann.is_file() else None,
            "images": [sum(1 for _ in os.scandir(images)), images.stat().st_mtime_ns]
            if images.is_dir() else None,
        }
    downloads = ds.downloads(data_dir)
    fp["downloads"] = {f.name: (downloads / f.name).stat().st_size
                       for f in ds.files if (downloads / f.name).is_file()}
    return fp


class Stamps:
    """The .done files of one dataset's pipeline."""

    def __init__(self, results_dir: Path, dataset: str):
        self.dir = Path(results_dir) / ".all" / dataset

    def path(self, step: str) -> Path:
        return self.dir / f"{step}.done"

    def is_done(self, step: str, inputs: dict, outputs) -> bool:
        stamp = read_json(self.path(step))  # a missing or damaged stamp: the step runs again
        return stamp.get("inputs") == _digest(inputs) and stamp.get("outputs") == _digest(outputs)

    def mark(self, step: str, inputs: dict, outputs) -> None:
        write_json(self.path(step), {"step": step, "inputs": _digest(inputs), "outputs": _digest(outputs),
                                     "settings": inputs, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
                   indent=2)


def _summary_outputs(root: Path) -> dict | None:
    summary = root / "summary.json"
    return {"summary": hash_file(summary, "sha256")} if summary.is_file() else None


def run_all(*, dataset: str, data_dir: Path, results_dir: Path, runs: int, ruleset: str, system: str | None,
            jobs: int, image: dict, submitter: str, status: str, build: bool = False, config: str | None = None,
            max_epochs=None, nodes=None, manifest: str | None = None) -> dict:
    """The whole benchmark for one dataset (built in, or a `manifest` file's), resuming where a previous
    call stopped; returns the summary.

    `image`: the image settings (base, output, tag, resources), as `invoke image` takes them."""
    from mlperf import image as imaging
    from mlperf.datasets import fetch as fetching
    from mlperf.datasets import resolve
    from mlperf.datasets import verify as verifying
    from mlperf.results import report, score, series as series_runs

    manifest = None if manifest is None else str(Path(manifest).resolve())
    ds = resolve(dataset, manifest)
    data_dir, results_dir = Path(data_dir).resolve(), Path(results_dir).resolve()
    stamps = Stamps(results_dir, ds.name)
    manifest_digest = hash_file(ds.source, "sha256") if ds.source else ds.name

    def step(name: str, inputs: dict, outputs, work) -> None:
        """Run `work` unless the stamp says this step is done for these inputs and outputs."""
        if stamps.is_done(name, inputs, outputs()):
            print(f"==> {name}: done earlier, inputs and output unchanged: skipped", flush=True)
            return
        print(f"==> {name}", flush=True)
        work()
        stamps.mark(name, inputs, outputs())

    fetched = {"manifest": manifest_digest, "data_dir": str(data_dir)}
    step("fetch", fetched, lambda: dataset_fingerprint(ds, data_dir),
         lambda: fetching.fetch_dataset(ds, data_dir, mirror=None, source=None, jobs=jobs))
    step("verify", fetched, lambda: dataset_fingerprint(ds, data_dir),
         lambda: verifying.verify_dataset(ds, data_dir, deep=False, force=False))

    image_out = Path(image["output"]).resolve()
    image_inputs = {"base": image["base"], "output": str(image_out), "tag": image.get("tag") or None,
                    "build": build, "resources": dict(image["resources"]), "sources": sources_digest(),
                    "gpu_arch": image.get("gpu_arch") or None}
    step("image", image_inputs, lambda: _tree_fingerprint(image_out),
         lambda: imaging.make_image(base=image_inputs["base"], output=image_out, tag=image_inputs["tag"],
                                    build=build, push=False, resources=image_inputs["resources"],
                                    gpu_arch=image_inputs["gpu_arch"]))

    time_inputs = {"dataset": ds.name, "manifest": manifest_digest, "runs": runs, "config": config,
                   "max_epochs": max_epochs, "ruleset": ruleset, "system": system or None,
                   "data_dir": str(data_dir), "submitter": submitter, "status": status, "nodes": nodes}
    series = f"all-{ds.name}-{_digest(time_inputs)[:8]}"
    series_root = results_dir / series
    if stamps.is_done("time", time_inputs, _summary_outputs(series_root)):
        print(f"==> time: series {series} finished earlier: skipped", flush=True)
        summary = json.loads((series_root / "summary.json").read_text())
        runs_list = [score.RunResult(**r) for r in summary["runs"]]
        report.report(runs_list, score.Score(**summary["score"]), series_root, model=summary.get("model", ""))
        series_runs.require_score(summary, series_root)
        return summary
    print(f"==> time: series {series}", flush=True)
    what = f"--manifest {shlex.quote(manifest)}" if manifest else f"--dataset {ds.name}"
    resume_hint = " ".join([f"invoke all {what} --runs {runs}"] + ([f"--config {config}"] if config else [])
                           + ([f"--max-epochs {max_epochs}"] if max_epochs is not None else []))
    summary = series_runs.time_series(
        runs=runs, results_dir=results_dir, system=time_inputs["system"], ruleset=time_inputs["ruleset"],
        dataset=None if manifest else ds.name, manifest=manifest, data_dir=data_dir, config=config,
        max_epochs=max_epochs, nodes=nodes, submitter=submitter, status=status, series=series, finished_ok=True,
        resume_hint=resume_hint)
    stamps.mark("time", time_inputs, _summary_outputs(series_root))
    return summary
