"""Dataset manifests: the one place that holds dataset facts (URLs, md5, sizes, layout, counts).

A manifest is a YAML file (the format is public; README.md documents it):

    name: mini                     # dataset name; files live under <data-dir>/<name>/
    files:
      - name: blob.bin             # kept under <data-dir>/<name>/downloads/
        url: http://127.0.0.1:8000/blob.bin
        md5: 0123456789abcdef0123456789abcdef   # or sha256: <64 hex digits> where no md5 is published,
                                                 # or md5_url: the publisher's file holding the md5
        size: 1048576              # bytes, optional
        extract: false             # true: unpack the archive into <data-dir>/<name>/
    splits:                        # optional: where the COCO-format splits are once unpacked
      train: {images: train2017, annotations: annotations/instances_train2017.json, count: 118287}
      val: {images: val2017, annotations: annotations/instances_val2017.json, count: 5000}
    categories: 80                 # optional: expected category count
    backbone: R-50.pkl             # optional: the file in downloads/ the model's backbone starts from
    generator: shapes              # optional: made locally instead of downloaded
    generator_options: {...}       # passed to the generator
"""
from __future__ import annotations

import errno
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from mlperf.errors import UserError
from mlperf.files import UnsafeName, human_size, plain_name, shown

CATALOG_DIR = Path(__file__).resolve().parent
_MD5 = re.compile(r"^[0-9a-f]{32}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
MAX_MANIFEST_BYTES = 1 << 20   # a manifest is a page of text; anything larger is not one
MAX_DEPTH = 32                 # nesting a manifest may have (it needs 4)


@dataclass(frozen=True)
class FileSpec:
    name: str
    url: str
    md5: str | None
    size: int | None = None
    extract: bool = False
    sha256: str | None = None  # for files whose publisher gives only a sha256 (torchvision weights)
    md5_url: str | None = None  # where the publisher keeps the md5 (Detectron's `<url>.md5sum`), read by fetch

    @property
    def checksum(self) -> tuple[str, str | None]:
        """(hashlib algorithm, expected hex digest): md5 where the manifest gives one, else sha256;
        (md5, None) for an `md5_url` file whose published md5 has not been read yet (see
        mlperf.datasets.state.with_published)."""
        return ("md5", self.md5) if self.md5 or not self.sha256 else ("sha256", self.sha256)

    @property
    def checksum_source(self) -> str:
        """What the file is checked against, in words: "md5 <digest>", "sha256 <digest>", or
        "md5 published at <md5_url>" while that has not been read."""
        algo, digest = self.checksum
        return f"{algo} {digest}" if digest else f"md5 published at {self.md5_url}"


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
    targets: dict[str, float] | None = None  # open division: the quality targets runs on it must reach
    profile: str | None = None   # the trainer's input profile for it (object_detection.recipe.PROFILES)

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
    if name not in available():  # a catalog name, never a path (--dataset ../../x would load x.yaml)
        raise UserError(f"unknown dataset {shown(name)}: choose one of {', '.join(available())}, "
                        "or describe your own with --manifest FILE")
    return load_manifest(CATALOG_DIR / f"{name}.yaml")


def redact_url(text) -> str:
    """`text` with the secrets of every URL in it hidden: `user:password@` becomes `***@` and each
    query value `***` (`?token=abc&x=1` -> `?token=***&x=***`). For anything shown or logged: error
    lines, progress, job records. Works on any string, well-formed URL or not."""
    return _URL.sub(_redact_one, str(text))


_URL = re.compile(r"\b[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]*")


def _redact_one(match: re.Match) -> str:
    url = match.group(0)
    trail = len(url) - len(url.rstrip(".,:;)]"))  # sentence punctuation after the URL stays
    url, after = (url[:-trail], url[-trail:]) if trail else (url, "")
    scheme, _, rest = url.partition("://")
    cut = min([i for i in (rest.find(c) for c in "/?#") if i >= 0], default=len(rest))
    authority, tail = rest[:cut], rest[cut:]
    if "@" in authority:
        authority = "***@" + authority.rpartition("@")[2]
    path, question, query = tail.partition("?")
    if question:
        query, hash_, fragment = query.partition("#")
        hidden = [p.partition("=")[0] + "=***" if "=" in p else ("***" if p else "") for p in query.split("&")]
        tail = f"{path}?{'&'.join(hidden)}{hash_}{fragment}"
    return f"{scheme}://{authority}{tail}{after}"


def write_error(exc: OSError, path, what: str, after: str = "", need: int | None = None) -> UserError:
    """One line for a write that failed in a dataset folder (a full disk, a quota, a read-only or
    broken file system): what was being written, where, why, what to do, and what was kept."""
    why = exc.strerror or str(exc)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        todo = (f"free {'at least ' + human_size(need) if need else 'some space'} there, or pass --data-dir "
                "on a larger disk")
    else:
        todo = "check that the folder is writable, or pass --data-dir with one that is"
    return UserError(f"cannot write {path} while {what} ({why}): {todo}" + (f"; {after}" if after else ""))


def url_problem(url) -> str | None:
    """Why `url` cannot be downloaded from (None if it can): fetch speaks http and https only."""
    from urllib.parse import urlsplit

    if not isinstance(url, str) or not url:
        return "is not a URL"
    if any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in url):
        return "contains spaces or control characters"
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number in range
    except ValueError as exc:
        return f"is malformed ({exc})"
    if parts.scheme.lower() not in ("http", "https"):
        return "is not an http:// or https:// URL"
    if not parts.hostname:
        return "has no host name"
    return None


