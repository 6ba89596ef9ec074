"""`invoke all --dataset shapes` end to end on the CPU: fetch (made locally), verify, image context, two
real training runs through torchrun, compliance checks, score, summary and plot; then a second call that
skips every step, and a third that resumes a series whose second run is gone."""
from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from conftest import run_invoke
from mlperf.results.logs import check_compliance, parse_log


def _series(results_dir: Path) -> Path:
    found = sorted(results_dir.glob("all-shapes-*"))
    assert len(found) == 1, f"expected one all-shapes-* series in {results_dir}, found {found}"
    return found[0]


def test_invoke_all_shapes_end_to_end_then_resume(tmp_path, sandbox):
    env = {**sandbox, "INVOKE_MLPERF_IMAGE_OUTPUT": str(tmp_path / "image")}
    results_dir = Path(sandbox["INVOKE_MLPERF_RESULTS_DIR"])
    proc = run_invoke(["all", "--dataset", "shapes", "--runs", "2"], env=env, check=True, timeout=900)
    for step in ("fetch", "verify", "image", "time"):
        assert f"==> {step}" in proc.stdout
        assert (results_dir / ".all" / "shapes" / f"{step}.done").is_file()
    assert (tmp_path / "image" / "Dockerfile").is_file()

    root = _series(results_dir)
    settings = json.loads((root / "series.json").read_text())
    system = settings["system"]
    logs = sorted((root / "results" / system / "maskrcnn").glob("result_*.txt"))
    assert [p.name for p in logs] == ["result_0.txt", "result_1.txt"]
    for i, p in enumerate(logs):
        log = parse_log(p)
        assert log.submission["division"] == "open" and log.status in ("success", "aborted")
        assert log.seed == settings["seeds"][i] and log.evals
        assert check_compliance(p, "3.1.0") == (True, [])
    desc = json.loads((root / "systems" / f"{system}.json").read_text())
    assert desc["system_name"] == system and desc["division"] == "open" and desc["number_of_nodes"] == "1"

    summary = json.loads((root / "summary.json").read_text())
    assert [r["index"] for r in summary["runs"]] == [0, 1]
    assert all(r["compliant"] for r in summary["runs"])
    assert summary["seeds"] == settings["seeds"] and len(set(settings["seeds"])) == 2
    assert summary["score"]["kind"] in ("mean", "none")       # 2 runs: never called an MLPerf score
    assert "| run | minutes | epochs | BBOX | SEGM | status | compliance |" in proc.stdout
    assert "| run | minutes |" in (root / "summary.md").read_text()
    with Image.open(root / "plot.png") as img:
        assert img.format == "PNG" and img.size[0] >= 600

    # again: every step is done, nothing runs, nothing is rewritten
    before = {p: p.stat().st_mtime_ns for p in logs}
    again = run_invoke(["all", "--dataset", "shapes", "--runs", "2"], env=env, check=True)
    assert again.stdout.count("skipped") == 4 and "run 0/" not in again.stdout
    assert {p: p.stat().st_mtime_ns for p in logs} == before

    # a series that lost its second run (and never finished) resumes: run 0 kept, run 1 runs again
    logs[1].unlink()
    (root / "summary.json").unlink()
    resumed = run_invoke(["all", "--dataset", "shapes", "--runs", "2"], env=env, check=True, timeout=900)
    assert "run 0: finished earlier, kept" in resumed.stdout and "run 1/2" in resumed.stdout
    assert logs[0].stat().st_mtime_ns == before[logs[0]]
    assert parse_log(logs[1]).seed == settings["seeds"][1]
    assert json.loads((root / "series.json").read_text())["seeds"] == settings["seeds"]
    assert (root / "summary.json").is_file()
