"""`invoke compare` and the catalog of published results, through the entry points a user types.

A real HTTP server on 127.0.0.1 stands in for raw.githubusercontent.com (--mirror): it serves NVIDIA's
v3.0 DGX H100 logs the project carries (tests/data/README.md) at the paths the catalog names. The
CPU series is written with tests/support/mllog_writer.py (a real CPU run that converges takes too long here).
"""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from conftest import ROOT, one_error_line, run_invoke
from tests.support.http_server import FileServer
from tests.support.mllog_writer import write_log
from mlperf.results import catalog
from mlperf.results.logs import parse_log, result_files
from mlperf.results.score import run_result, score
from mlperf.results.series import open_series

REFERENCE = ROOT / "tests" / "data" / "nvidia-dgxh100-maskrcnn-v3.0"
NVIDIA = "v3.0/NVIDIA/dgxh100_ngc23.04_pytorch"


class RawServer(FileServer):
    """FileServer (flat names only) as raw.githubusercontent.com: the file for <owner>/<repo>/<commit>/<path>
    is stored under that path with each '/' written %2F."""

    def _serve(self, h) -> None:
        h.path = "/" + h.path.partition("?")[0].lstrip("/").replace("/", "%2F")
        super()._serve(h)


def flat(relative: str) -> str:
    return relative.replace("/", "%2F")


@pytest.fixture
def raw(tmp_path):
    """A RawServer holding the catalog's NVIDIA v3.0 logs (the bundled copies); yields (server, folder)."""
    folder = tmp_path / "raw"
    folder.mkdir()
    item = catalog.load()[NVIDIA]
    for log in item["logs"]:
        shutil.copyfile(REFERENCE / log["name"], folder / flat(catalog.raw_path(item, log["path"])))
    with RawServer(folder) as srv:
        yield srv, folder


def compare(*args: str, sandbox: dict, mirror: str | None = None):
    return run_invoke(["compare", *args, *(["--mirror", mirror] if mirror else [])], env=sandbox, timeout=300)


def cpu_series(results_dir: Path, name: str = "cpu-shapes", benchmark: str = "maskrcnn") -> Path:
    """A finished open-division series of five CPU runs as `invoke time` lays it out."""
    settings = {"runs": 5, "dataset": "shapes", "config": None, "max_epochs": None, "gpus": None, "nodes": None,
                "ruleset": "3.1.0", "system": "laptop_cpu", "submitter": "tests", "status": "research"}
    series = open_series(results_dir, name, settings)
    for i, minutes in enumerate((6.0, 5.5, 7.0, 6.5, 8.0)):
        write_log(series.log(i), minutes=minutes, epochs=6 + i % 2, division="open", benchmark=benchmark,
                  targets={"BBOX": 0.2, "SEGM": 0.18}, final=(0.3, 0.27), seed=i + 1, batch=2)
    desc = {"submitter": "tests", "division": "open", "system_name": "laptop_cpu", "number_of_nodes": "1",
            "accelerators_per_node": "0", "accelerator_model_name": ""}
    (series.root / "systems").mkdir(exist_ok=True)
    (series.root / "systems" / "laptop_cpu.json").write_text(json.dumps(desc))
    return series.root


# --- the catalog -----------------------------------------------------------------------------------


def test_the_catalog_score_of_the_logs_the_project_carries_is_the_published_one():
    item = catalog.load()[NVIDIA]
    logs = result_files(REFERENCE)
    assert [log["name"] for log in item["logs"]] == [p.name for p in logs.values()]
    for log in item["logs"]:  # the bundled files are the published ones, byte for byte
        data = (REFERENCE / log["name"]).read_bytes()
        assert (len(data), hashlib.sha256(data).hexdigest()) == (log["size"], log["sha256"])
    recomputed = score([run_result(i, parse_log(p), None) for i, p in logs.items()])
    assert round(recomputed.minutes, 4) == item["score"] and round(recomputed.minutes, 2) == item["published"] == 19.18
    assert (item["accelerator"], item["accelerators"], item["nodes"], item["division"]) == \
        ("NVIDIA H100-SXM5-80GB", 8, 1, "closed")


def test_every_published_score_the_catalog_holds_is_the_recomputed_one():
    entries = catalog.load()
    rounds = {e["round"] for e in entries.values()}
    assert rounds == set(catalog.ROUNDS)
    stated = [e for e in entries.values() if e["published"] is not None]
    assert stated and all(abs(e["score"] - e["published"]) <= catalog.PUBLISHED_TOLERANCE for e in stated)
    for e in entries.values():
        assert e["logs"] and all(len(log["sha256"]) == 64 and log["size"] > 0 for log in e["logs"])
        assert e["id"] == f"v{e['round']}/{e['submitter']}/{e['system']}"


