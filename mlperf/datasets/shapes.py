"""The synthetic "shapes" dataset: filled circles, squares and triangles, written as COCO 2017.

A small detection and segmentation set made locally (no network), so the whole benchmark can run
on a CPU, in tests and as a quick convergence check on a GPU. Every image is drawn from its own
numpy Generator seeded by (seed, split, index): the output is byte-identical for the same
arguments and the images can be drawn in any order, in parallel. Later shapes occlude earlier
ones; the masks are the visible parts, as exact RLE, and boxes and areas come from those masks.

No torch here: `invoke fetch --dataset shapes` calls this without the trainer's dependencies.
"""
from __future__ import annotations

import colorsys
import concurrent.futures
import json
import multiprocessing
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

from mlperf.errors import UserError
from mlperf.files import rename

# Bump when the drawing or the file layout changes, so an old folder is not taken as current.
FORMAT_VERSION = 1
STAMP_NAME = ".shapes.json"
CATEGORIES = [
    {"id": 1, "name": "circle", "supercategory": "shape"},
    {"id": 2, "name": "square", "supercategory": "shape"},
    {"id": 3, "name": "triangle", "supercategory": "shape"},
]
SPLITS = {"train": ("train2017", 0), "val": ("val2017", 1)}  # name -> (folder, seed stream)

# layout "coco": COCO 2017's image shapes and category ids, for measuring speed where the shapes of
# the real data decide it (padding, the loader, evaluation at 5000 images). COCO's train images are
# 640 on the long side: (height, width) landscape 4:3 (the most common), 3:2, 5:4, 16:9, with weights
# that approximate how often they occur; a quarter are portrait, the same turned.
COCO_SHAPES = ((480, 640), (427, 640), (512, 640), (360, 640))
COCO_WEIGHTS = (0.55, 0.25, 0.1, 0.1)
PORTRAIT_SHARE = 0.25
COCO_INSTANCES = (1, 20)
# COCO's 80 category ids: 1-90 less the ten its papers list but the data never uses.
COCO_CATEGORY_IDS = tuple(i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83))
# ... and its annotations' format: instances as polygons (COCO's own for everything but crowds), here each
# shape's whole outline in OUTLINE_POINTS points, tens as COCO's polygons have.
COCO_SEGMENTATION = "polygons"
OUTLINE_POINTS = 32
COCO_CATEGORIES = [{"id": i, "name": f"{('circle', 'square', 'triangle')[n % 3]}-{i}", "supercategory": "shape"}
                   for n, i in enumerate(COCO_CATEGORY_IDS)]
LAYOUTS = ("square", "coco")

MAX_INSTANCES = 6
SIZE_RANGE = (0.08, 0.45)        # shape extent (diameter of its circumscribed circle) / image side
SIDE_RANGE = (0.75, 1.0)         # width and height, each, / image_size
MIN_VISIBLE_PIXELS = 30          # smaller visible remnants are dropped: nothing a model could learn
MIN_VISIBLE_FRACTION = 0.4       # shapes mostly hidden by later ones are dropped
MIN_COLOUR_DISTANCE = 90.0       # RGB distance from the background and from the other shapes
JPEG_QUALITY = 90
IMAGES_PER_WORKER = 128          # below this a process pool costs more than it saves


