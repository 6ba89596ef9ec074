"""COCO-format reading, the one augmentation (horizontal flip), and aspect-ratio grouped batches.

Resizing to the MLPerf input size, normalisation and padding to a multiple of 32 happen in the
model's transform, on the training device: workers only decode, flip and build targets.
"""
from __future__ import annotations

import contextlib
import io
import math
import random
from pathlib import Path

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from torchvision.io import ImageReadMode, decode_jpeg


def read_bytes(path: Path) -> torch.Tensor:
    """A file's bytes as a uint8 tensor, read through Python's open (torchvision's read_file is
    C++): every read of the dataset is then visible to audit hooks, which is how
    tests/test_train.py checks that nothing of it is read before run_start."""
    with open(path, "rb") as handle:
        return torch.frombuffer(bytearray(handle.read()), dtype=torch.uint8)


def load_coco(annotation_file: Path) -> COCO:
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        return COCO(str(annotation_file))


class CocoDetection(torch.utils.data.Dataset):
    """Images as uint8 CHW tensors with torchvision-detection targets (boxes xyxy, labels, masks)."""

    def __init__(self, images: Path, annotations: Path | COCO, *, train: bool, seed: int = 0):
        self.images = Path(images)
        self.coco = annotations if isinstance(annotations, COCO) else load_coco(annotations)
        self.train = train
        self.seed = seed
        cat_ids = sorted(self.coco.getCatIds())
        self.category_to_label = {c: i + 1 for i, c in enumerate(cat_ids)}
        self.label_to_category = [0] + cat_ids  # label 0 is background
        ids = sorted(self.coco.imgs)
        if train:  # the reference drops training images without a usable annotation
            ids = [i for i in ids if any(self._usable(a) for a in self.coco.imgToAnns.get(i, []))]
        self.ids = ids

    @staticmethod
    def _usable(ann: dict) -> bool:
        return not ann.get("iscrowd", 0) and ann["bbox"][2] > 1 and ann["bbox"][3] > 1

    def __len__(self) -> int:
        return len(self.ids)

    def aspect_groups(self) -> list[int]:
        """0 for landscape images, 1 for portrait: batches hold one group so padding stays small."""
        return [int(self.coco.imgs[i]["height"] > self.coco.imgs[i]["width"]) for i in self.ids]

    def __getitem__(self, index: int):
        image_id = self.ids[index]
        info = self.coco.imgs[image_id]
        image = decode_jpeg(read_bytes(self.images / info["file_name"]), mode=ImageReadMode.RGB)
        h, w = image.shape[-2:]
        anns = [a for a in self.coco.imgToAnns.get(image_id, []) if self._usable(a)]
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        boxes[:, 0::2].clamp_(0, w)
        boxes[:, 1::2].clamp_(0, h)
        labels = torch.tensor([self.category_to_label[a["category_id"]] for a in anns], dtype=torch.int64)
        flip = self.train and random.random() < 0.5  # random is seeded per worker in worker_init
        if anns:
            # decode gives H x W x N in column-major order: flip and turn it to N x H x W in numpy,
            # in one copy (torch's strided copy and flip of the same took ~6x longer: a loader
            # worker's largest cost at COCO's 20 instances, BENCHMARKS.md)
            decoded = mask_utils.decode([self._rle(a["segmentation"], h, w) for a in anns])
            masks = torch.from_numpy(np.ascontiguousarray((decoded[:, ::-1] if flip else decoded).transpose(2, 0, 1)))
        else:
            masks = torch.zeros((0, h, w), dtype=torch.uint8)
        if flip:
            image = image.flip(-1)
            boxes = torch.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], dim=1)
        target = {"boxes": boxes, "labels": labels, "masks": masks, "image_id": image_id,
                  "orig_size": (h, w)}
        return image, target

    @staticmethod
    def _rle(segmentation, h: int, w: int):
        if isinstance(segmentation, list):  # polygons
            return mask_utils.merge(mask_utils.frPyObjects(segmentation, h, w))
        if isinstance(segmentation["counts"], list):  # uncompressed RLE
            return mask_utils.frPyObjects(segmentation, h, w)
        return segmentation


def collate(batch):
    return tuple(zip(*batch))


class GroupedBatchSampler(torch.utils.data.Sampler):
    """This rank's batches for one epoch: a seeded shuffle, sharded by rank, grouped by aspect ratio.

    Every rank yields the same number of batches (the global batch count, epoch-length fixed), so
    DDP never waits on a rank that ran out of data.
    """

    def __init__(self, groups: list[int], batch_size: int, *, rank: int, world_size: int, seed: int):
        self.groups = groups
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.epoch = 0
        self.num_batches = len(groups) // (batch_size * world_size)
        if self.num_batches == 0:
            raise ValueError(f"{len(groups)} training images are fewer than one global batch "
                             f"({batch_size} x {world_size})")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1000003 + self.epoch)
        order = torch.randperm(len(self.groups), generator=g).tolist()
        mine = order[self.rank::self.world_size]
        buckets: dict[int, list[int]] = {}
        batches = []
        for idx in mine:
            bucket = buckets.setdefault(self.groups[idx], [])
            bucket.append(idx)
            if len(bucket) == self.batch_size:
                batches.append(bucket[:])
                bucket.clear()
        leftovers = [i for b in buckets.values() for i in b]  # mixed batches only from the remainder
        batches += [leftovers[i:i + self.batch_size] for i in range(0, len(leftovers), self.batch_size)
                    if len(leftovers[i:i + self.batch_size]) == self.batch_size]
        # floor(len(mine) / batch_size) >= num_batches full batches exist by construction
        yield from batches[: self.num_batches]


def shard_indices(n: int, rank: int, world_size: int) -> list[int]:
    """Contiguous evaluation shard of this rank; all shards together cover every image once."""
    per = math.ceil(n / world_size)
    return list(range(rank * per, min(n, (rank + 1) * per)))


def derive_seed(master_seed: int, *parts: int) -> int:
    """A 32-bit seed for one (rank, epoch, worker, ...) from the master seed."""
    seq = np.random.SeedSequence([master_seed, *parts])
    return int(seq.generate_state(1)[0])


class WorkerInit:
    """Seeds a data-loader worker from (master seed, rank, the sampler's epoch, worker id).

    A class, not a closure, so it pickles for spawned workers; it reads the epoch when the worker
    starts, which is after set_epoch because workers are not persistent.
    """

    def __init__(self, master_seed: int, rank: int, sampler: GroupedBatchSampler):
        self.master_seed, self.rank, self.sampler = master_seed, rank, sampler

    def __call__(self, worker_id: int) -> None:
        s = derive_seed(self.master_seed, self.rank, self.sampler.epoch, worker_id + 1)
        random.seed(s)
        np.random.seed(s)
        torch.manual_seed(s)
