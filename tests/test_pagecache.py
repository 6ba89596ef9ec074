"""MLPerf's cache_clear: the launcher clears the dataset's page cache before each run and the
log says so only then; `--dry-run` shows the reference recipe a closed run trains."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT, mllog, run_invoke
from mlperf import pagecache


def resident_bytes(path) -> int:
    """Bytes of `path` in the page cache, as util-linux's fincore counts them."""
    done = subprocess.run(["fincore", "--bytes", "--noheadings", "-o", "RES", str(path)],
                          capture_output=True, text=True, check=True)
    return int(done.stdout.strip() or 0)


@pytest.mark.skipif(shutil.which("fincore") is None, reason="util-linux's fincore measures the page cache")
def test_without_privilege_the_datasets_files_are_evicted(tmp_path, monkeypatch):
    monkeypatch.setattr(pagecache, "DROP_CACHES", tmp_path / "no-such-proc" / "drop_caches")  # a container's view
    images = tmp_path / "coco" / "train2017"
    images.mkdir(parents=True)
    files = []
    for i in range(3):
        files.append(images / f"{i:012d}.jpg")
        files[-1].write_bytes(os.urandom(1 << 20))
    os.symlink(files[0], images / "link.jpg")             # not followed, not an error
    for f in files:
        f.read_bytes()
    assert pagecache.method() == "fadvise"
    assert pagecache.clear([tmp_path / "coco"]) == "fadvise"
    assert [resident_bytes(f) for f in files] == [0, 0, 0]


def test_a_folder_that_cannot_be_walked_is_one_error_line(tmp_path):
    done = subprocess.run([sys.executable, "-m", "mlperf.pagecache", str(tmp_path / "missing")], cwd=ROOT,
                          capture_output=True, text=True)
    assert done.returncode == 1 and done.stderr.startswith("error: could not clear the page cache"), done.stderr


@pytest.mark.slow
def test_a_run_logs_cache_clear_true_only_after_the_launcher_cleared_it(tiny_shapes, tmp_path):
    log = tmp_path / "results" / "result_0.txt"
    run_invoke(["train", *tiny_shapes["args"], "--device", "cpu", "--max-epochs", "1", "--log", str(log)],
               check=True, timeout=600)
    assert [e["value"] for e in mllog(log) if e["key"] == "cache_clear"] == [True]
    # the trainer started without the launcher cannot know: it says false
    direct = tmp_path / "direct.txt"
    args = ["-m", "object_detection.train", f"--data-root={tiny_shapes['data_dir'] / 'tiny'}", "--dataset=tiny",
            "--profile=shapes-cpu", "--per-gpu-batch=8", "--workers=0", f"--result-log={direct}", "--device=cpu",
            "--num-classes=4", "--max-epochs=1"]
    subprocess.run([sys.executable, *args], cwd=ROOT, check=True, capture_output=True, timeout=600)
    assert [e["value"] for e in mllog(direct) if e["key"] == "cache_clear"] == [False]


def test_dry_run_of_the_closed_config_shows_the_reference_recipe(tmp_path):
    done = run_invoke(["train", "--config", "dgx8-h100", "--dataset", "coco2017", "--dry-run",
                       "--data-dir", str(tmp_path)], check=True)
    block = json.loads(done.stdout)["reference"]
    assert block["backbone"].startswith("R-50.pkl (")
    assert block["stride_in_1x1"] is True and block["input"].startswith("BGR, 0-255, mean 102.9801/115.9465/122.7717")
    assert block["box_loss_beta"] == 1.0 and block["rpn_loss_beta"] == pytest.approx(1 / 9, abs=1e-6)
    assert block["warmup"] == "mlperf_linear" and block["iterations_per_epoch"] == 1222
    assert block["proposal_selection"] == "top 1000 x 12 images = 12000 over the per-GPU batch"
    assert block["cache_clear"].startswith("sync, then ")


def test_dry_run_of_an_open_profile_shows_torchvisions_recipe(tmp_path):
    done = run_invoke(["train", "--dataset", "shapes", "--device", "cpu", "--dry-run", "--data-dir", str(tmp_path)],
                      check=True)
    block = json.loads(done.stdout)["reference"]
    assert block["recipe"] == "torchvision" and block["backbone"] is None and block["warmup"] == "linear"
