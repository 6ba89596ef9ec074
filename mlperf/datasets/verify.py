"""`invoke verify`: archive checksums and the COCO structure of a dataset, as a table, stamped when
every check passes.

This module is the order of the checks and their report; what one image or annotation may be
(mlperf.datasets.content) and the archives' record shared with fetch (mlperf.datasets.state) are
jobs of their own, kept apart. <root>/.verified.json is written (atomically) only when every check
passed; `is_verified` compares it with the files' size/mtime, so the trainer's launcher can refuse
an unverified dataset without re-hashing. Where the dataset folder is read-only (a shared vfolder),
the stamp goes to the user's cache instead (state.cache_dir(), keyed by the folder's real path) and
is read from there.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from mlperf.datasets import Dataset, FileSpec, redact_url
from mlperf.datasets.content import MAX_PIXELS, annotation_problem, decode_image, header_problem, image_entry_problem
from mlperf.datasets.hashing import hash_files
from mlperf.datasets.state import elsewhere, extracted_entries, known_digest, record_digest, with_published, write_first
from mlperf.errors import UserError
from mlperf.files import read_json, shown, stat_key

CHECKS = 2                   # what a stamp promised; raised when verify checks more, so older stamps are void
STAMP_NAME = ".verified.json"
HEADER_THREADS = 16            # header reads wait on the disk, not the CPU: a cold disk serves many at once


class _Table:
    """Rows of (check, expected, found, ok) and the first failure's message."""

    def __init__(self):
        self.rows: list[tuple[str, str, str, bool]] = []
        self.failures: list[str] = []

    def add(self, check: str, expected, found, ok: bool, failure: str = "") -> bool:
        self.rows.append((check, str(expected), str(found), ok))
        if not ok:
            self.failures.append(failure or f"{check}: expected {expected}, found {found}")
        return ok

    def render(self) -> str:
        header = ("check", "expected", "found", "status")
        cells = [header] + [(c, e, f, "ok" if ok else "FAIL") for c, e, f, ok in self.rows]
        widths = [max(len(row[i]) for row in cells) for i in range(4)]
        lines = ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in cells]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines)


def _check_archives(ds: Dataset, data_dir: Path, table: _Table, force: bool) -> None:
    """Checksum every archive, hashing only those that changed since they were last hashed."""
    downloads = ds.downloads(data_dir)
    todo: list[FileSpec] = []
    known: dict[str, str] = {}
    for spec in ds.files:
        path = downloads / spec.name
        if spec.checksum[1] is None:
            table.add(f"md5 {spec.name}", f"published at {spec.md5_url}", "not read yet", False,
                      f"the md5 of {spec.name} published at {spec.md5_url} has not been read: run `invoke fetch`")
            continue
        if not path.is_file() and spec.extract and extracted_entries(ds, data_dir, spec) is not None:
            table.add(f"{spec.checksum[0]} {spec.name}", spec.checksum[1],
                      "matched before unpacking; archive since deleted", True)
            continue
        if not path.is_file():
            table.add(f"{spec.checksum[0]} {spec.name}", spec.checksum[1], "missing", False,
                      f"{path} is missing: run `invoke fetch`")
            continue
        digest = None if force else known_digest(ds, data_dir, spec)
        if digest is None:
            todo.append(spec)
        else:
            known[spec.name] = digest
    fresh = hash_files([(downloads / s.name, s.checksum[0]) for s in todo])
    for spec, digest in zip(todo, fresh):
        record_digest(ds, data_dir, spec, digest)
        known[spec.name] = digest
    for spec in ds.files:
        if spec.name not in known or spec.checksum[1] is None:
            continue
        algo, expected = spec.checksum
        found = known[spec.name]
        note = "" if spec in todo else " (unchanged, not re-hashed)"
        table.add(f"{algo} {spec.name}", expected, found + note, found == expected,
                  f"{downloads / spec.name} is damaged: {algo} {found}, expected {expected}; "
                  "run `invoke fetch` to download it again")

