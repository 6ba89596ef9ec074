"""`invoke verify` on a tiny COCO-format set built here, with real pycocotools and PIL."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from mlperf.datasets import hashing
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
    image = root / "val2017/000000000004.jpg"
    data = image.read_bytes()
    image.write_bytes(data[:data.index(b"\xff\xda") + 20])  # headers whole, the image data cut off
    assert verify(manifest, root).returncode == 0  # the quick check reads the headers only
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
    sizes = [(2 * hashing.HASH_STEP + 12345, "md5"), (5_000_000, "md5"), (17, "md5"),
             (hashing.HASH_STEP + 1, "sha256"), (0, "md5")]
    for i, (size, algo) in enumerate(sizes):
        path = tmp_path / f"f{i}"
        path.write_bytes(os.urandom(size))
        jobs.append((path, algo))
    got = hashing.hash_files(jobs, workers=workers)
    assert got == [hashlib.new(a, p.read_bytes()).hexdigest() for p, a in jobs]
    assert hashing.hash_file(jobs[0][0]) == got[0]


@pytest.fixture
def read_only_view(tmp_path):
    """`make(folder)` gives a view of `folder` that cannot be written, as a shared read-only vfolder:
    a read-only bind mount as root (chmod stops no root process), the folder made a-w otherwise."""
    mounted, locked = [], []

    def make(folder: Path) -> Path:
        if os.geteuid() != 0:
            locked.extend(p for p in [folder, *folder.rglob("*")] if p.is_dir())
            for p in locked:
                p.chmod(0o555)
            return folder
        view = tmp_path / "read-only"
        view.mkdir()
        for cmd in (["mount", "--bind", str(folder), str(view)], ["mount", "-o", "remount,ro,bind", str(view)]):
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode:
                pytest.skip(f"cannot make a read-only bind mount here: {proc.stderr.strip()}")
            mounted[:] = [view]
        return view

    yield make
    for view in mounted:
        subprocess.run(["umount", "-l", str(view)], check=True)
    for p in locked:
        p.chmod(0o755)


def test_read_only_dataset_verifies_with_its_records_in_the_cache(dataset, read_only_view, tmp_path,
                                                                  monkeypatch):
    root, manifest = dataset
    view = read_only_view(root.parent) / root.name
    cache = tmp_path / "cache"
    env = {"XDG_CACHE_HOME": str(cache)}
    args = ["verify", "--manifest", str(manifest), "--data-dir", str(view.parent)]
    first = run_invoke(args, env=env)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "is read-only, so the stamp is in" in first.stdout
    assert not (root / ".verified.json").exists() and not (root / "downloads/.state.json").exists()
    again = run_invoke(args, env=env)  # the digests recorded in the cache are used
    assert again.returncode == 0 and again.stdout.count("(unchanged, not re-hashed)") == 2

    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    ds = load_manifest(manifest)
    assert verifying.is_verified(ds, view.parent)  # what `invoke train` asks
    (root / "val2017/000000000001.jpg").unlink()  # changed underneath (the writable side)
    assert not verifying.is_verified(ds, view.parent)


def test_a_stamp_must_cover_what_it_claims(dataset):
    root, manifest = dataset
    assert verify(manifest, root).returncode == 0
    ds = load_manifest(manifest)
    stamp = json.loads((root / ".verified.json").read_text())
    (root / ".verified.json").write_text(json.dumps({**stamp, "files": {}}))  # claims nothing to check
    for image in (root / "val2017").iterdir():
        image.unlink()
    assert not verifying.is_verified(ds, root.parent)
    (root / ".verified.json").write_text(json.dumps({**stamp, "files": []}))  # wrong shape: not trusted
    assert not verifying.is_verified(ds, root.parent)


def test_a_damaged_state_file_is_hashed_again(dataset):
    root, manifest = dataset
    assert verify(manifest, root).returncode == 0
    (root / "downloads/.state.json").write_text('{"files": ["one.bin"], "extracted": []}')
    proc = verify(manifest, root)
    assert proc.returncode == 0, proc.stderr
    assert "not re-hashed" not in proc.stdout  # nothing trusted from the damaged record
    assert isinstance(json.loads((root / "downloads/.state.json").read_text())["files"], dict)


def test_an_archive_never_unpacked_fails_verify(tmp_path):
    """No splits to catch it: only the record of the extraction says the archive's files are there."""
    import zipfile

    downloads = tmp_path / "data/set/downloads"
    downloads.mkdir(parents=True)
    with zipfile.ZipFile(downloads / "set.zip", "w") as zf:
        zf.writestr("files/a.txt", "a")
    manifest = tmp_path / "set.yaml"
    manifest.write_text(yaml.safe_dump({"name": "set", "files": [{
        "name": "set.zip", "url": "http://127.0.0.1/set.zip", "extract": True,
        "md5": hashlib.md5((downloads / "set.zip").read_bytes()).hexdigest()}]}))
    proc = verify(manifest, tmp_path / "data/set")
    assert proc.returncode == 1 and "set.zip is not unpacked" in proc.stderr and "Traceback" not in proc.stderr
    assert not verifying.is_verified(load_manifest(manifest), tmp_path / "data")
