"""`invoke verify`: archive checksums and the COCO structure of a dataset, as a table.

Two small JSON files make repeated checks cheap, both written atomically:
- <root>/downloads/.state.json (shared with mlperf.datasets.fetch): per archive, the size and mtime it had
  when its checksum was last computed, and that checksum. A file whose size and mtime are unchanged
  is not hashed again (unless --force); fetch uses the same record to skip finished downloads.
- <root>/.verified.json: written only when every check passed; `is_verified` compares it with the
  files' size/mtime, so the trainer's launcher can refuse an unverified dataset without re-hashing.
Where the dataset folder is read-only (a shared vfolder), both go to the user's cache instead
(`cache_dir()`, keyed by the folder's real path) and are read from there. A record that is damaged
or of the wrong shape counts as missing: the file is checked again, never trusted.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import math
import mmap
import os
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from mlperf.datasets import Dataset, FileSpec, redact_url, write_error
from mlperf.errors import UserError
from mlperf.files import UnsafeName, inside, plain_name, read_json, shown, stat_key, write_json

STATE_NAME = ".state.json"
CHECKS = 2                   # what a stamp promised; raised when verify checks more, so older stamps are void
STAMP_NAME = ".verified.json"
READ_SIZE = 8 << 20          # big reads: hashing runs at memory speed, syscalls stay rare
HASH_STEP = 16 << 20         # bytes hashed between scheduling decisions (~30 ms of md5)
_state_lock = threading.Lock()
# The most pixels an image may have: each loader worker decodes a whole image (3 bytes a pixel) and
# its masks (1 byte a pixel per instance) before anything resizes it, so a header that claims
# 50000x50000 would cost gigabytes per worker. COCO's largest are 640 on the long side; this allows
# 8192x8192 (192 MiB decoded).
MAX_PIXELS = 1 << 26
HEADER_READ = 4096             # bytes read for a JPEG header: its frame header is usually within them
HEADER_THREADS = 16            # header reads wait on the disk, not the CPU: a cold disk serves many at once
_SOF = set(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # JPEG frame headers (DHT, JPG, DAC are not)


class _FileHash:
    """A file being hashed: its digest so far and where it got to, hashed a slice at a time."""

    def __init__(self, path: str | Path, algo: str):
        self.hasher = hashlib.new(algo)
        self.file = open(path, "rb", buffering=0)
        try:
            self.mapped = mmap.mmap(self.file.fileno(), 0, access=mmap.ACCESS_READ)
        except (ValueError, OSError):  # empty files, some special file systems: read() instead
            self.mapped = None
            self.buffer = bytearray(HASH_STEP)
        else:
            if hasattr(self.mapped, "madvise"):
                self.mapped.madvise(mmap.MADV_SEQUENTIAL)  # read ahead hard when it comes from disk
        self.size = os.fstat(self.file.fileno()).st_size
        self.offset = 0
        self.done = False

    @property
    def remaining(self) -> int:
        return self.size - self.offset

    def step(self) -> None:
        """Hash the next HASH_STEP bytes (hashlib releases the GIL meanwhile)."""
        if self.mapped is not None:
            with memoryview(self.mapped) as view:
                piece = view[self.offset:self.offset + HASH_STEP]
                self.hasher.update(piece)
                piece.release()
            self.offset = min(self.size, self.offset + HASH_STEP)
            self.done = self.offset >= self.size
        else:
            n = self.file.readinto(self.buffer)
            with memoryview(self.buffer) as view:
                self.hasher.update(view[:n])
            self.offset += n
            self.done = n == 0

    def close(self) -> None:
        if self.mapped is not None:
            self.mapped.close()
        self.file.close()


def hasher_of(path: str | Path, algo: str = "md5"):
    """The hashlib object after hashing a whole file, straight from a memory map of it (fetch keeps
    updating it when it resumes a download).

    Mapping skips the copy from the page cache into a buffer that read() makes: on 2 GiB this cut
    the kernel's CPU time from 1.3 s to 0.25 s (benchmarks/fetch_verify.py).
    """
    state = _FileHash(path, algo)
    try:
        while not state.done:
            state.step()
    finally:
        state.close()
    return state.hasher


def hash_file(path: str | Path, algo: str = "md5") -> str:
    """Hex digest of a file (see hasher_of)."""
    return hasher_of(path, algo).hexdigest()


def hash_files(jobs: list[tuple[Path, str]], workers: int | None = None) -> list[str]:
    """Digests of several (path, algo) pairs, on one thread per core.

    A file's hash is sequential, so a file cannot be split across cores, but it can be paused: each
    thread repeatedly takes the file with the most bytes left that nobody is hashing and hashes one
    slice of it. That is "longest remaining first", which finishes at max(total / cores, largest
    file): 1 GiB + 2 x 512 MiB ends with the 1 GiB, and three equal files share two cores instead
    of hashing two and then the third alone (1.5x slower, as a plain per-core pool does).
    Threads, not processes: hashlib releases the GIL, so threads scale and share the pause points.
    """
    if not jobs:
        return []
    states: list[_FileHash] = []
    try:
        for path, algo in jobs:
            states.append(_FileHash(path, algo))
    except BaseException:
        for s in states:
            s.close()
        raise
    busy: set[int] = set()
    lock = threading.Lock()
    failure: list[BaseException] = []

    def work() -> None:
        while not failure:
            with lock:
                idle = [i for i, s in enumerate(states) if not s.done and i not in busy]
                if not idle:
                    return
                i = max(idle, key=lambda k: states[k].remaining)
                busy.add(i)
            try:
                states[i].step()
            except BaseException as exc:  # an I/O error: stop every thread, raise it once
                failure.append(exc)
            finally:
                with lock:
                    busy.discard(i)

    workers = max(1, min(len(jobs), workers or os.cpu_count() or 1))
    try:
        threads = [threading.Thread(target=work, daemon=True) for _ in range(workers - 1)]
        for t in threads:
            t.start()
        work()
        for t in threads:
            t.join()
    finally:
        for s in states:
            s.close()
    if failure:
        raise failure[0]
    return [s.hasher.hexdigest() for s in states]


# ---------------------------------------------------------------- the state file (shared with fetch)

def cache_dir() -> Path:
    """The user's cache for this tool: $XDG_CACHE_HOME/mlperf-maskrcnn, else ~/.cache/mlperf-maskrcnn."""
    return Path(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")) / "mlperf-maskrcnn"


def _elsewhere(ds: Dataset, data_dir: Path, name: str) -> Path:
    """Where a record of a dataset folder that cannot be written goes (a shared read-only vfolder):
    the user's cache, keyed by the folder's real path, so every mount of it finds the same record."""
    real = os.path.realpath(ds.root(data_dir))
    key = hashlib.sha256(real.encode("utf-8", "surrogateescape")).hexdigest()[:16]
    return cache_dir() / "datasets" / f"{ds.name}-{key}" / name


def state_path(ds: Dataset, data_dir: Path) -> Path:
    return ds.downloads(data_dir) / STATE_NAME


def _state_files(ds: Dataset, data_dir: Path) -> list[Path]:
    return [state_path(ds, data_dir), _elsewhere(ds, data_dir, STATE_NAME)]


def _section(doc: dict, section: str) -> dict:
    """A section of a state file, {} when it is missing or of the wrong shape (a damaged file is
    not trusted, only re-checked)."""
    value = doc.get(section)
    return value if isinstance(value, dict) else {}


def _records(ds: Dataset, data_dir: Path, section: str, name: str) -> list[dict]:
    """The well-formed records of `name`, from the dataset's state file, then from the cache's."""
    found = [_section(read_json(path), section).get(name) for path in _state_files(ds, data_dir)]
    return [entry for entry in found if isinstance(entry, dict)]


def _write_first(paths: list[Path], make_doc, what: str) -> Path:
    """Write JSON to the first of `paths` that can be written (`make_doc(path)` gives its content):
    the dataset folder, else, where it is read-only, the user's cache. Returns the one written."""
    for path in paths:
        try:
            write_json(path, make_doc(path), sort_keys=True)
            return path
        except OSError as exc:
            if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM) and path != paths[-1]:
                continue
            raise write_error(exc, path, what) from None
    raise AssertionError("no paths")