def _check_images(name: str, split, images_dir: Path, images: list, table: _Table) -> bool:
    """What the trainer trusts about each image: its name, size, file and JPEG header. True if all hold."""
    entries, checked = [], []
    for img in images:
        problem = image_entry_problem(images_dir, img)
        if problem:
            entries.append(problem)
        else:
            checked.append(img)
    table.add(f"{name} image entries", f"names inside {split.images}/, <= {MAX_PIXELS} px",
              f"{len(entries)} do not" if entries else f"{len(images)} do", not entries,
              f"{images_dir}: {entries[0]}" if entries else "")
    slices = [checked[i:i + 512] for i in range(0, len(checked), 512)]  # one task each: futures cost too
    with ThreadPoolExecutor(max_workers=HEADER_THREADS) as pool:
        folder = str(images_dir)
        found = [p for part in pool.map(lambda imgs: [header_problem(images_dir, folder, i) for i in imgs], slices)
                 for p in part if p]
    files = [text for kind, text in found if kind == "file"]
    sizes = [text for kind, text in found if kind == "size"]
    table.add(f"{name} image files ({split.images}/)", f"{len(checked)} JPEG",
              f"{len(files)} missing, empty or not JPEG" if files else f"{len(checked)} JPEG", not files,
              files[0] if files else "")
    table.add(f"{name} image sizes (JPEG headers)", "as annotated",
              f"{len(sizes)} differ" if sizes else "as annotated", not sizes, sizes[0] if sizes else "")
    return not (entries or files or sizes)