def name_problem(name) -> str | None:
    """Why `name` cannot be a file in downloads/ (None if it can). Names starting with '.' and
    ending in '.part' are fetch's own (.state.json, .fetch.lock, <file>.part, temporary files)."""
    if isinstance(name, str) and any(ord(c) < 32 or ord(c) == 127 for c in name):
        return "contains a NUL or control character"
    try:
        plain_name(name)
    except UnsafeName as bad:
        return str(bad).split(shown(name), 1)[-1].strip()  # plain_name's reason, without the name again
    if name.startswith(".") or name.endswith(".part"):
        return "is reserved: names starting with '.' or ending in '.part' are fetch's own files"
    return None


def _relative_problem(path) -> str | None:
    """Why a split's `images`/`annotations` path is not a plain path inside the dataset folder
    (each component a plain name: mlperf.files.plain_name; links are followed by files.inside at use)."""
    if not isinstance(path, str) or not path:
        return "must be a non-empty text"
    if path.startswith("/") or ".." in path.split("/"):
        return "must be a relative path inside the dataset folder (no '/' at the start, no '..')"
    try:
        for part in path.split("/"):
            if part not in ("", "."):
                plain_name(part, "component")
    except UnsafeName as bad:
        return f"must be a relative path inside the dataset folder: {bad}"
    return None


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


class _Refused(yaml.YAMLError):
    """YAML a manifest may not use: anchors and aliases, or nesting deeper than MAX_DEPTH."""

    def __init__(self, what: str, mark):
        super().__init__(what)
        self.what, self.problem_mark = what, mark


