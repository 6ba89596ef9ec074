"""COCO run-length encoding of predicted masks on a GPU: every mask of a batch in one pass of
tensor operations (`encode_tensors`), only the text crossing to the host. The text is pycocotools'
own (tests/test_evaluate.py compares them). Masks not on a GPU go to rle.encode_masks (pycocotools).
"""
from __future__ import annotations

from object_detection.rle import binary, encode_masks


def encode_all(masks: list, per_image: list[int]) -> list[dict | None]:
    """Every image's mask RLEs in order (None for each result of an image without masks): the
    masks of all images on a GPU in one `encode_tensors` pass (image by image, these were five
    waits for the GPU and ~70 small kernels per image), the others image by image."""
    where = [on_gpu(m) for m in masks]
    from_gpu = iter(encode_tensors([binary(m) for m, gpu in zip(masks, where) if gpu]) if any(where) else [])
    encoded = []
    for m, n, gpu in zip(masks, per_image, where):
        if m is None:
            encoded += [None] * n
        elif gpu:
            encoded += [next(from_gpu) for _ in range(n)]
        else:
            encoded += encode_masks(m)
    return encoded


def on_gpu(masks) -> bool:
    """Whether `masks` is a tensor on an accelerator (encoded there in one pass)."""
    return hasattr(masks, "detach") and masks.device.type != "cpu"


def encode_tensors(binaries: list) -> list[dict]:
    """COCO RLE of bool masks, given as [N_i,H_i,W_i] tensors (one per image, sizes may differ),
    computed where the tensors live.

    On a GPU the run boundaries, the run lengths and their compressed text (`compress_counts`)
    are found on the device for every mask at once; only the text crosses to the host (a few bytes
    a run, not H*W a mask), and the host slices it. Every mask's pixels, in COCO's column-major
    order, are laid end to end in one stream, so masks of different sizes need no padding. The
    same text as mask_utils.encode (tests/test_evaluate.py checks it, running this on CPU tensors).
    """
    import torch

    binaries = [b for b in binaries if len(b)]
    if not binaries:
        return []
    device = binaries[0].device
    sizes = [list(b.shape[1:]) for b in binaries for _ in range(len(b))]
    pixels = torch.tensor([h * w for h, w in sizes], device=device)                  # per mask
    offsets = pixels.cumsum(0) - pixels
    stream = torch.cat([b.transpose(1, 2).reshape(-1) for b in binaries])  # COCO runs go down columns
    starts = stream.clone()  # a run starts at a mask's first pixel if it is set, and wherever a
    starts[1:] = stream[1:] != stream[:-1]  # pixel differs from the one before in the same mask
    starts[offsets] = stream[offsets]
    found = starts.nonzero()[:, 0]  # in order: by mask, then by pixel
    instance = torch.searchsorted(offsets, found, right=True) - 1
    position = found - offsets[instance]
    n = len(sizes)
    # Each mask's counts: the gaps between its boundaries, then from the last one to the end.
    boundaries = torch.bincount(instance, minlength=n)
    first = torch.ones_like(instance, dtype=torch.bool)
    first[1:] = instance[1:] != instance[:-1]
    gaps = position - torch.where(first, 0, position.roll(1))
    last = torch.zeros(n, dtype=position.dtype, device=device)
    last.scatter_reduce_(0, instance, position, "amax")
    lengths = boundaries + 1
    mask_start = lengths.cumsum(0) - lengths
    counts = torch.empty(len(position) + n, dtype=torch.int64, device=device)
    rank = torch.arange(len(position), device=device) - (boundaries.cumsum(0) - boundaries)[instance]
    counts[mask_start[instance] + rank] = gaps
    counts[mask_start + boundaries] = pixels - last
    text, chars = compress_counts(counts, lengths)
    text = text.cpu().numpy().tobytes().decode("ascii")
    bounds = [0] + chars.cumsum(0).tolist()
    return [{"size": size, "counts": text[a:b]} for size, a, b in zip(sizes, bounds[:-1], bounds[1:])]


def compress_counts(counts, lengths):
    """pycocotools' rleToString for many masks at once, as tensors: `counts` of all masks back to
    back, `lengths[k]` of them mask k's. From the third count of a mask on, a count is stored as
    its difference to the count two before; each value is written in 5-bit groups, low first, as
    characters from '0' on, with 0x20 set while more groups follow (the last group's 0x10 bit is
    the sign). Returns every mask's characters back to back (uint8) and their number per mask."""
    import torch

    device = counts.device
    owner = torch.repeat_interleave(torch.arange(len(lengths), device=device), lengths,
                                    output_size=len(counts))
    rank = torch.arange(len(counts), device=device) - (lengths.cumsum(0) - lengths)[owner]
    two_before = torch.cat([counts.new_zeros(2), counts[:-2]])
    value = counts - torch.where(rank > 2, two_before, 0)
    shifts = torch.arange(0, 35, 5, device=device)  # 7 groups of 5 bits hold any int32
    chunk = (value[:, None] >> shifts) & 0x1F
    rest = value[:, None] >> (shifts + 5)
    more = torch.where(chunk & 0x10 != 0, rest != -1, rest != 0)  # once false, false after
    used = 1 + more[:, :6].sum(dim=1)
    characters = (chunk | (more.to(chunk.dtype) << 5)) + 48
    text = characters[torch.arange(7, device=device) < used[:, None]].to(torch.uint8)
    per_mask = torch.zeros(len(lengths), dtype=used.dtype, device=device).index_add_(0, owner, used)
    return text, per_mask
