"""What the trainer may trust of one COCO image or annotation: judged from the JSON and from the
JPEG's header alone.

Its own module because these judgements of one record each are apart from running the checks and
reporting them (mlperf.datasets.verify): the trainer decodes and allocates what an image's header and
an annotation say, so what cannot be trusted must be refused before a run, and cheaply, per image.
"""
from __future__ import annotations

import errno
import math
import os
from pathlib import Path

from mlperf.files import UnsafeName, inside, plain_name, shown

# The most pixels an image may have: each loader worker decodes a whole image (3 bytes a pixel) and
# its masks (1 byte a pixel per instance) before anything resizes it, so a header that claims
# 50000x50000 would cost gigabytes per worker. COCO's largest are 640 on the long side; this allows
# 8192x8192 (192 MiB decoded).
MAX_PIXELS = 1 << 26
HEADER_READ = 4096             # bytes read for a JPEG header: its frame header is usually within them
_SOF = set(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # JPEG frame headers (DHT, JPG, DAC are not)


def decode_image(args: tuple[str, int, int]) -> str | None:
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


def annotation_problem(ann: dict, images: dict, categories: set) -> str | None:
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


def image_entry_problem(images_dir: Path, img: dict) -> str | None:
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
    """A descriptor of the image `name` (checked by image_entry_problem), never of a file outside
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


def header_problem(images_dir: Path, folder: str, img: dict) -> tuple[str, str] | None:
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