def known_digest(ds: Dataset, data_dir: Path, spec: FileSpec) -> str | None:
    """The digest recorded for this archive if it is unchanged (same size and mtime) since, else None."""
    key = stat_key(ds.downloads(data_dir) / spec.name)
    algo, _ = spec.checksum
    for entry in _records(ds, data_dir, "files", spec.name):
        if key is not None and entry.get("algo") == algo and entry.get("stat") == key \
                and isinstance(entry.get("digest"), str):
            return entry["digest"]
    return None


def _update_state(ds: Dataset, data_dir: Path, section: str, name: str, value: dict | None) -> None:
    """Read-modify-write one entry of the state file under a lock (downloads finish concurrently)."""
    def updated(path: Path) -> dict:
        doc = read_json(path)
        entries = doc[section] = _section(doc, section)
        if value is None:
            entries.pop(name, None)
        else:
            entries[name] = value
        return doc

    with _state_lock:
        _write_first(_state_files(ds, data_dir), updated, "recording what was checked")


def with_published(ds: Dataset, data_dir: Path) -> Dataset:
    """`ds` with the md5 of every `md5_url` file that fetch has read from its publisher (state
    section "published", trusted only for the same URL); files whose md5 was not read yet keep
    none (their checksum is ("md5", None): nothing matches it)."""
    import dataclasses

    specs = []
    for spec in ds.files:
        if spec.md5_url and not spec.md5:
            for entry in _records(ds, data_dir, "published", spec.name):
                md5 = entry.get("md5")
                if entry.get("url") == spec.md5_url and isinstance(md5, str) and len(md5) == 32 \
                        and all(c in "0123456789abcdef" for c in md5):
                    spec = dataclasses.replace(spec, md5=md5)
                    break
        specs.append(spec)
    return dataclasses.replace(ds, files=tuple(specs))