def _check_split(ds: Dataset, root: Path, name: str, table: _Table, deep: bool) -> None:
    """COCO checks of one split with pycocotools, and what training will trust of it: every image's
    name, size and JPEG header, every annotation's box, category and segmentation (what the stamp
    then watches: `_watched`)."""
    from pycocotools.coco import COCO

    split = ds.splits[name]
    ann_path = root / split.annotations
    images_dir = root / split.images
    if not ann_path.is_file():
        table.add(f"{name} annotations", split.annotations, "missing", False,
                  f"{ann_path} is missing: run `invoke fetch`")
        return
    try:
        doc = json.loads(ann_path.read_bytes())
        if not isinstance(doc, dict):
            raise ValueError("not a JSON object")
        coco = COCO()
        coco.dataset = doc
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            coco.createIndex()
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
        table.add(f"{name} annotations", "COCO instances JSON", "unreadable", False,
                  f"{ann_path} is not a COCO instances file ({shown(str(exc))}): run `invoke fetch` again")
        return
    images = doc.get("images", [])
    anns = doc.get("annotations", [])
    if split.count is not None:
        table.add(f"{name} images ({ann_path.name})", split.count, len(images), len(images) == split.count,
                  f"{ann_path} lists {len(images)} images, expected {split.count}")
    if ds.categories is not None:
        n_cats = len(coco.getCatIds())
        table.add(f"{name} categories", ds.categories, n_cats, n_cats == ds.categories,
                  f"{ann_path} has {n_cats} categories, expected {ds.categories}")
    dupes = [i for i, c in Counter(a.get("id") for a in anns).items() if c > 1]
    table.add(f"{name} annotation ids unique", f"{len(anns)} unique",
              f"{len(dupes)} duplicated (e.g. {shown(dupes[0])})" if dupes else f"{len(anns)} unique", not dupes,
              f"{ann_path}: annotation id {shown(dupes[0])} is used more than once" if dupes else "")
    known_images = set(coco.imgs)
    orphans = [a.get("id") for a in anns if a.get("image_id") not in known_images]
    table.add(f"{name} annotations point at images", "all", f"{len(orphans)} do not" if orphans else "all",
              not orphans, f"{ann_path}: annotation {shown(orphans[0])} names an image that is not listed"
              if orphans else "")
    categories = set(coco.cats)
    unusable = [(a.get("id"), problem) for a in anns
                if (problem := annotation_problem(a, coco.imgs, categories)) is not None]
    table.add(f"{name} annotations usable", "finite boxes, polygons >= 3 points, RLE of the image's size",
              f"{len(unusable)} are not" if unusable else "all", not unusable,
              f"{ann_path}: annotation {shown(unusable[0][0])} {unusable[0][1]}" if unusable else "")

    if _check_images(name, split, images_dir, images, table) and deep:
        work = [(str(images_dir / i["file_name"]), i["width"], i["height"]) for i in images]
        from concurrent.futures import ProcessPoolExecutor  # only here: multiprocessing costs start-up

        with ProcessPoolExecutor(max_workers=os.cpu_count() or 1) as ex:
            errors = [e for e in ex.map(decode_image, work, chunksize=max(1, len(work) // 64)) if e]
        table.add(f"{name} images decode", f"{len(images)}", f"{len(errors)} do not" if errors else
                  f"{len(images)}", not errors, errors[0] if errors else "")


def _fingerprint(ds: Dataset) -> dict:
    """What a stamp was made against: a changed manifest makes an old stamp void."""
    return {
        "checks": CHECKS,
        "files": {f.name: list(f.checksum) for f in ds.files},
        "splits": {k: [s.images, s.annotations, s.count] for k, s in sorted(ds.splits.items())},
        "categories": ds.categories,
    }


def _check_unpacked(ds: Dataset, data_dir: Path, table: _Table) -> None:
    """Every `extract: true` archive was unpacked by fetch (its record names folders that exist).
    Without a record, a manifest's splits are the evidence (checked below, e.g. unpacked by hand);
    with no splits nothing else would notice an archive never unpacked."""
    for spec in ds.files:
        if not spec.extract:
            continue
        entries = extracted_entries(ds, data_dir, spec)
        if entries is not None:
            table.add(f"unpacked {spec.name}", "by fetch", ", ".join(entries) or "nothing", True)
        elif ds.splits:
            table.add(f"unpacked {spec.name}", "by fetch", "no record; checked by the splits below", True)
        else:
            table.add(f"unpacked {spec.name}", "by fetch", "not unpacked", False,
                      f"{spec.name} is not unpacked in {ds.root(data_dir)} (or what it unpacked to is gone): "
                      "run `invoke fetch`")


def _watched(ds: Dataset, data_dir: Path) -> list[Path]:
    """What a stamp must cover, from the manifest alone: the archives, what they were unpacked to,
    each split's annotations and image folder (a folder's mtime changes when files come or go)."""
    root = ds.root(data_dir)
    paths = [ds.downloads(data_dir) / f.name for f in ds.files]
    for spec in ds.files:
        paths += [root / n for n in (extracted_entries(ds, data_dir, spec) or []) if spec.extract]
    for split in ds.splits.values():
        paths += [root / split.annotations, root / split.images]
    return sorted(set(paths))


def _stamp_files(ds: Dataset, data_dir: Path) -> list[Path]:
    return [ds.root(data_dir) / STAMP_NAME, elsewhere(ds, data_dir, STAMP_NAME)]


def verify_dataset(ds: Dataset, data_dir: Path, *, deep: bool = False, force: bool = False) -> None:
    """Run every check, print the table, and write the stamp only when all pass (else UserError)."""
    root = ds.root(data_dir)
    if not root.is_dir():
        raise UserError(f"dataset {ds.name} not found in {root}: run `invoke fetch --dataset {ds.name}` "
                        "(or pass the right --data-dir)")
    ds = with_published(ds, data_dir)
    table = _Table()
    _check_archives(ds, data_dir, table, force)
    _check_unpacked(ds, data_dir, table)
    for name in ds.splits:
        _check_split(ds, root, name, table, deep)
    if not table.rows:
        table.add("dataset folder", "present", "present", True)
    print(f"verify {ds.name} in {root}")
    print(table.render())
    if table.failures:
        more = f" (and {len(table.failures) - 1} more failed checks above)" if len(table.failures) > 1 else ""
        raise UserError(redact_url(table.failures[0] + more))
    stamp = {"dataset": ds.name, "deep": deep, "manifest": _fingerprint(ds), "root": os.path.realpath(root),
             "files": {str(p.relative_to(root)): stat_key(p) for p in _watched(ds, data_dir)}}
    written = write_first(_stamp_files(ds, data_dir), lambda _: stamp, "recording that the checks passed")
    print(f"all {len(table.rows)} checks passed" +
          ("" if written.parent == root else f"; {root} is read-only, so the stamp is in {written}"))


def _stamp_holds(stamp: dict, ds: Dataset, root: Path, expected: set[str]) -> bool:
    """A stamp made for this manifest that covers exactly what it must, all unchanged since."""
    if stamp.get("dataset") != ds.name or stamp.get("manifest") != _fingerprint(ds):
        return False
    files = stamp.get("files")
    if not isinstance(files, dict) or set(files) != expected:
        return False
    return all(stat_key(root / rel) == key for rel, key in files.items())


def is_verified(ds: Dataset, data_dir: Path) -> bool:
    """True if `invoke verify` passed for this manifest and nothing it checked has changed since.

    Cheap: a stat per archive, annotation file and image folder (a folder's mtime changes when
    files are added or removed in it), no hashing. The stamp is in the dataset folder, or in the
    user's cache where that folder is read-only.
    """
    root = ds.root(data_dir)
    ds = with_published(ds, data_dir)
    if any(spec.checksum[1] is None for spec in ds.files):
        return False
    expected = {str(p.relative_to(root)) for p in _watched(ds, data_dir)}
    return any(_stamp_holds(read_json(path), ds, root, expected) for path in _stamp_files(ds, data_dir))
