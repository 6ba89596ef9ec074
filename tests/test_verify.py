"""`invoke verify` on a tiny COCO-format set built here, with real pycocotools and PIL."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import yaml

from mlperf.datasets import verify as verifying
from mlperf.datasets import load_manifest
from tests.conftest import run_invoke

N_IMAGES = 4


def make_coco(root: Path, split: str = "val2017", n: int = N_IMAGES) -> None:
    """n small JPEGs and an instances JSON with 2 categories and one box per image."""
    from PIL import Image

    (root / split).mkdir(parents=True)
    (root / "annotations").mkdir(exist_ok=True)
    images, anns = [], []
    for i in range(1, n + 1):
        name = f"{i:012d}.jpg"
        Image.new("RGB", (16, 12), (i * 40, 0, 0)).save(root / split / name)
        images.append({"id": i, "file_name": name, "width": 16, "height": 12})
        anns.append({"id": 100 + i, "image_id": i, "category_id": 1 + i % 2, "bbox": [1, 1, 5, 5],
                     "area": 25, "iscrowd": 0, "segmentation": [[1, 1, 6, 1, 6, 6, 1, 6]]})
    doc = {"images": images, "annotations": anns,
           "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}
    (root / f"annotations/instances_{split}.json").write_text(json.dumps(doc))


@pytest.fixture
def dataset(tmp_path):
    """data/tiny: the COCO split plus two 'archives' in downloads/, and its manifest."""
    root = tmp_path / "data/tiny"
    make_coco(root)
    downloads = root / "downloads"
    downloads.mkdir()
    files = []
    for name, size in (("one.bin", 3_000_000), ("two.bin", 1_000_001)):
        payload = os.urandom(size)
        (downloads / name).write_bytes(payload)
        files.append({"name": name, "url": f"http://127.0.0.1/{name}",
                      "md5": hashlib.md5(payload).hexdigest(), "size": size})
    manifest = tmp_path / "tiny.yaml"
    manifest.write_text(yaml.safe_dump({
        "name": "tiny", "files": files, "categories": 2,
        "splits": {"val": {"images": "val2017", "annotations": "annotations/instances_val2017.json",
                           "count": N_IMAGES}}}))
    return root, manifest


def verify(manifest: Path, root: Path, *extra: str):
    return run_invoke(["verify", "--manifest", str(manifest), "--data-dir", str(root.parent), *extra])


def test_passes_prints_table_and_stamps(dataset):
    root, manifest = dataset
    proc = verify(manifest, root)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    header = next(line for line in lines if line.startswith("check"))
    assert header.split() == ["check", "expected", "found", "status"]
    rows = {line.split("  ")[0]: line for line in lines}
    assert rows["md5 one.bin"].endswith("ok")
    for check in ("val images (instances_val2017.json)", "val categories", "val annotation ids unique",
                  "val image files (val2017/)"):
        assert check in rows and rows[check].rstrip().endswith("ok"), check
    assert f"{N_IMAGES}" in rows["val images (instances_val2017.json)"]

    ds = load_manifest(manifest)
    assert verifying.is_verified(ds, root.parent)
    (root / "annotations/instances_val2017.json").write_text("{}")  # changed since: stamp void
    assert not verifying.is_verified(ds, root.parent)


def test_unchanged_archives_are_not_hashed_again_unless_forced(dataset):
    root, manifest = dataset
    assert verify(manifest, root).returncode == 0
    again = verify(manifest, root)
    assert again.returncode == 0 and again.stdout.count("(unchanged, not re-hashed)") == 2
    forced = verify(manifest, root, "--force")
    assert forced.returncode == 0 and "not re-hashed" not in forced.stdout


def test_corrupted_archive_fails_naming_it(dataset):
    root, manifest = dataset
    assert verify(manifest, root).returncode == 0
    target = root / "downloads/two.bin"
    data = bytearray(target.read_bytes())
    data[500_000] ^= 0xFF
    target.write_bytes(bytes(data))  # same size, new mtime: the record no longer applies
    proc = verify(manifest, root)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "two.bin is damaged" in proc.stderr and hashlib.md5(data).hexdigest() in proc.stderr
    assert "FAIL" in proc.stdout  # the table is printed before the error
    assert not verifying.is_verified(load_manifest(manifest), root.parent)


@pytest.mark.parametrize("damage, message", [
    ("missing image", "000000000002.jpg is missing"),
    ("empty image", "000000000003.jpg is empty"),
    ("duplicate annotation id", "annotation id 101 is used more than once"),
    ("wrong count", "lists 3 images, expected 4"),
    ("missing annotations", "instances_val2017.json is missing"),
])
def test_structure_failures(dataset, damage, message):
    root, manifest = dataset
    ann_path = root / "annotations/instances_val2017.json"
    doc = json.loads(ann_path.read_text())
    if damage == "missing image":
        (root / "val2017/000000000002.jpg").unlink()
    elif damage == "empty image":
        (root / "val2017/000000000003.jpg").write_bytes(b"")
    elif damage == "duplicate annotation id":
        doc["annotations"][1]["id"] = doc["annotations"][0]["id"]
    elif damage == "wrong count":
        doc["images"].pop()
        doc["annotations"].pop()
    elif damage == "missing annotations":
        ann_path.unlink()
    if ann_path.exists():
        ann_path.write_text(json.dumps(doc))
    proc = verify(manifest, root)
    assert proc.returncode == 1, proc.stdout
    assert message in proc.stderr and proc.stderr.strip().count("\n") == 0
    assert not (root / ".verified.json").exists()


def test_deep_decodes_every_image(dataset):
    root, manifest = dataset
    (root / "val2017/000000000004.jpg").write_bytes(b"not a jpeg at all")
    assert verify(manifest, root).returncode == 0  # present and non-empty is all the quick check asks
    deep = verify(manifest, root, "--deep")
    assert deep.returncode == 1 and "000000000004.jpg does not decode" in deep.stderr


def test_missing_dataset_is_one_line(tmp_path, dataset):
    _, manifest = dataset
    proc = run_invoke(["verify", "--manifest", str(manifest), "--data-dir", str(tmp_path / "nowhere")])
    assert proc.returncode == 1 and "run `invoke fetch" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_parallel_hashing_matches_hashlib(tmp_path, workers):
    """Files paused and resumed a slice at a time, several per thread: every digest still whole."""
    jobs = []
    sizes = [(2 * verifying.HASH_STEP + 12345, "md5"), (5_000_000, "md5"), (17, "md5"),
             (verifying.HASH_STEP + 1, "sha256"), (0, "md5")]
    for i, (size, algo) in enumerate(sizes):
        path = tmp_path / f"f{i}"
        path.write_bytes(os.urandom(size))
        jobs.append((path, algo))
    got = verifying.hash_files(jobs, workers=workers)
    assert got == [hashlib.new(a, p.read_bytes()).hexdigest() for p, a in jobs]
    assert verifying.hash_file(jobs[0][0]) == got[0]