def record_published(ds: Dataset, data_dir: Path, spec: FileSpec, md5: str) -> None:
    """Remember the md5 read from `spec.md5_url` (verify and train then need no network)."""
    _update_state(ds, data_dir, "published", spec.name, {"url": spec.md5_url, "md5": md5})


def record_digest(ds: Dataset, data_dir: Path, spec: FileSpec, digest: str) -> None:
    """Remember the digest of the archive as it is on disk now (keyed by its size and mtime)."""
    path = ds.downloads(data_dir) / spec.name
    _update_state(ds, data_dir, "files", spec.name,
                  {"algo": spec.checksum[0], "digest": digest, "stat": stat_key(path)})


def extracted_entries(ds: Dataset, data_dir: Path, spec: FileSpec, *, present: bool = True) -> list[str] | None:
    """Top-level names an archive was unpacked into, if that was this very archive and (`present`)
    they still exist."""
    root = ds.root(data_dir)
    for entry in _records(ds, data_dir, "extracted", spec.name):
        names = entry.get("entries")
        if entry.get("digest") != spec.checksum[1] or not isinstance(names, list) \
                or not all(isinstance(n, str) and n and "/" not in n and n not in (".", "..") for n in names):
            continue
        if not present or all((root / n).exists() or (root / n).is_symlink() for n in names):
            return names
    return None


def record_extracted(ds: Dataset, data_dir: Path, spec: FileSpec, entries: list[str]) -> None:
    """The extraction stamp: written only after the unpacked tree was renamed into place."""
    _update_state(ds, data_dir, "extracted", spec.name,
                  {"digest": spec.checksum[1], "entries": sorted(entries)})


# ---------------------------------------------------------------- checks

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


def _decode_image(args: tuple[str, int, int]) -> str | None:
    """None if the image decodes at the size the annotations give, else what is wrong."""
    from PIL import Image

    path, width, height = args
    try:
        with Image.open(path) as im:
            im.load()
            if width and height and im.size != (width, height):
                return f"{path} is {im.size[0]}x{im.size[1]}, annotations say {width}x{height}"
    except Exception as exc:  # PIL raises many types for a damaged file
        return f"{path} does not decode: {shown(str(exc))}"
    return None


