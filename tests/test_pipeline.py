"""`invoke all` end to end on the CPU: fetch (made locally), verify, image context, real training runs
through torchrun, compliance checks, score, summary and plot. The quickstart's own dataset (shapes) learns
to its targets in one run; a tiny manifest (targets it meets at once) exercises the steps' bookkeeping:
a second call that skips every step, a third that resumes a series whose second run is gone."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from conftest import TINY_SHAPES_MANIFEST, one_error_line, run_invoke
from mlperf.results.logs import check_compliance, parse_log


# The tiny set with targets its first evaluation meets: every run succeeds in one epoch (seconds).
DEMO_MANIFEST = TINY_SHAPES_MANIFEST.replace("name: tiny", "name: demo") + "targets: {BBOX: 0.0, SEGM: 0.0}\n"


def _series(results_dir: Path, dataset: str) -> Path:
    found = sorted(results_dir.glob(f"all-{dataset}-*"))
    assert len(found) == 1, f"expected one all-{dataset}-* series in {results_dir}, found {found}"
    return found[0]


@pytest.mark.slow(seconds=100)
def test_the_quickstart_dataset_learns_to_its_targets_and_scores(tmp_path, sandbox):
    """The README's first command with one run instead of five: the CPU demo must learn, not only run
    (one run is not an MLPerf score, so the command ends with exit 1 saying so)."""
    env = {**sandbox, "INVOKE_MLPERF_IMAGE_OUTPUT": str(tmp_path / "image")}
    proc = run_invoke(["all", "--dataset", "shapes", "--runs", "1"], env=env, timeout=900)
    one_error_line(proc, "no MLPerf score: mean of 1 successful run(s) of 1")
    root = _series(Path(sandbox["INVOKE_MLPERF_RESULTS_DIR"]), "shapes")
    [log_path] = (root / "results").glob("*/maskrcnn/result_0.txt")
    log = parse_log(log_path)
    assert log.status == "success", proc.stdout[-3000:]
    assert log.model == "r18-fpn-slim" and log.targets == {"BBOX": 0.05, "SEGM": 0.05}
    _, _, bbox, segm = log.evals[-1]
    assert bbox >= 0.05 and segm >= 0.05
    summary = json.loads((root / "summary.json").read_text())
    assert summary["score"]["minutes"] > 0 and summary["model"] == "r18-fpn-slim"
    assert "Model r18-fpn-slim (the CPU demo's small Mask R-CNN" in proc.stdout


@pytest.mark.slow(seconds=40)
def test_invoke_all_end_to_end_then_skip_then_resume(tmp_path, sandbox):
    manifest = tmp_path / "demo.yaml"
    manifest.write_text(DEMO_MANIFEST)
    env = {**sandbox, "INVOKE_MLPERF_IMAGE_OUTPUT": str(tmp_path / "image")}
    results_dir = Path(sandbox["INVOKE_MLPERF_RESULTS_DIR"])
    args = ["all", "--manifest", str(manifest), "--runs", "5"]
    proc = run_invoke(args, env=env, check=True, timeout=900)
    for step in ("fetch", "verify", "image", "time"):
        assert f"==> {step}" in proc.stdout
        assert (results_dir / ".all" / "demo" / f"{step}.done").is_file()
    assert (tmp_path / "image" / "Dockerfile").is_file()

    root = _series(results_dir, "demo")
    settings = json.loads((root / "series.json").read_text())
    system = settings["system"]
    logs = sorted((root / "results" / system / "maskrcnn").glob("result_*.txt"))
    assert [p.name for p in logs] == [f"result_{i}.txt" for i in range(5)]
    for i, p in enumerate(logs):
        log = parse_log(p)
        assert log.submission["division"] == "open" and log.status == "success"
        assert log.targets == {"BBOX": 0.0, "SEGM": 0.0}  # the manifest's own targets reached the trainer
        assert log.seed == settings["seeds"][i] and log.evals
        assert check_compliance(p, "3.1.0") == (True, [])
    desc = json.loads((root / "systems" / f"{system}.json").read_text())
    assert desc["system_name"] == system and desc["division"] == "open" and desc["number_of_nodes"] == "1"

    summary = json.loads((root / "summary.json").read_text())
    assert [r["index"] for r in summary["runs"]] == list(range(5))
    assert all(r["compliant"] for r in summary["runs"])
    assert summary["seeds"] == settings["seeds"] and len(set(settings["seeds"])) == 5
    assert summary["score"]["kind"] == "mlperf" and len(summary["score"]["used"]) == 3   # the middle 3 of 5
    assert "| run | minutes | epochs | BBOX | SEGM | status | compliance |" in proc.stdout
    assert "| run | minutes |" in (root / "summary.md").read_text()
    with Image.open(root / "plot.png") as img:
        assert img.format == "PNG" and img.size[0] >= 600

    # again: every step is done, nothing runs, nothing is rewritten
    before = {p: p.stat().st_mtime_ns for p in logs}
    again = run_invoke(args, env=env, check=True)
    assert again.stdout.count("skipped") == 4 and "run 0/" not in again.stdout
    assert {p: p.stat().st_mtime_ns for p in logs} == before

    # a series that lost its second run (and never finished) resumes: run 0 kept, run 1 runs again
    logs[1].unlink()
    (root / "summary.json").unlink()
    resumed = run_invoke(args, env=env, check=True, timeout=900)
    assert "run 0: finished earlier, kept" in resumed.stdout and "run 1/5" in resumed.stdout
    assert logs[0].stat().st_mtime_ns == before[logs[0]]
    assert parse_log(logs[1]).seed == settings["seeds"][1]
    assert json.loads((root / "series.json").read_text())["seeds"] == settings["seeds"]
    assert (root / "summary.json").is_file()

    # an open-division submission: MLCommons' package checker and result summarizer accept the tree
    # what a CPU host cannot detect about itself, given as a user gives it
    system_info = tmp_path / "system.json"
    system_info.write_text(json.dumps({"host_memory_configuration": "1x 24GB", "cooling": "air"}))
    packaged = run_invoke(["package", "--series", root.name, "--system-info", str(system_info)], env=env,
                          check=True, timeout=600)
    assert "passes the package checker" in packaged.stdout and "(open, RCP not checked)" in packaged.stdout
    org = parse_log(logs[0]).submission["org"]
    tree = results_dir / "package" / org
    assert sorted(p.name for p in (tree / "results" / system / "maskrcnn").iterdir()) == \
        [f"result_{i}.txt" for i in range(5)]