def test_rebuild_from_a_local_clone_makes_the_same_entry(tmp_path):
    clone = tmp_path / "training_results_v3.0"
    logs = clone / "NVIDIA" / "results" / "dgxh100_ngc23.04_pytorch" / "maskrcnn"
    logs.mkdir(parents=True)
    for p in result_files(REFERENCE).values():
        shutil.copyfile(p, logs / p.name)
    (clone / "NVIDIA" / "systems").mkdir()
    shutil.copyfile(REFERENCE / "system_desc.json", clone / "NVIDIA" / "systems" / "dgxh100_ngc23.04_pytorch.json")
    git = ["git", "-C", str(clone), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q", str(clone)], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "published"], check=True)
    out = tmp_path / "catalog.json"
    proc = subprocess.run([sys.executable, "-m", "mlperf.results.catalog", "--rebuild", str(tmp_path), "--output", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "catalog: 1 results" in proc.stdout and "differs" not in proc.stdout
    made = catalog.load(out)[NVIDIA]
    kept = catalog.load()[NVIDIA]
    assert made["commit"] != kept["commit"]  # the clone made here has a commit of its own; all else is the same
    for item in (made, kept):
        for log in item["logs"]:
            assert log.pop("url") == f"{catalog.RAW_BASE}/{item['repository']}/{item['commit']}/{log['path']}"
    assert {k: v for k, v in made.items() if k != "commit"} == {k: v for k, v in kept.items() if k != "commit"}

    bad = subprocess.run([sys.executable, "-m", "mlperf.results.catalog", "--rebuild", str(tmp_path / "nothing")],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and bad.stderr.startswith("error: ") and bad.stderr.count("\n") == 1


def test_the_default_is_the_same_accelerator_and_count_then_the_nearest():
    same = catalog.pick("NVIDIA H100 80GB HBM3", 8)          # nvidia-smi's name of an H100 SXM
    assert same[0]["id"] == NVIDIA and all(e["accelerators"] == 8 and "PCIe" not in e["accelerator"] for e in same)
    assert len({tuple(log["sha256"] for log in e["logs"]) for e in same}) == len(same)  # republished logs once
    nearest = catalog.pick("NVIDIA H100 PCIe", 6)
    assert nearest and {e["accelerators"] for e in nearest} <= {4, 8} and all(catalog.accelerator_key(e["accelerator"])
                                                                            == ("H100", True) for e in nearest)
    assert catalog.pick("", 0) == []


# --- invoke compare --------------------------------------------------------------------------------


@pytest.mark.slow
def test_the_published_logs_beside_themselves_differ_by_nothing(raw, tmp_path, sandbox):
    srv, _ = raw
    proc = compare("--from-logs", str(REFERENCE), "--with", NVIDIA, sandbox=sandbox, mirror=srv.url())
    assert proc.returncode == 0, proc.stderr
    assert sorted(r.path for r in srv.requests) == sorted(flat(catalog.raw_path(catalog.load()[NVIDIA], log["path"]))
                                                         for log in catalog.load()[NVIDIA]["logs"])
    out = Path(sandbox["INVOKE_MLPERF_RESULTS_DIR"]) / f"compare-{REFERENCE.name}"
    doc = json.loads((out / "compare.json").read_text())
    assert doc["breakdown"][0]["difference"] == 0 and all(v == 0 for v in doc["breakdown"][0]["parts"].values())
    assert [s["score"] for s in doc["sides"]] == [pytest.approx(19.1798, abs=1e-4)] * 2
    assert "+0.00 min (the same; 19.18 vs 19.18)" in proc.stdout
    mine, theirs = doc["sides"]
    assert {k: v for k, v in mine.items() if k not in ("label", "where")} == \
        {k: v for k, v in theirs.items() if k not in ("label", "where")}
    assert mine["epochs to converge"] == "14.0"

    srv.reset()  # a second comparison reads the cache: nothing goes over the wire
    again = compare("--from-logs", str(REFERENCE), "--with", NVIDIA, sandbox=sandbox, mirror=srv.url())
    assert again.returncode == 0 and srv.requests == [] and "nothing to do" in again.stdout


@pytest.mark.slow
def test_source_links_the_logs_from_checkouts_of_the_repositories(tmp_path, sandbox):
    source = tmp_path / "checkouts"
    logs = source / "training_results_v3.0" / "NVIDIA" / "results" / "dgxh100_ngc23.04_pytorch" / "maskrcnn"
    logs.mkdir(parents=True)
    for p in result_files(REFERENCE).values():
        shutil.copyfile(p, logs / p.name)
    proc = compare("--from-logs", str(REFERENCE), "--with", NVIDIA, "--source", str(source), sandbox=sandbox)
    assert proc.returncode == 0, proc.stderr  # no --mirror: raw.githubusercontent.com was never asked
    assert proc.stdout.count("sha256 ok") == 5 and "+0.00 min (the same" in proc.stdout
    (logs / "result_1.txt").write_bytes(b"tampered")
    other = dict(sandbox, INVOKE_MLPERF_DATA_DIR=str(tmp_path / "data2"))
    one_error_line(compare("--from-logs", str(REFERENCE), "--with", NVIDIA, "--source", str(source), sandbox=other),
                   "result_1.txt", "it is not the file the manifest names")
    one_error_line(compare("--from-logs", str(REFERENCE), "--with", NVIDIA, "--source", str(tmp_path), sandbox=other),
                   "--source", "has no training_results_v3.0")


@pytest.mark.slow
def test_a_cpu_series_beside_the_dgx_h100(raw, tmp_path, sandbox):
    srv, _ = raw
    root = cpu_series(Path(sandbox["INVOKE_MLPERF_RESULTS_DIR"]))
    proc = compare("--series", root.name, "--with", NVIDIA, sandbox=sandbox, mirror=srv.url())
    assert proc.returncode == 0, proc.stderr
    for row in ("time to train (score), min", "epochs to converge", "mean epoch time, s", "per accelerator, images/s",
                "evaluation exposed per epoch, s", "init before run_start", "convergence (epochs)", "training speed"):
        assert row in proc.stdout
    doc = json.loads((root / "compare.json").read_text())
    mine, theirs = doc["sides"]
    assert mine["time to train (score), min"] == "6.50" and theirs["time to train (score), min"] == "19.18"
    assert mine["per accelerator, images/s"] == "-" and mine["hardware"].startswith("no accelerator")
    parts, difference = doc["breakdown"][0]["parts"], doc["breakdown"][0]["difference"]
    assert difference == pytest.approx(6.5 - 19.1798, abs=1e-3)
    assert sum(parts.values()) == pytest.approx(difference, abs=1e-9)
    assert parts["convergence (epochs)"] < 0 and parts["training speed"] < 0  # 6.3 epochs of ~1 min vs 14 of 1.4
    assert "note: the targets differ (BBOX 0.2, SEGM 0.18 against BBOX 0.377, SEGM 0.339)" in proc.stdout
    md = (root / "compare.md").read_text()
    assert "| time to train (score), min | 6.50 | 19.18 |" in md and "![eval accuracy against time](compare.png)" in md
    with Image.open(root / "compare.png") as png:
        assert png.format == "PNG" and png.size == (1200, 480)
        assert len(png.convert("RGB").getcolors(1 << 20)) > 50  # drawn: lines, text and legend, not a blank canvas


@pytest.mark.slow
def test_a_series_keeps_its_compliance_verdicts_and_a_folder_is_a_side(tmp_path, sandbox):
    root = cpu_series(Path(sandbox["INVOKE_MLPERF_RESULTS_DIR"]))
    runs = [{"index": i, "compliant": i != 0, "messages": [] if i else ["a rule"]} for i in range(5)]
    (root / "summary.json").write_text(json.dumps({"runs": runs}))  # as invoke time wrote it: run 0 failed the checker
    proc = compare("--series", root.name, "--with", str(REFERENCE), sandbox=sandbox)
    assert proc.returncode == 0, proc.stderr
    mine, theirs = json.loads((root / "compare.json").read_text())["sides"]
    assert mine["used"] == [2, 3, 4] and mine["score"] == pytest.approx((6.5 + 7.0 + 8.0) / 3)  # 0 dropped as slowest
    assert theirs["label"] == REFERENCE.name and theirs["hardware"] == "8x NVIDIA H100-SXM5-80GB"  # its system_desc.json


@pytest.mark.slow
def test_logs_with_blocks_and_no_epochs_are_cut_by_their_blocks(tmp_path, sandbox):
    epochs, blocks = tmp_path / "epochs", tmp_path / "blocks"  # v0.7 TPU logs have block_start/stop only
    for i in range(3):
        text = write_log(epochs / f"result_{i}.txt", minutes=10 + i, epochs=5).read_text()
        blocks.mkdir(exist_ok=True)
        (blocks / f"result_{i}.txt").write_text("".join(line for line in text.splitlines(keepends=True)
                                                        if '"key": "epoch_st' not in line))
    proc = compare("--from-logs", str(epochs), "--with", str(blocks), sandbox=sandbox)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads((Path(sandbox["INVOKE_MLPERF_RESULTS_DIR"]) / "compare-epochs" / "compare.json").read_text())
    mine, theirs = doc["sides"]
    assert mine["epochs trained"] == theirs["epochs trained"] == "5.0"
    assert abs(float(mine["mean epoch time, s"]) - float(theirs["mean epoch time, s"])) < 0.01
    assert all(abs(v) < 1e-3 for v in doc["breakdown"][0]["parts"].values())


@pytest.mark.slow
def test_unknown_ids_and_other_benchmarks_are_one_line_each_and_write_nothing(raw, tmp_path, sandbox):
    srv, _ = raw
    results = Path(sandbox["INVOKE_MLPERF_RESULTS_DIR"])
    root = cpu_series(results)
    line = one_error_line(compare("--series", root.name, "--with", "v3.0/NVIDIA/dgxh100_ngc23.04", sandbox=sandbox,
                                  mirror=srv.url()), "neither a folder nor a published result", NVIDIA)
    assert "invoke compare --catalog" in line
    ssd = cpu_series(results, "ssd-series", benchmark="ssd")
    one_error_line(compare("--series", ssd.name, "--with", NVIDIA, sandbox=sandbox, mirror=srv.url()),
                   "another benchmark", "ssd")
    one_error_line(compare("--series", "no-such-series", sandbox=sandbox), "is not a result series")
    one_error_line(compare("--series", "../outside", sandbox=sandbox), "--series", "not a plain file name")
    one_error_line(compare("--series", root.name, sandbox=sandbox), "no published result ran on", "--with")
    one_error_line(compare("--series", root.name, "--from-logs", str(REFERENCE), sandbox=sandbox), "give one of")
    assert srv.requests == []  # every id is checked before anything is downloaded
    assert not list(results.rglob("compare.*"))


@pytest.mark.slow
def test_logs_that_do_not_parse_are_one_line(raw, tmp_path, sandbox):
    srv, _ = raw
    noise = tmp_path / "noise"
    noise.mkdir()
    (noise / "result_0.txt").write_text("this is not an MLPerf log\n")
    one_error_line(compare("--from-logs", str(noise), "--with", NVIDIA, sandbox=sandbox, mirror=srv.url()),
                   "holds no MLPerf log records")
    broken = tmp_path / "broken"
    write_log(broken / "result_0.txt", minutes=5)
    text = write_log(broken / "result_1.txt", minutes=6).read_text()
    (broken / "result_1.txt").write_text(text.replace('"BBOX": 0.38,', '"BBOX": "0.38",', 1))
    one_error_line(compare("--with", str(broken), "--from-logs", str(REFERENCE), sandbox=sandbox), "result_1.txt line",
                   "record has a time or value")
    assert not list(Path(sandbox["INVOKE_MLPERF_RESULTS_DIR"]).rglob("compare.*"))


def test_by_default_the_published_results_of_the_same_gpus(raw, tmp_path, sandbox):
    srv, _ = raw  # serves NVIDIA's logs only: the second pick's download fails, after the picks are said
    root = cpu_series(Path(sandbox["INVOKE_MLPERF_RESULTS_DIR"]), "h100-session")
    desc = json.loads((root / "systems" / "laptop_cpu.json").read_text())
    desc.update(accelerators_per_node="8", accelerator_model_name="NVIDIA H100 80GB HBM3")  # nvidia-smi's words
    (root / "systems" / "laptop_cpu.json").write_text(json.dumps(desc))
    proc = compare("--series", root.name, sandbox=sandbox, mirror=srv.url())
    picked = [e["id"] for e in catalog.pick("NVIDIA H100 80GB HBM3", 8)]
    assert picked[0] == NVIDIA and f"8x NVIDIA H100-SXM5-80GB: {', '.join(picked)}" in proc.stdout
    one_error_line(proc, "cannot download result_0.txt", catalog.load()[picked[1]]["commit"], "HTTP 404")
    assert not list(root.glob("compare.*"))


def test_a_download_failing_its_checksum_is_one_line_and_keeps_nothing(raw, tmp_path, sandbox):
    srv, folder = raw
    item = catalog.load()[NVIDIA]
    served = folder / flat(catalog.raw_path(item, item["logs"][3]["path"]))
    served.write_bytes(served.read_bytes().replace(b'"status": "success"', b'"status": "sucess!"'))
    root = cpu_series(Path(sandbox["INVOKE_MLPERF_RESULTS_DIR"]))
    line = one_error_line(compare("--series", root.name, "--with", NVIDIA, sandbox=sandbox, mirror=srv.url()),
                          "result_3.txt", "sha256 mismatch")
    assert item["logs"][3]["sha256"] in line
    downloads = Path(sandbox["INVOKE_MLPERF_DATA_DIR"]) / catalog.CACHE / catalog.cache_name(NVIDIA) / "downloads"
    assert not (downloads / "result_3.txt").exists() and not list(downloads.glob("*.part"))
    assert not list(root.glob("compare.*"))
