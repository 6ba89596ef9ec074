"""Hostile manifests and hostile COCO sets (issue 27), through `invoke fetch` and `invoke verify`.

A manifest is a user's file and an annotation file is data: neither may exhaust memory, crash the
tool, print a terminal-reversing character raw, point training outside the dataset, or pass `verify`
with sizes, boxes or masks that make training allocate gigabytes or crash hours later. Every case is
one `error:` line and exit 1. Downloads go to a real HTTP server on 127.0.0.1 (tests/support/http_server.py).
"""
from __future__ import annotations

import hashlib
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mlperf.datasets import content
from mlperf.datasets import load_manifest, resolve
from mlperf.datasets import verify as verifying
from tests.conftest import ROOT, one_error_line, run_invoke
from tests.support.http_server import FileServer, make_file

BIDI = "\u202e"


def invoke_limited(args: list[str], memory: int = 1 << 30, timeout: float = 120) -> subprocess.CompletedProcess:
    """`invoke <args>` with its address space capped: a step that expands a YAML alias bomb dies of
    MemoryError there instead of taking the machine's memory."""
    def cap():
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))

    return subprocess.run([sys.executable, "-m", "invoke", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, preexec_fn=cap, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def manifest_text(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "m.yaml"
    path.write_text(text)
    return path


FILE = "files:\n  - name: x.bin\n    url: http://127.0.0.1:9/x.bin\n    md5: '" + "0" * 32 + "'\n"


def alias_bomb(field: str) -> str:
    """Nine levels of nine aliases each: 9**9 leaves from a few hundred bytes of YAML."""
    levels = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for prev, name in zip("abcdefgh", "bcdefghi"):
        levels.append(f"{name}: &{name} [" + ",".join([f"*{prev}"] * 9) + "]")
    return "name: mini\n" + "\n".join(f"x{line}" for line in levels) + "\n" + FILE.replace(
        "    md5: '" + "0" * 32 + "'\n", f"    {field}: *i\n")


def test_a_yaml_alias_bomb_is_one_line_in_bounded_memory(tmp_path):
    text = alias_bomb("md5")
    assert len(text.encode()) < 1000
    proc = invoke_limited(["fetch", "--manifest", str(manifest_text(tmp_path, text)),
                           "--data-dir", str(tmp_path / "data")])
    one_error_line(proc, "anchor or alias")
    assert not (tmp_path / "data").exists()


def test_any_anchor_or_alias_is_refused(tmp_path):
    text = "name: mini\ndescription: &d hello\n" + FILE + "generator_options: {x: *d}\n"
    proc = run_invoke(["verify", "--manifest", str(manifest_text(tmp_path, text)), "--data-dir", str(tmp_path)])
    one_error_line(proc, "anchor or alias", "line 2")


def test_a_manifest_nested_20000_deep_is_one_line(tmp_path):
    text = "name: mini\n" + FILE + "description: " + "[" * 20000 + "]" * 20000 + "\n"
    proc = run_invoke(["verify", "--manifest", str(manifest_text(tmp_path, text)), "--data-dir", str(tmp_path)])
    one_error_line(proc, "nested more than")


def test_an_oversized_manifest_is_one_line(tmp_path):
    text = "name: mini\n" + FILE + "description: '" + "x" * (2 << 20) + "'\n"
    one_error_line(run_invoke(["verify", "--manifest", str(manifest_text(tmp_path, text)), "--data-dir",
                               str(tmp_path)]), "larger than")


@pytest.mark.parametrize("value", ["[coco]", "{a: 1}", "7"])
def test_a_profile_that_is_not_a_name_is_one_line(tmp_path, value):
    text = f"name: mini\n{FILE}profile: {value}\n"
    proc = run_invoke(["fetch", "--manifest", str(manifest_text(tmp_path, text)), "--data-dir", str(tmp_path)])
    one_error_line(proc, "'profile' must be one of")


@pytest.mark.parametrize("where", ["file", "backbone", "split"])
def test_names_with_bidi_controls_are_refused_and_shown_escaped(tmp_path, where):
    name = f"evil{BIDI}gpj.bin"
    doc = {"name": "mini", "files": [{"name": "x.bin", "url": "http://127.0.0.1:9/x.bin", "md5": "0" * 32}]}
    if where == "file":
        doc["files"][0]["name"] = name
    elif where == "backbone":
        doc["backbone"] = name
    else:
        doc["splits"] = {"train": {"images": f"train{BIDI}", "annotations": "a.json"}}
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump(doc, allow_unicode=True))
    proc = run_invoke(["fetch", "--manifest", str(path), "--data-dir", str(tmp_path / "data")])
    line = one_error_line(proc, "\\u202e")
    assert BIDI not in proc.stdout + proc.stderr, line


def test_a_catalog_name_is_never_a_path(tmp_path):
    one_error_line(run_invoke(["verify", "--dataset", "../datasets/coco2017", "--data-dir", str(tmp_path)]),
                   "unknown dataset")


# ---------------------------------------------------------------- a user's COCO set, through `invoke verify`

W, H = 16, 12


def jpeg(width: int = W, height: int = H) -> bytes:
    """A small real JPEG; with another size its frame header is patched to claim it (a few hundred
    bytes that say width x height: what a loader worker would allocate)."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (W, H), (200, 10, 10)).save(buf, "JPEG")
    data = bytearray(buf.getvalue())
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(data)


def rle(height: int = H, width: int = W) -> dict:
    """A compressed COCO RLE of a box in an image of height x width, made by pycocotools."""
    import numpy as np
    from pycocotools import mask as mask_utils

    mask = np.zeros((height, width), dtype=np.uint8, order="F")
    mask[2:8, 3:9] = 1
    encoded = mask_utils.encode(mask)
    return {"size": [int(v) for v in encoded["size"]], "counts": encoded["counts"].decode("ascii")}


def coco_set(root: Path, n: int = 3) -> tuple[Path, dict]:
    """data/user: n images with polygons, a crowd RLE and a compressed RLE; returns (manifest, doc)."""
    (root / "val2017").mkdir(parents=True)
    (root / "annotations").mkdir()
    images, anns = [], []
    for i in range(1, n + 1):
        (root / "val2017" / f"{i}.jpg").write_bytes(jpeg())
        images.append({"id": i, "file_name": f"{i}.jpg", "width": W, "height": H})
        anns.append({"id": 10 * i, "image_id": i, "category_id": 1, "iscrowd": 0, "area": 25.0,
                     "bbox": [1.0, 1.0, 5.0, 5.0], "segmentation": [[1, 1, 6, 1, 6, 6, 1, 6]]})
    anns.append({"id": 1000, "image_id": 1, "category_id": 2, "iscrowd": 1, "area": 36,
                 "bbox": [3, 2, 6, 6], "segmentation": {"size": [H, W], "counts": [50, 6, 6, 6, 6, 6, 112]}})
    anns.append({"id": 1001, "image_id": 2, "category_id": 2, "iscrowd": 0, "area": 36,
                 "bbox": [3, 2, 6, 6], "segmentation": rle()})
    doc = {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}
    manifest = root.parent.parent / "user.yaml"
    manifest.write_text(yaml.safe_dump({"name": "user", "files": [], "generator": "shapes", "categories": 2,
                                        "splits": {"val": {"images": "val2017",
                                                           "annotations": "annotations/val.json", "count": n}}}))
    return manifest, doc


def verify_set(manifest: Path, root: Path, doc: dict, *extra: str):
    (root / "annotations/val.json").write_text(json.dumps(doc))
    return run_invoke(["verify", "--manifest", str(manifest), "--data-dir", str(root.parent), *extra])


@pytest.fixture
def user_set(tmp_path):
    root = tmp_path / "data/user"
    manifest, doc = coco_set(root)
    return manifest, root, doc


def test_a_sound_set_with_polygons_and_both_rle_kinds_passes(user_set, tmp_path):
    manifest, root, doc = user_set
    assert sum(doc["annotations"][-2]["segmentation"]["counts"]) == H * W  # the crowd RLE is whole
    proc = verify_set(manifest, root, doc)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for row in ("val image entries", "val image files (val2017/)", "val image sizes (JPEG headers)",
                "val annotations usable"):
        assert any(line.startswith(row) and line.rstrip().endswith("ok") for line in proc.stdout.splitlines()), row
    # an image folder that is a link to the images elsewhere (a shared store) is still inside the set
    elsewhere = tmp_path / "store"
    (root / "val2017").rename(elsewhere)
    (root / "val2017").symlink_to(elsewhere)
    assert verify_set(manifest, root, doc).returncode == 0


def test_rle_string_total_decodes_what_pycocotools_encodes():
    import numpy as np
    from pycocotools import mask as mask_utils

    rng = np.random.default_rng(0)
    for height, width in ((1, 1), (12, 16), (97, 131), (640, 480)):
        mask = np.asfortranarray((rng.random((height, width)) < 0.3).astype(np.uint8))
        counts = mask_utils.encode(mask)["counts"].decode("ascii")
        assert content.rle_string_total(counts) == height * width
    assert content.rle_string_total("0" * 3 + "\x7f") is None  # outside the alphabet
    assert content.rle_string_total("a") is None  # cut off mid-number (continuation bit set)


def edit(doc: dict, case: str, root: Path, tmp_path: Path) -> None:
    """Damage a sound set the way `case` says."""
    image, ann = doc["images"][0], doc["annotations"][0]
    if case == "rle 40000x40000":
        doc["annotations"][-1]["segmentation"] = rle(40000, 40000)
    elif case == "rle one column short":
        doc["annotations"][-1]["segmentation"] = rle(H, W - 1)
    elif case == "rle counts short":
        doc["annotations"][-2]["segmentation"]["counts"][-1] -= 1
    elif case == "jpeg header 50000x50000":
        (root / "val2017/1.jpg").write_bytes(jpeg(50000, 50000))
        image.update(width=50000, height=50000)
        for a in doc["annotations"]:  # masks sized to match, so only the pixel limit is left to catch it
            if a["image_id"] == 1 and isinstance(a["segmentation"], dict):
                a["segmentation"] = {"size": [50000, 50000], "counts": [50000 * 50000]}
    elif case == "jpeg header disagrees":
        (root / "val2017/1.jpg").write_bytes(jpeg(50000, 50000))
    elif case == "png":
        from PIL import Image

        Image.new("RGB", (W, H)).save(root / "val2017/1.jpg", "PNG")
    elif case == "one-point polygon":
        ann["segmentation"] = [[3, 3]]
    elif case == "odd polygon":
        ann["segmentation"] = [[1, 1, 6, 1, 6, 6, 1]]
    elif case == "polygon with text":
        ann["segmentation"] = [[1, 1, 6, 1, 6, "6"]]
    elif case in ("bbox NaN", "bbox Infinity"):
        ann["bbox"] = [1.0, 1.0, float(case.split()[1].replace("Infinity", "inf")), 5.0]
    elif case == "bbox short":
        ann["bbox"] = [1, 1, 5]
    elif case == "unknown category":
        ann["category_id"] = 99
    elif case == "file_name null":
        image["file_name"] = None
    elif case == "file_name ../../../etc/hostname":
        image["file_name"] = "../../../etc/hostname"
    elif case == "file_name absolute":
        image["file_name"] = "/etc/hostname"
    elif case == "file_name bidi":
        image["file_name"] = f"1{BIDI}gpj.jpg"
    elif case == "image a link outside":
        outside = tmp_path / "secret.jpg"
        outside.write_bytes(jpeg())
        (root / "val2017/1.jpg").unlink()
        (root / "val2017/1.jpg").symlink_to(outside)
    elif case == "width a text":
        image["width"] = "16"
    else:
        raise AssertionError(case)


HOSTILE_SETS = [
    ("rle 40000x40000", "RLE of size 40000x40000"),
    ("rle one column short", f"RLE of size {H}x{W - 1} (height x width) on an image of {H}x{W}"),
    ("rle counts short", f"RLE counts covering {H * W - 1} pixels"),
    ("jpeg header 50000x50000", "more than the 67108864 pixels"),
    ("jpeg header disagrees", f"is 50000x50000 by its JPEG header, the annotations say {W}x{H}"),
    ("png", "is not a JPEG"),
    ("one-point polygon", "polygon that is not at least three points"),
    ("odd polygon", "polygon that is not at least three points"),
    ("polygon with text", "polygon that is not at least three points"),
    ("bbox NaN", "that is not [x, y, width, height] of finite numbers"),
    ("bbox Infinity", "that is not [x, y, width, height] of finite numbers"),
    ("bbox short", "that is not [x, y, width, height]"),
    ("unknown category", "category_id 99 that is not one of the categories"),
    ("file_name null", "file_name None is not a non-empty text"),
    ("file_name ../../../etc/hostname", "is not a plain file name"),
    ("file_name absolute", "is absolute"),
    ("file_name bidi", "\\u202e"),
    ("image a link outside", "leads outside"),
    ("width a text", "are not whole numbers above 0"),
]


@pytest.mark.slow
@pytest.mark.parametrize("case, message", HOSTILE_SETS, ids=[c for c, _ in HOSTILE_SETS])
def test_a_set_that_would_crash_or_exhaust_training_fails_verify(user_set, tmp_path, case, message):
    manifest, root, doc = user_set
    edit(doc, case, root, tmp_path)
    proc = verify_set(manifest, root, doc)
    line = one_error_line(proc, message)
    assert BIDI not in proc.stdout + proc.stderr, line
    assert "FAIL" in proc.stdout and not (root / ".verified.json").exists()


def test_a_set_verified_by_an_older_verify_is_checked_again(user_set):
    """A stamp says which checks it stands for: one made before these checks existed is void."""
    manifest, root, doc = user_set
    assert verify_set(manifest, root, doc).returncode == 0
    ds = load_manifest(manifest)
    assert verifying.is_verified(ds, root.parent)
    stamp = json.loads((root / ".verified.json").read_text())
    stamp["manifest"].pop("checks")
    (root / ".verified.json").write_text(json.dumps(stamp))
    assert not verifying.is_verified(ds, root.parent)


# ---------------------------------------------------------------- a checksum its publisher keeps beside the file

def published_manifest(tmp_path: Path, srv: FileServer, **extra) -> Path:
    path = tmp_path / "weights.yaml"
    path.write_text(yaml.safe_dump({"name": "weights", "backbone": "R-50.pkl", "files": [
        {"name": "R-50.pkl", "url": srv.url("R-50.pkl"), "md5_url": srv.url("R-50.pkl.md5sum"), **extra}]}))
    return path


def test_an_md5_published_beside_the_file_is_read_once_and_checked(tmp_path):
    """Detectron keeps each file's md5 at `<url>.md5sum` (what its own download checks); fetch reads
    it, checks the download against it and records it, so verify and train need no network."""
    served = tmp_path / "srv"
    served.mkdir()
    data = make_file(served / "R-50.pkl", 200_000)
    (served / "R-50.pkl.md5sum").write_text(hashlib.md5(data).hexdigest() + "\n")
    with FileServer(served) as srv:
        manifest = published_manifest(tmp_path, srv)
        args = ["--manifest", str(manifest), "--data-dir", str(tmp_path / "data")]
        first = run_invoke(["fetch", *args])
        assert first.returncode == 0, first.stderr
        assert sorted(r.path for r in srv.requests) == ["R-50.pkl", "R-50.pkl.md5sum"]
        assert run_invoke(["fetch", *args]).returncode == 0
        assert len(srv.requests) == 2  # the md5 was recorded: nothing asked again
    proc = run_invoke(["verify", *args])  # the server is gone: verify needs none
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert hashlib.md5(data).hexdigest() in proc.stdout
    assert verifying.is_verified(load_manifest(manifest), tmp_path / "data")


@pytest.mark.parametrize("published, message, then", [
    ("0" * 32 + "  R-50.pkl\n", "mismatch after two downloads", "R-50.pkl is missing"),
    ("<html>not found</html>", "is not an md5 (32 hex digits)", "has not been read: run `invoke fetch`"),
    (None, "HTTP 404", "has not been read: run `invoke fetch`"),
])
def test_a_wrong_or_missing_published_md5_is_one_line(tmp_path, published, message, then):
    served = tmp_path / "srv"
    served.mkdir()
    make_file(served / "R-50.pkl", 50_000)
    if published is not None:
        (served / "R-50.pkl.md5sum").write_text(published)
    with FileServer(served) as srv:
        args = ["--manifest", str(published_manifest(tmp_path, srv)), "--data-dir", str(tmp_path / "data")]
        one_error_line(run_invoke(["fetch", *args], env={"MLPERF_FETCH_BACKOFF": "0.01"}), message)
    assert not (tmp_path / "data/weights/downloads/R-50.pkl").exists()
    one_error_line(run_invoke(["verify", *args]), then)


def test_a_checksum_and_md5_url_together_are_refused(tmp_path):
    with FileServer(tmp_path) as srv:
        manifest = published_manifest(tmp_path, srv, md5="0" * 32)
    one_error_line(run_invoke(["fetch", "--manifest", str(manifest), "--data-dir", str(tmp_path)]), "keep one")


def test_the_closed_profile_starts_from_detectrons_msra_r50():
    ds = resolve("coco2017")
    [spec] = [f for f in ds.files if f.name == ds.backbone]
    assert ds.backbone == "R-50.pkl"
    assert spec.url == "https://dl.fbaipublicfiles.com/detectron/ImageNetPretrained/MSRA/R-50.pkl"
    assert spec.md5_url == spec.url + ".md5sum" and not spec.extract
    assert not any("resnet50" in f.name for f in ds.files)