def make_shapes(root: Path, *, train_images: int, val_images: int, image_size: int, seed: int,
                workers: int | None = None, layout: str = "square") -> None:
    """Write the shapes dataset to `root` in the COCO 2017 layout, unless it is already there.

    root/train2017/*.jpg, root/val2017/*.jpg, root/annotations/instances_{train,val}2017.json and
    root/.shapes.json (the arguments, written last). The set is drawn in a hidden sibling folder
    and renamed into place, so `root` is either absent or complete. A complete `root` made with
    the same arguments is left as it is; one made with other arguments is a UserError.
    `workers`: processes to draw with (default: the CPU count, for large sets only).
    `layout`: "square" (the demo: three categories, near-square images of `image_size`) or "coco"
    (COCO's image shapes with `image_size` the long side, its 80 category ids, 1-20 instances).
    """
    root = Path(root)
    for name, value, least in (("train_images", train_images, 1), ("val_images", val_images, 1),
                               ("image_size", image_size, 32), ("seed", seed, 0)):
        if not isinstance(value, int) or value < least:
            raise UserError(f"shapes dataset: {name} must be an integer >= {least}, not {value!r}")
    if layout not in LAYOUTS:
        raise UserError(f"shapes dataset: layout must be one of {', '.join(LAYOUTS)}, not {layout!r}")
    wanted = {"generator": "shapes", "format": FORMAT_VERSION, "train_images": train_images,
              "val_images": val_images, "image_size": image_size, "seed": seed}
    if layout != "square":  # stamps of the square sets made before layouts existed stay valid
        wanted["layout"] = layout
    if layout == "coco":
        wanted["segmentation"] = COCO_SEGMENTATION
    if _existing_is_complete(root, wanted):
        return

    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp's 0700 would hide the data from a container's other user
        (tmp / "annotations").mkdir()
        counts = {"train": train_images, "val": val_images}
        jobs = []  # both splits in one pool: a pool costs a second or so to start
        for split, (folder, stream) in SPLITS.items():
            (tmp / folder).mkdir()
            jobs += [(str(tmp / folder), seed, stream, index, image_size, layout)
                     for index in range(counts[split])]
        drawn = _run_all(jobs, workers)
        for split, (folder, _) in SPLITS.items():
            mine, drawn = drawn[:counts[split]], drawn[counts[split]:]
            _write_json(tmp / "annotations" / f"instances_{folder}.json", _coco_dict(split, mine, layout))
        _write_json(tmp / STAMP_NAME, wanted)
        if root.is_dir() and not any(root.iterdir()):
            root.rmdir()  # an empty folder (made by hand, or by a caller) holds nothing to keep
        try:
            rename(tmp, root)
        except OSError:
            # Someone else finished the same set first: theirs is as good as ours.
            if _existing_is_complete(root, wanted):
                return
            raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _existing_is_complete(root: Path, wanted: dict) -> bool:
    """True if `root` holds the set `wanted` describes; False if absent or empty; else UserError."""
    if not root.exists() or (root.is_dir() and not any(root.iterdir())):
        return False
    stamp = root / STAMP_NAME
    if not stamp.is_file():
        raise UserError(f"{root} exists but is not a shapes dataset (no {STAMP_NAME}): "
                        f"use a different --data-dir, or delete {root}")
    try:
        found = json.loads(stamp.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{stamp} is unreadable ({exc}): delete {root} to make the set again") from None
    if found != wanted:
        differ = ", ".join(f"{key} {found.get(key)!r} (asked {value!r})"
                           for key, value in wanted.items() if found.get(key) != value)
        raise UserError(f"{root} holds a shapes dataset made with other arguments: {differ}; "
                        f"use a different --data-dir, or delete {root} to make it again")
    return True


def _run_all(jobs: list[tuple], workers: int | None) -> list[tuple]:
    """Draw every image, in order; with a process pool when the set is large enough to gain."""
    if workers is None:
        workers = min(os.cpu_count() or 1, max(1, len(jobs) // IMAGES_PER_WORKER))
    if workers <= 1:
        return [_draw_and_save(*job) for job in jobs]
    # spawn, not fork: a caller may hold threads (torch, tqdm) that fork would copy mid-flight.
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
        chunk = max(1, len(jobs) // (workers * 8))
        return list(pool.map(_draw_and_save_job, jobs, chunksize=chunk))


def _draw_and_save_job(job: tuple) -> tuple:
    return _draw_and_save(*job)


def _draw_and_save(folder: str, seed: int, stream: int, index: int, image_size: int,
                   layout: str = "square") -> tuple:
    """Draw image `index` of a split, write its JPEG, return (id, name, width, height, instances)."""
    image_id = index + 1
    file_name = f"{image_id:012d}.jpg"
    rng = np.random.default_rng([seed, stream, index])
    pixels, instances = draw_image(rng, image_size, layout)
    Image.fromarray(pixels).save(os.path.join(folder, file_name), quality=JPEG_QUALITY)
    height, width = pixels.shape[:2]
    return image_id, file_name, width, height, instances


def _image_plan(rng: np.random.Generator, image_size: int, layout: str) -> tuple[int, int, int, list[int]]:
    """(width, height, instances, category ids) of one image in `layout`."""
    if layout == "coco":
        height, width = COCO_SHAPES[int(rng.choice(len(COCO_SHAPES), p=COCO_WEIGHTS))]
        height, width = round(height * image_size / 640), round(width * image_size / 640)
        if rng.random() < PORTRAIT_SHARE:
            height, width = width, height
        return width, height, int(rng.integers(COCO_INSTANCES[0], COCO_INSTANCES[1] + 1)), list(COCO_CATEGORY_IDS)
    width, height = (int(round(rng.uniform(*SIDE_RANGE) * image_size)) for _ in range(2))
    return width, height, int(rng.integers(1, MAX_INSTANCES + 1)), [c["id"] for c in CATEGORIES]


def draw_image(rng: np.random.Generator, image_size: int, layout: str = "square") -> tuple[np.ndarray, list[dict]]:
    """One image (uint8 HxWx3) and its instances: category_id, RLE segmentation, area, bbox."""
    width, height, count, category_ids = _image_plan(rng, image_size, layout)
    background = _background(rng, width, height)
    side = min(width, height)

    shapes = []  # (category_id, full mask, colour) in drawing order: later ones cover earlier
    outlines = []  # each shape's outline [x, y, ...]: the "coco" layout's polygons
    for _ in range(count):
        pick = int(rng.integers(0, len(category_ids)))
        category_id = category_ids[pick]
        radius = rng.uniform(*SIZE_RANGE) * side / 2
        centre = (rng.uniform(radius, width - radius), rng.uniform(radius, height - radius))
        full, outline = _shape_mask(rng, pick % 3 + 1, centre, radius, width, height)
        if not full.any():
            continue
        under = background[int(centre[1]), int(centre[0])]  # gradients are smooth: centre will do
        colour = _distinct_colour(rng, [under] + [colour for _, _, colour in shapes])
        shapes.append((category_id, full, colour))
        outlines.append(outline)

    # Drop shapes left mostly hidden. Removing one only uncovers the others, so one pass suffices.
    visible = np.bincount(_label_map(shapes, width, height).ravel(), minlength=len(shapes) + 1)
    keep = [seen >= MIN_VISIBLE_PIXELS and seen >= MIN_VISIBLE_FRACTION * np.count_nonzero(shape[1])
            for shape, seen in zip(shapes, visible[1:])]
    kept = [shape for shape, k in zip(shapes, keep) if k]
    kept_outlines = [outline for outline, k in zip(outlines, keep) if k]
    label = _label_map(kept, width, height)

    palette = np.array([(0, 0, 0)] + [colour for _, _, colour in kept], dtype=np.float32)
    image = background
    np.copyto(image, np.take(palette, label, axis=0), where=(label > 0)[..., None])
    # Mild sensor-like noise, one value per pixel for all channels (a third of the drawing cost).
    image += rng.uniform(0.0, 6.0) * rng.standard_normal((height, width, 1), dtype=np.float32)
    pixels = np.clip(np.rint(image), 0, 255).astype(np.uint8)

    instances = []
    if kept:
        numbers = np.arange(1, len(kept) + 1, dtype=label.dtype)
        # (N, W, H) in C order is (H, W, N) in Fortran order: what encode wants, with no copy.
        by_column = np.ascontiguousarray(label.T)
        masks = (by_column[None] == numbers[:, None, None]).astype(np.uint8).transpose(2, 1, 0)
        rles = mask_utils.encode(masks)
        areas = mask_utils.area(rles)
        boxes = mask_utils.toBbox(rles)
        for (category_id, _, _), outline, rle, area, box in zip(kept, kept_outlines, rles, areas, boxes):
            # box and area of what is visible; the segmentation as RLE of it, or (coco) the outline
            segmentation = ([outline] if layout == "coco" else
                            {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")})
            instances.append({"category_id": category_id, "segmentation": segmentation,
                              "area": int(area), "bbox": [float(v) for v in box]})
    return pixels, instances


def _background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """float32 HxWx3: a solid colour, or a linear gradient between two colours, in any direction."""
    first = rng.uniform(0, 255, size=3).astype(np.float32)
    if rng.random() < 0.5:
        return np.broadcast_to(first, (height, width, 3)).copy()
    second = rng.uniform(0, 255, size=3).astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    # Position along the direction, 0..1 over the image: a sum of a row term and a column term.
    across_x = np.arange(width, dtype=np.float32) * np.float32(np.cos(angle))
    across_y = np.arange(height, dtype=np.float32) * np.float32(np.sin(angle))
    low = across_x.min() + across_y.min()
    span = max(float(across_x.max() + across_y.max() - low), 1.0)
    along = (across_y[:, None] - low) / span + across_x[None, :] / span
    return first + along[..., None] * (second - first)


def _shape_mask(rng: np.random.Generator, kind: int, centre: tuple[float, float],
                radius: float, width: int, height: int) -> tuple[np.ndarray, list[float]]:
    """bool HxW of one filled shape (kind 1 circle, 2 square, 3 triangle) inscribed in the circle
    (centre, radius), randomly turned, and its outline in OUTLINE_POINTS points [x, y, ...]."""
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    cx, cy = centre
    if kind == 1:
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=1)
        angles = 2 * np.pi * np.arange(OUTLINE_POINTS) / OUTLINE_POINTS
        points = np.stack([cx + radius * np.cos(angles), cy + radius * np.sin(angles)], axis=1)
    else:
        corners = 4 if kind == 2 else 3
        turn = rng.uniform(0, 2 * np.pi)
        angles = turn + 2 * np.pi * np.arange(corners) / corners
        if corners == 3:  # varied triangles, not only equilateral ones
            angles = angles + rng.uniform(-0.35, 0.35, size=3)
        corner_points = [(cx + radius * np.cos(a), cy + radius * np.sin(a)) for a in angles]
        draw.polygon(corner_points, fill=1)
        ends = np.array(corner_points + corner_points[:1])
        steps = np.linspace(0, corners, OUTLINE_POINTS, endpoint=False)  # points spread along the sides
        side, along = steps.astype(int), (steps % 1)[:, None]
        points = ends[side] + (ends[side + 1] - ends[side]) * along
    points[:, 0] = points[:, 0].clip(0, width)
    points[:, 1] = points[:, 1].clip(0, height)
    return np.asarray(canvas, dtype=bool), [round(float(v), 2) for v in points.reshape(-1)]


def _distinct_colour(rng: np.random.Generator, avoid: list[np.ndarray]) -> np.ndarray:
    """A saturated colour far from each of `avoid` (the best of a few draws if none is far)."""
    avoid = np.asarray(avoid, dtype=np.float32)
    best, best_distance = None, -1.0
    for _ in range(16):
        hue, saturation, value = rng.random(), rng.uniform(0.55, 1.0), rng.uniform(0.45, 1.0)
        colour = np.array(colorsys.hsv_to_rgb(hue, saturation, value), dtype=np.float32) * 255
        distance = float(np.sqrt(((avoid - colour) ** 2).sum(axis=1).min()))
        if distance >= MIN_COLOUR_DISTANCE:
            return colour
        if distance > best_distance:
            best, best_distance = colour, distance
    return best


def _label_map(shapes: list[tuple], width: int, height: int) -> np.ndarray:
    """int HxW: 0 for background, k for the pixels where shape k (1-based) is on top."""
    label = np.zeros((height, width), dtype=np.int32)
    for number, (_, full, _) in enumerate(shapes, start=1):
        label[full] = number
    return label


def _coco_dict(split: str, drawn: list[tuple], layout: str = "square") -> dict:
    """The instances_*.json content; annotation ids run 1.. over the whole file."""
    images, annotations = [], []
    for image_id, file_name, width, height, instances in drawn:
        images.append({"id": image_id, "file_name": file_name, "width": width, "height": height,
                       "license": 1})
        for instance in instances:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                "iscrowd": 0, **instance})
    return {
        "info": {"description": f"synthetic shapes ({split}), made by mlperf/datasets/shapes.py",
                 "version": str(FORMAT_VERSION)},
        "licenses": [{"id": 1, "name": "public domain (synthetic)", "url": ""}],
        "images": images,
        "annotations": annotations,
        "categories": COCO_CATEGORIES if layout == "coco" else CATEGORIES,
    }


def _write_json(path: Path, content: dict) -> None:
    with open(path, "w") as handle:
        json.dump(content, handle, separators=(",", ":"))