class _ManifestLoader(yaml.SafeLoader):
    """safe_load without anchors, aliases or deep nesting. An alias shares one list many times over:
    560 bytes can stand for gigabytes once anything walks or prints it (repr in a message did), and
    a manifest never needs one. The composer recurses per level, so depth is capped before Python's
    own recursion limit is reached."""

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise _Refused("uses a YAML anchor or alias (& or *): write each value out", event.start_mark)
        self._depth = getattr(self, "_depth", 0) + 1
        try:
            if self._depth > MAX_DEPTH:
                raise _Refused(f"is nested more than {MAX_DEPTH} levels deep", event.start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _read_doc(path: Path) -> dict:
    """The manifest's YAML as a mapping; unreadable, oversized, non-UTF-8 or invalid YAML, anchors,
    aliases and deep nesting are each one UserError."""
    try:
        with open(path, "rb") as handle:
            raw = handle.read(MAX_MANIFEST_BYTES + 1)
    except OSError as exc:
        raise UserError(f"manifest {path} cannot be read ({exc.strerror or exc}): check the path") from None
    if len(raw) > MAX_MANIFEST_BYTES:
        raise UserError(f"manifest {path} is larger than {human_size(MAX_MANIFEST_BYTES)}: it is not a "
                        "dataset manifest (one lists files and splits in a page of text)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"manifest {path} is not UTF-8 text (byte {exc.start}): save it as UTF-8") from None
    try:
        doc = yaml.load(text, Loader=_ManifestLoader)  # noqa: S506 - a SafeLoader, narrowed further
    except _Refused as exc:
        raise UserError(f"manifest {path} {exc.what} (line {exc.problem_mark.line + 1})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise UserError(f"manifest {path} is not valid YAML{where}: fix the file") from None
    if not isinstance(doc, dict):
        raise UserError(f"manifest {path} must be a mapping with 'name' and 'files'")
    return doc


def _parse_file(i: int, entry, bad) -> FileSpec:
    """One `files` entry, every field checked for type and form."""
    if not isinstance(entry, dict):
        raise bad(f"files[{i}] must be a mapping")
    fname = entry.get("name")
    if fname is None:
        raise bad(f"files[{i}] lacks 'name'")
    if (problem := name_problem(fname)) is not None:
        raise bad(f"files[{i}] name {shown(fname)} {problem}")
    if entry.get("url") is None:
        raise bad(f"files[{i}] lacks 'url'")
    if (problem := url_problem(entry["url"])) is not None:
        raise bad(f"files[{i}] ({fname}) url {shown(entry['url'])} {problem}: give an http(s) URL")
    digests = {}
    for algo, pattern, digits in (("md5", _MD5, 32), ("sha256", _SHA256, 64)):
        value = entry.get(algo)
        if value is None:
            continue
        if not isinstance(value, str) or not pattern.match(value.lower()):
            raise bad(f"files[{i}] ({fname}) {algo} {shown(value)} is not {digits} hex digits "
                      "(write it in quotes, so YAML does not read it as a number)")
        digests[algo] = value.lower()
    md5_url = entry.get("md5_url")
    if md5_url is not None:
        if (problem := url_problem(md5_url)) is not None:
            raise bad(f"files[{i}] ({fname}) md5_url {shown(md5_url)} {problem}: give an http(s) URL")
        if digests:
            raise bad(f"files[{i}] ({fname}) gives both a checksum and md5_url: keep one")
    elif not digests:
        raise bad(f"files[{i}] lacks 'md5' (or 'sha256', or 'md5_url')")
    size = entry.get("size")
    if size is not None and not _is_count(size):
        raise bad(f"files[{i}] ({fname}) size must be a whole number of bytes")
    extract = entry.get("extract", False)
    if not isinstance(extract, bool):
        raise bad(f"files[{i}] ({fname}) extract must be true or false, not {shown(extract)}")
    return FileSpec(name=fname, url=entry["url"], md5=digests.get("md5"), size=size, extract=extract,
                    sha256=digests.get("sha256"), md5_url=md5_url)


def _parse_splits(raw, bad) -> dict[str, Split]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise bad("'splits' must be a mapping of split name to {images, annotations, count}")
    splits = {}
    for split_name, s in raw.items():
        if not isinstance(split_name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", split_name):
            raise bad(f"split name {shown(split_name)} is not a plain name (letters, digits, '.', '_', '-')")
        if not isinstance(s, dict) or s.get("images") is None or s.get("annotations") is None:
            raise bad(f"splits.{split_name} needs 'images' and 'annotations'")
        for key in ("images", "annotations"):
            if (problem := _relative_problem(s[key])) is not None:
                raise bad(f"splits.{split_name}.{key} {shown(s[key])} {problem}")
        if s.get("count") is not None and not _is_count(s["count"]):
            raise bad(f"splits.{split_name}.count must be a whole number of images")
        splits[str(split_name)] = Split(images=s["images"], annotations=s["annotations"], count=s.get("count"))
    return splits


def load_manifest(path: Path) -> Dataset:
    """Parse and validate a manifest; any problem is one UserError naming the file and field."""
    if not path.is_file():
        raise UserError(f"manifest {path} not found: check the path")
    doc = _read_doc(path)

    def bad(what: str) -> UserError:
        return UserError(redact_url(f"manifest {path}: {what}"))

    name = doc.get("name")
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise bad("'name' is missing or not a plain name (letters, digits, '.', '_', '-')")
    raw_files = doc.get("files")
    if raw_files is None and not doc.get("generator"):
        raise bad("'files' is missing")
    if not isinstance(raw_files or [], list):
        raise bad("'files' must be a list")
    files = [_parse_file(i, entry, bad) for i, entry in enumerate(raw_files or [])]
    seen = set()
    for spec in files:
        if spec.name in seen:
            raise bad(f"file {shown(spec.name)} is listed twice")
        seen.add(spec.name)
    backbone = doc.get("backbone")
    # A generated set's backbone is the user's own file, put in downloads/ (the launcher checks it).
    if backbone is not None and (name_problem(backbone) is not None
                                 or (backbone not in seen and not doc.get("generator"))):
        raise bad(f"'backbone' names {shown(backbone)}, which is not one of the files")
    profile = doc.get("profile")
    if profile is not None:
        from object_detection.recipe import PROFILES

        if not isinstance(profile, str) or profile not in PROFILES:
            raise bad(f"'profile' must be one of {', '.join(sorted(PROFILES))}, not {shown(profile)}")
    categories = doc.get("categories")
    if categories is not None and not _is_count(categories):
        raise bad("'categories' must be a whole number")
    for key, kind in (("generator", str), ("description", str), ("generator_options", dict)):
        if doc.get(key) is not None and not isinstance(doc[key], kind):
            raise bad(f"'{key}' must be a {'mapping' if kind is dict else 'text'}")
    return Dataset(
        name=name, files=tuple(files), splits=_parse_splits(doc.get("splits"), bad), categories=categories,
        generator=doc.get("generator"), generator_options=dict(doc.get("generator_options") or {}),
        description=doc.get("description") or "", backbone=backbone, source=path,
        targets=_parse_targets(doc.get("targets"), bad), profile=profile,
    )


def _parse_targets(raw, bad) -> dict[str, float] | None:
    """`targets: {BBOX: 0.1, SEGM: 0.1}`: both mAPs, each a number from 0 to 1."""
    if raw is None:
        return None
    if not isinstance(raw, dict) or set(raw) != {"BBOX", "SEGM"}:
        raise bad("'targets' must map exactly BBOX and SEGM to an mAP each, e.g. {BBOX: 0.1, SEGM: 0.1}")
    for key, value in raw.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
            raise bad(f"targets {key} must be an mAP from 0 to 1, not {shown(value)}")
    return {key: float(value) for key, value in raw.items()}
