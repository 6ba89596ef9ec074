"""Dataset manifests: the one place that holds dataset facts (URLs, md5, sizes, layout, counts).

A manifest is a YAML file (the format is public; README.md documents it):

    name: mini                     # dataset name; files live under <data-dir>/<name>/
    files:
      - name: blob.bin             # kept under <data-dir>/<name>/downloads/
        url: http://127.0.0.1:8000/blob.bin
        md5: 0123456789abcdef0123456789abcdef   # or sha256: <64 hex digits> where no md5 is published
        size: 1048576              # bytes, optional
        extract: false             # true: unpack the archive into <data-dir>/<name>/
    splits:                        # optional: where the COCO-format splits are once unpacked
      train: {images: train2017, annotations: annotations/instances_train2017.json, count: 118287}
      val: {images: val2017, annotations: annotations/instances_val2017.json, count: 5000}
    categories: 80                 # optional: expected category count
    backbone: resnet50.pth         # optional: the file in downloads/ the model's backbone starts from
    generator: shapes              # optional: made locally instead of downloaded
    generator_options: {...}       # passed to the generator
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from mlperf.errors import UserError

CATALOG_DIR = Path(__file__).resolve().parent
_MD5 = re.compile(r"^[0-9a-f]{32}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class FileSpec:
    name: str
    url: str
    md5: str | None
    size: int | None = None
    extract: bool = False
    sha256: str | None = None  # for files whose publisher gives only a sha256 (torchvision weights)

    @property
    def checksum(self) -> tuple[str, str]:
        """(hashlib algorithm, expected hex digest): md5 where the manifest gives one, else sha256."""
        return ("md5", self.md5) if self.md5 else ("sha256", self.sha256)


@dataclass(frozen=True)
class Split:
    images: str          # image folder, relative to the dataset root
    annotations: str     # COCO instances JSON, relative to the dataset root
    count: int | None = None


@dataclass(frozen=True)
class Dataset:
    name: str
    files: tuple[FileSpec, ...] = ()
    splits: dict[str, Split] = field(default_factory=dict)
    categories: int | None = None
    generator: str | None = None
    generator_options: dict = field(default_factory=dict)
    description: str = ""
    backbone: str | None = None  # file name in downloads/ with the ImageNet-pretrained backbone
    source: Path | None = None   # the manifest file it came from

    def root(self, data_dir: Path) -> Path:
        """The dataset's own folder: <data_dir>/<name>."""
        return Path(data_dir) / self.name

    def downloads(self, data_dir: Path) -> Path:
        return self.root(data_dir) / "downloads"


def available() -> list[str]:
    """Names of the built-in datasets."""
    return sorted(p.stem for p in CATALOG_DIR.glob("*.yaml"))


def resolve(name: str | None = None, manifest: str | Path | None = None) -> Dataset:
    """A built-in dataset by name, or the dataset a user's manifest file describes."""
    if manifest is not None:
        return load_manifest(Path(manifest))
    if not name:
        raise UserError("no dataset given: pass --dataset NAME or --manifest FILE")
    path = CATALOG_DIR / f"{name}.yaml"
    if not path.is_file():
        raise UserError(f"unknown dataset {name!r}: choose one of {', '.join(available())}, "
                        "or describe your own with --manifest FILE")
    return load_manifest(path)


def load_manifest(path: Path) -> Dataset:
    """Parse and validate a manifest; any problem is one UserError naming the file and field."""
    if not path.is_file():
        raise UserError(f"manifest {path} not found: check the path")
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise UserError(f"manifest {path} is not valid YAML{where}: fix the file") from None
    if not isinstance(doc, dict):
        raise UserError(f"manifest {path} must be a mapping with 'name' and 'files'")

    def bad(what: str) -> UserError:
        return UserError(f"manifest {path}: {what}")

    name = doc.get("name")
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise bad("'name' is missing or not a plain name (letters, digits, '.', '_', '-')")
    raw_files = doc.get("files")
    if raw_files is None and not doc.get("generator"):
        raise bad("'files' is missing")
    if not isinstance(raw_files or [], list):
        raise bad("'files' must be a list")
    files = []
    seen = set()
    for i, entry in enumerate(raw_files or []):
        if not isinstance(entry, dict):
            raise bad(f"files[{i}] must be a mapping")
        for key in ("name", "url"):
            if not isinstance(entry.get(key), str) or not entry[key]:
                raise bad(f"files[{i}] lacks '{key}'")
        if not any(isinstance(entry.get(key), str) and entry[key] for key in ("md5", "sha256")):
            raise bad(f"files[{i}] lacks 'md5' (or 'sha256')")
        fname = entry["name"]
        if "/" in fname or "\\" in fname or fname in (".", ".."):
            raise bad(f"files[{i}] name {fname!r} must be a plain file name")
        if fname in seen:
            raise bad(f"file {fname!r} is listed twice")
        seen.add(fname)
        md5 = entry["md5"].lower() if entry.get("md5") else None
        if md5 is not None and not _MD5.match(md5):
            raise bad(f"files[{i}] ({fname}) md5 {entry['md5']!r} is not 32 hex digits")
        sha256 = entry["sha256"].lower() if entry.get("sha256") else None
        if sha256 is not None and not _SHA256.match(sha256):
            raise bad(f"files[{i}] ({fname}) sha256 {entry['sha256']!r} is not 64 hex digits")
        size = entry.get("size")
        if size is not None and (not isinstance(size, int) or size < 0):
            raise bad(f"files[{i}] ({fname}) size must be a whole number of bytes")
        files.append(FileSpec(name=fname, url=entry["url"], md5=md5, size=size,
                              extract=bool(entry.get("extract", False)), sha256=sha256))
    if doc.get("backbone") is not None and doc["backbone"] not in seen:
        raise bad(f"'backbone' names {doc['backbone']!r}, which is not one of the files")
    splits = {}
    for split_name, s in (doc.get("splits") or {}).items():
        if not isinstance(s, dict) or not s.get("images") or not s.get("annotations"):
            raise bad(f"splits.{split_name} needs 'images' and 'annotations'")
        splits[split_name] = Split(images=s["images"], annotations=s["annotations"], count=s.get("count"))
    return Dataset(
        name=name, files=tuple(files), splits=splits, categories=doc.get("categories"),
        generator=doc.get("generator"), generator_options=dict(doc.get("generator_options") or {}),
        description=doc.get("description", ""), backbone=doc.get("backbone"), source=path,
    )
