"""The shapes dataset: deterministic bytes, valid COCO, masks that match boxes, areas and occlusion."""
from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from mlperf.errors import UserError
from mlperf.datasets.shapes import STAMP_NAME, make_shapes

ARGS = dict(train_images=24, val_images=8, image_size=96, seed=3)


def tree(root: Path) -> dict[str, bytes]:
    return {str(path.relative_to(root)): path.read_bytes()
            for path in sorted(root.rglob("*")) if path.is_file()}


def load(root: Path, folder: str) -> COCO:
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(root / "annotations" / f"instances_{folder}.json"))


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data") / "shapes"
    make_shapes(root, **ARGS, workers=1)
    return root


def test_same_arguments_same_bytes_in_one_process_or_a_pool(shapes, tmp_path):
    again = tmp_path / "again"
    make_shapes(again, **ARGS, workers=2)
    assert tree(again) == tree(shapes)
    other = tmp_path / "other"
    make_shapes(other, **{**ARGS, "seed": 4}, workers=1)
    assert tree(other)["train2017/000000000001.jpg"] != tree(shapes)["train2017/000000000001.jpg"]


def test_layout_counts_ids_and_image_sizes(shapes):
    for folder, count in (("train2017", ARGS["train_images"]), ("val2017", ARGS["val_images"])):
        coco = load(shapes, folder)
        raw = json.loads((shapes / "annotations" / f"instances_{folder}.json").read_text())
        assert set(raw) == {"info", "licenses", "images", "annotations", "categories"}
        assert [(c["id"], c["name"]) for c in raw["categories"]] == \
            [(1, "circle"), (2, "square"), (3, "triangle")]
        assert len(coco.imgs) == count == len({i["id"] for i in raw["images"]})
        assert len({a["id"] for a in raw["annotations"]}) == len(raw["annotations"])
        assert sorted(p.name for p in (shapes / folder).iterdir()) == \
            sorted(i["file_name"] for i in raw["images"])
        shapes_seen = set()
        for info in raw["images"]:
            with Image.open(shapes / folder / info["file_name"]) as image:
                assert image.format == "JPEG" and image.size == (info["width"], info["height"])
            for side in (info["width"], info["height"]):
                assert 0.75 * ARGS["image_size"] - 1 <= side <= ARGS["image_size"]
            shapes_seen.add((info["width"] > info["height"], info["width"] < info["height"]))
            assert 1 <= len(coco.getAnnIds(imgIds=info["id"])) <= 6
        assert len(shapes_seen) >= 2, "both landscape and portrait images"
        assert {a["category_id"] for a in raw["annotations"]} == {1, 2, 3}


def test_masks_areas_boxes_and_occlusion(shapes):
    coco = load(shapes, "train2017")
    touching = 0
    for image_id in coco.getImgIds():
        anns = coco.loadAnns(coco.getAnnIds(imgIds=image_id))
        masks = []
        for ann in anns:
            assert ann["iscrowd"] == 0 and isinstance(ann["segmentation"]["counts"], str)
            mask = coco.annToMask(ann)
            ys, xs = np.nonzero(mask)
            assert ann["area"] == mask.sum() >= 30
            assert ann["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
            masks.append(mask.astype(bool))
        # Visible parts only: no pixel belongs to two instances.
        assert (np.sum(masks, axis=0) <= 1).all()
        # Count instances whose visible part borders another's: real occlusions happened.
        for i, first in enumerate(masks):
            grown = first.copy()
            grown[1:] |= first[:-1]
            grown[:-1] |= first[1:]
            grown[:, 1:] |= first[:, :-1]
            grown[:, :-1] |= first[:, 1:]
            touching += sum(bool((grown & other).any()) for other in masks[i + 1:])
    assert touching >= 3


def test_shapes_are_painted_where_their_masks_say(shapes):
    """The pixels under a mask are one flat colour (noise and JPEG aside), unlike the ring around it."""
    coco = load(shapes, "val2017")
    for image_id in coco.getImgIds():
        info = coco.imgs[image_id]
        pixels = np.asarray(Image.open(shapes / "val2017" / info["file_name"]), dtype=np.float32)
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=image_id)):
            mask = coco.annToMask(ann).astype(bool)
            core = mask.copy()  # away from the edges JPEG blurs
            for axis in (0, 1):
                for shift in (-2, 2):
                    core &= np.roll(mask, shift, axis=axis)
            if core.sum() >= 20:
                assert pixels[core].std(axis=0).max() < 15


def test_stamp_makes_a_repeat_a_no_op(shapes):
    stamp = json.loads((shapes / STAMP_NAME).read_text())
    assert {key: stamp[key] for key in ARGS} == ARGS
    before = {path: path.stat().st_mtime_ns for path in shapes.rglob("*")}
    make_shapes(shapes, **ARGS)
    assert {path: path.stat().st_mtime_ns for path in shapes.rglob("*")} == before
    assert not [p for p in shapes.parent.iterdir() if ".tmp-" in p.name]


def test_other_arguments_or_a_foreign_folder_are_user_errors(shapes, tmp_path):
    with pytest.raises(UserError, match=r"image_size 96 \(asked 128\).*--data-dir.*delete"):
        make_shapes(shapes, **{**ARGS, "image_size": 128})
    assert (shapes / STAMP_NAME).is_file()  # the existing set is left alone
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="not a shapes dataset"):
        make_shapes(foreign, **ARGS)
    assert (foreign / "keep.txt").read_text() == "mine"
    with pytest.raises(UserError, match="train_images"):
        make_shapes(tmp_path / "bad", **{**ARGS, "train_images": 0})
    empty = tmp_path / "empty"
    empty.mkdir()
    make_shapes(empty, train_images=1, val_images=1, image_size=64, seed=0)
    assert (empty / STAMP_NAME).is_file()


def test_a_failed_run_leaves_nothing_behind(tmp_path, monkeypatch):
    import mlperf.datasets.shapes as synthetic

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(synthetic, "_coco_dict", broken)
    with pytest.raises(RuntimeError):
        make_shapes(tmp_path / "shapes", **ARGS)
    assert list(tmp_path.iterdir()) == []


def test_rle_round_trip_matches_pycocotools_encode(shapes):
    coco = load(shapes, "val2017")
    ann = coco.loadAnns(coco.getAnnIds())[0]
    mask = coco.annToMask(ann)
    encoded = mask_utils.encode(np.asfortranarray(mask))
    assert encoded["counts"].decode("ascii") == ann["segmentation"]["counts"]
