"""`invoke doctor`: the readiness table, and exit 1 with what to do when something required is missing."""
from __future__ import annotations

import re

from conftest import run_invoke
from mlperf.datasets import load_manifest
from mlperf.datasets.fetch import space_needed
from mlperf.doctor import check_cluster, check_requirements

HUGE = """\
name: huge
files:
  - name: big.zip
    url: http://127.0.0.1:9/big.zip
    md5: 0123456789abcdef0123456789abcdef
    size: 1000000000000000000
    extract: true
splits:
  val: {images: val2017, annotations: annotations/instances_val2017.json}
"""


def test_doctor_fails_when_the_dataset_cannot_fit(tmp_path, sandbox):
    manifest = tmp_path / "huge.yaml"
    manifest.write_text(HUGE)
    proc = run_invoke(["doctor", "--manifest", str(manifest)], env=sandbox)
    assert proc.returncode == 1, proc.stdout
    assert re.search(r"^disk\s+FAIL\s+.*huge still needs", proc.stdout, re.MULTILINE), proc.stdout
    assert re.search(r"^package invoke\s+ok", proc.stdout, re.MULTILINE)
    assert re.search(r"^/dev/shm\s+(ok|warn)", proc.stdout, re.MULTILINE)
    assert re.search(r"^dataset huge\s+warn\s+not fetched", proc.stdout, re.MULTILINE)
    error = proc.stderr.strip()
    assert error.startswith("error: ") and "disk: free" in error and "--data-dir" in error
    assert "Traceback" not in proc.stderr


def test_requirements_are_checked_against_installed_versions():
    rows = {r.name: r for r in check_requirements([
        "# a comment", "-r other.txt", "invoke>=2.2,<3   # why", "invoke>=99",
        "no-such-package-for-doctor>=1", "pyyaml",
    ])}
    assert rows["package invoke"].level == "FAIL" and "needs >=99" in rows["package invoke"].found
    assert rows["package no-such-package-for-doctor"].level == "FAIL"
    assert "pip install" in rows["package no-such-package-for-doctor"].advice
    assert rows["package pyyaml"].level == "ok"
    ok_range = check_requirements(["invoke>=2.2,<3"])
    assert [r.level for r in ok_range] == ["ok"]


def test_space_needed_counts_what_is_left(tmp_path):
    manifest = tmp_path / "m.yaml"
    manifest.write_text(HUGE.replace("1000000000000000000", "1000"))
    ds = load_manifest(manifest)
    assert sum(space_needed(ds, tmp_path / "data")) == 2000   # download + unpacked copy
    downloads = ds.downloads(tmp_path / "data")
    downloads.mkdir(parents=True)
    (downloads / "big.zip.part").write_bytes(b"x" * 400)     # a partial download resumes
    assert sum(space_needed(ds, tmp_path / "data")) == 1600


def test_cluster_variables_are_reported_and_checked():
    assert check_cluster({}) == []
    [row] = check_cluster({"BACKENDAI_CLUSTER_HOSTS": "main1,sub1", "BACKENDAI_CLUSTER_SIZE": "2",
                           "BACKENDAI_CLUSTER_HOST": "main1"})
    assert row.level == "ok" and "hosts=main1,sub1" in row.found
    [row] = check_cluster({"BACKENDAI_CLUSTER_HOSTS": "main1", "BACKENDAI_CLUSTER_SIZE": "2"})
    assert row.level == "warn"