def jpeg_size(fd: int) -> tuple[int, int] | str:
    """(width, height) from the frame header of the JPEG open at `fd`, reading only the segments
    before it (a read or two of HEADER_READ; Exif and other large segments are skipped, not read),
    or what is wrong. The trainer decodes with decode_jpeg, which takes JPEG only, and allocates
    what the frame header says."""
    buf, base = os.pread(fd, HEADER_READ, 0), 0

    def at(pos: int, n: int) -> bytes:  # n bytes at file offset pos (fewer at the end of the file)
        nonlocal buf, base
        if not (base <= pos and pos + n <= base + len(buf)):
            buf, base = os.pread(fd, max(n, HEADER_READ), pos), pos
        return buf[pos - base:pos - base + n]

    if not buf:
        return "is empty"
    if buf[:2] != b"\xff\xd8":
        return "is not a JPEG (training decodes JPEG only)"
    pos = 2
    for _ in range(4096):  # a real file has a handful of segments before its frame header
        marker = at(pos, 4)
        if len(marker) < 2 or marker[0] != 0xFF:
            return "is not a readable JPEG (cut off or damaged before its frame header)"
        kind = marker[1]
        if kind == 0xFF:  # a fill byte before the marker
            pos += 1
            continue
        if kind == 0x01 or 0xD0 <= kind <= 0xD7:  # markers without a length
            pos += 2
            continue
        if kind in (0xD9, 0xDA):
            return "is not a readable JPEG (no frame header before its image data)"
        if len(marker) < 4 or int.from_bytes(marker[2:4], "big") < 2:
            return "is not a readable JPEG (a damaged segment before its frame header)"
        if kind in _SOF:
            frame = at(pos + 4, 5)
            if len(frame) < 5:
                return "is not a readable JPEG (cut off in its frame header)"
            return int.from_bytes(frame[3:5], "big"), int.from_bytes(frame[1:3], "big")
        pos += 2 + int.from_bytes(marker[2:4], "big")
    return "is not a readable JPEG (no frame header)"


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _finite_numbers(values, count: int | None = None, at_least: int = 0) -> bool:
    """A list of numbers, all finite (one C-speed sum: a NaN or an infinity anywhere makes it
    non-finite, a text or null raises), of exactly `count` or at least `at_least` items."""
    if not isinstance(values, list) or (count is not None and len(values) != count) or len(values) < at_least:
        return False
    try:
        return math.isfinite(sum(values))
    except (TypeError, OverflowError):
        return False


def rle_string_total(counts: str) -> int | None:
    """The number of pixels a compressed COCO RLE string covers (pycocotools' rleFrString format:
    5 bits a character, a continuation bit, sign extension, counts after the second relative to the
    one two before), or None when it is malformed or a count is negative. pycocotools decodes into an
    image-sized buffer without checking the total, so a total that disagrees is refused here."""
    try:
        data = counts.encode("ascii")
    except UnicodeEncodeError:
        return None
    values: list[int] = []
    x = k = 0
    for byte in data:
        c = byte - 48
        if not 0 <= c < 64:
            return None
        x |= (c & 0x1F) << (5 * k)
        k += 1
        if c & 0x20:
            continue
        if c & 0x10:
            x |= -1 << (5 * k)
        if len(values) > 2:
            x += values[-2]
        if x < 0:
            return None
        values.append(x)
        x = k = 0
    return None if k else sum(values)


def _segmentation_problem(seg, height: int, width: int) -> str | None:
    """Why a segmentation cannot be trusted for an image of height x width (None if it can):
    polygons of at least three finite points, or an RLE of exactly the image's size."""
    if isinstance(seg, list):
        if not seg:
            return "has an empty polygon list"
        for poly in seg:
            if not _finite_numbers(poly, at_least=6) or len(poly) % 2:
                return "has a polygon that is not at least three points of finite numbers (6, 8, ... numbers)"
        return None
    if not isinstance(seg, dict):
        return f"has a segmentation that is neither polygons nor RLE ({shown(seg)})"
    size = seg.get("size")
    if not isinstance(size, list) or len(size) != 2 or not all(_whole(v) for v in size):
        return f"has an RLE size {shown(size)} that is not [height, width]"
    if size != [height, width]:
        return (f"has an RLE of size {size[0]}x{size[1]} (height x width) on an image of "
                f"{height}x{width}: its mask would not line up with the image")
    counts = seg.get("counts")
    if isinstance(counts, list):
        total = sum(counts) if all(_whole(v) and v >= 0 for v in counts) else None
    elif isinstance(counts, str):
        total = rle_string_total(counts)
    else:
        total = None
    if total is None:
        return "has RLE counts that are not a list of counts or a COCO RLE string"
    if total != height * width:
        return f"has RLE counts covering {total} pixels, not the image's {height * width}"
    return None


def _annotation_problem(ann: dict, images: dict, categories: set) -> str | None:
    """Why the trainer cannot use an annotation as it is (None if it can)."""
    image = images.get(ann.get("image_id"))
    if image is None:
        return None  # reported by "annotations point at images"
    if not _finite_numbers(ann.get("bbox"), count=4) or not (ann["bbox"][2] >= 0 and ann["bbox"][3] >= 0):
        return f"has a bbox {shown(ann.get('bbox'))} that is not [x, y, width, height] of finite numbers"
    if ann.get("category_id") not in categories:
        return f"has a category_id {shown(ann.get('category_id'))} that is not one of the categories"
    width, height = image.get("width"), image.get("height")
    if not (_whole(width) and _whole(height)):
        return None  # reported with the image
    return _segmentation_problem(ann.get("segmentation"), height, width)


def _image_entry_problem(images_dir: Path, img: dict) -> str | None:
    """Why an image's entry cannot be trusted (None if it can): a `file_name` that is a plain
    relative path (files.plain_name for each part; where it stays inside the folder is checked when
    the file is opened), a width and height within MAX_PIXELS."""
    name = img.get("file_name")
    try:
        if not isinstance(name, str) or "/" not in name:
            plain_name(name, "file_name")
        else:
            inside(images_dir, name, "file_name")
    except UnsafeName as bad:
        return f"image {shown(img.get('id'))}: {bad}"
    width, height = img.get("width"), img.get("height")
    if not (_whole(width) and _whole(height) and width > 0 and height > 0):
        return f"image {shown(img.get('id'))} ({name}): width {shown(width)}, height {shown(height)} " \
               "are not whole numbers above 0"
    if width * height > MAX_PIXELS:
        return (f"image {shown(img.get('id'))} ({name}) is {width}x{height}, more than the "
                f"{MAX_PIXELS} pixels an image may have (every loader worker would decode it whole)")
    return None


def _open_inside(images_dir: Path, folder: str, name: str) -> int:
    """A descriptor of the image `name` (checked by _image_entry_problem), never of a file outside
    the folder: a plain name is opened without following a link (one open, no path resolution: this
    runs once per image); a link, or a name with folders, goes through files.inside first.
    `folder` is str(images_dir): joining text is several times cheaper than making a Path."""
    if "/" not in name:
        try:
            return os.open(os.path.join(folder, name), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno != errno.ELOOP:
                raise
    return os.open(inside(images_dir, name, "file_name"), os.O_RDONLY | os.O_CLOEXEC)


def _header_problem(images_dir: Path, folder: str, img: dict) -> tuple[str, str] | None:
    """('file' or 'size', what is wrong) when the file is missing, empty, outside the folder, not a
    JPEG, or its frame header disagrees with the annotations; None when it matches. Reads the header only."""
    try:
        fd = _open_inside(images_dir, folder, img["file_name"])
        try:
            found = jpeg_size(fd)
        finally:
            os.close(fd)
    except FileNotFoundError:
        return "file", f"{images_dir / img['file_name']} is missing"
    except UnsafeName as bad:
        return "file", f"{images_dir}: {bad}"
    except OSError as exc:
        return "file", f"{images_dir / img['file_name']} cannot be read ({exc.strerror or exc})"
    if found.__class__ is str:
        return "file", f"{images_dir / img['file_name']} {found}"
    if found != (img["width"], img["height"]):
        return "size", (f"{images_dir / img['file_name']} is {found[0]}x{found[1]} by its JPEG header, the "
                        f"annotations say {img['width']}x{img['height']}: fix the annotations or the image")
    return None


def _check_images(name: str, split, images_dir: Path, images: list, table: _Table) -> bool:
    """What the trainer trusts about each image: its name, size, file and JPEG header. True if all hold."""
    entries, checked = [], []
    for img in images:
        problem = _image_entry_problem(images_dir, img)
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
        found = [p for part in pool.map(lambda imgs: [_header_problem(images_dir, folder, i) for i in imgs], slices)
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
                if (problem := _annotation_problem(a, coco.imgs, categories)) is not None]
    table.add(f"{name} annotations usable", "finite boxes, polygons >= 3 points, RLE of the image's size",
              f"{len(unusable)} are not" if unusable else "all", not unusable,
              f"{ann_path}: annotation {shown(unusable[0][0])} {unusable[0][1]}" if unusable else "")

    if _check_images(name, split, images_dir, images, table) and deep:
        work = [(str(images_dir / i["file_name"]), i["width"], i["height"]) for i in images]
        from concurrent.futures import ProcessPoolExecutor  # only here: multiprocessing costs start-up

        with ProcessPoolExecutor(max_workers=os.cpu_count() or 1) as ex:
            errors = [e for e in ex.map(_decode_image, work, chunksize=max(1, len(work) // 64)) if e]
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
    return [ds.root(data_dir) / STAMP_NAME, _elsewhere(ds, data_dir, STAMP_NAME)]


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
    written = _write_first(_stamp_files(ds, data_dir), lambda _: stamp, "recording that the checks passed")
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
