"""COCO-format reading, the one augmentation (horizontal flip), and aspect-ratio grouped batches,
each the way the run's recipe has it (object_detection.recipe.Recipe: the reference's for the
closed division, torchvision's for the open profiles).

Resizing to the MLPerf input size, normalisation and padding to a multiple of 32 happen in the
model's transform, on the training device: workers only decode, flip and build targets.
"""
from __future__ import annotations

import contextlib
import io
import itertools
import math
import random
from pathlib import Path

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from torchvision.io import ImageReadMode, decode_jpeg

from object_detection.mask_targets import flip_edges, polygon_edges
from object_detection.recipe import RECIPES, Recipe, iterations_per_epoch


def read_bytes(path: Path) -> torch.Tensor:
    """A file's bytes as a uint8 tensor, read through Python's open (torchvision's read_file is
    C++): every read of the dataset is then visible to audit hooks, which is how
    tests/test_train.py checks that nothing of it is read before run_start."""
    with open(path, "rb") as handle:
        return torch.frombuffer(bytearray(handle.read()), dtype=torch.uint8)


def load_coco(annotation_file: Path) -> COCO:
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        return COCO(str(annotation_file))


def has_valid_annotation(anns: list[dict]) -> bool:
    """The reference's training-image filter (maskrcnn-benchmark's has_valid_annotation), over all
    of an image's annotations, crowd ones included: at least one, and not every box 1 px or less
    wide or high. So an image with crowd annotations only stays (with no box to train on)."""
    return bool(anns) and not all(any(side <= 1 for side in a["bbox"][2:]) for a in anns)


def _usable(ann: dict) -> bool:
    """torchvision's recipe: a non-crowd box more than 1 px wide and high."""
    return not ann.get("iscrowd", 0) and ann["bbox"][2] > 1 and ann["bbox"][3] > 1


def instance_boxes(anns: list[dict], height: int, width: int, recipe: Recipe) -> tuple[torch.Tensor, list[int]]:
    """An image's training boxes (xyxy) and the indices of the annotations they come from.

    The reference (box_offset 1, pixel-inclusive boxes): crowd annotations out, x1 = x + max(w - 1, 0),
    every coordinate clipped to [0, W - 1] and [0, H - 1], then boxes without area removed.
    torchvision's: usable boxes (_usable), x1 = x + w, clipped to [0, W] and [0, H]."""
    offset = recipe.box_offset
    if offset:
        chosen = [i for i, a in enumerate(anns) if not a.get("iscrowd", 0)]
    else:
        chosen = [i for i, a in enumerate(anns) if _usable(a)]
    boxes = torch.tensor([anns[i]["bbox"] for i in chosen], dtype=torch.float32).reshape(-1, 4)
    boxes[:, 2:] = boxes[:, :2] + (boxes[:, 2:] - offset).clamp(min=0)
    boxes[:, 0::2].clamp_(0, width - offset)
    boxes[:, 1::2].clamp_(0, height - offset)
    if offset:
        keep = ((boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])).tolist()
        boxes = boxes[torch.tensor(keep, dtype=torch.bool)]
        chosen = [i for i, k in zip(chosen, keep) if k]
    return boxes, chosen


def flip_boxes(boxes: torch.Tensor, width: int, recipe: Recipe) -> torch.Tensor:
    """Boxes of a horizontally flipped image: x0' = W - x1 - offset (the reference's -1 for its
    pixel-inclusive boxes), x1' = W - x0 - offset."""
    edge = width - recipe.box_offset
    return torch.stack([edge - boxes[:, 2], boxes[:, 1], edge - boxes[:, 0], boxes[:, 3]], dim=1)


class CocoDetection(torch.utils.data.Dataset):
    """Images as uint8 CHW tensors with torchvision-detection targets (boxes xyxy, labels, masks),
    filtered and boxed as `recipe` says."""

    def __init__(self, images: Path, annotations: Path | COCO, *, train: bool, seed: int = 0,
                 recipe: Recipe = RECIPES["torchvision"], masks: bool = True):
        self.images = Path(images)
        self.masks = masks  # evaluation scores against the annotation file: its loader decodes no masks
        self.coco = annotations if isinstance(annotations, COCO) else load_coco(annotations)
        self.train = train
        self.seed = seed
        self.recipe = recipe
        cat_ids = sorted(self.coco.getCatIds())
        self.category_to_label = {c: i + 1 for i, c in enumerate(cat_ids)}
        self.label_to_category = [0] + cat_ids  # label 0 is background
        ids = sorted(self.coco.imgs)
        if train:  # the reference drops training images without a usable annotation
            if recipe.image_filter == "reference":
                ids = [i for i in ids if has_valid_annotation(self.coco.imgToAnns.get(i, []))]
            else:
                ids = [i for i in ids if any(_usable(a) for a in self.coco.imgToAnns.get(i, []))]
        self.ids = ids

    def __len__(self) -> int:
        return len(self.ids)

    def aspect_groups(self) -> list[int]:
        """0 for landscape images, 1 for portrait: batches hold one group so padding stays small.
        Square images go with the portrait ones in the reference's order (its bins split height /
        width at 1, inclusive), with the landscape ones in torchvision's."""
        square = 1 if self.recipe.epoch == "ceil" else 0
        return [int(self.coco.imgs[i]["height"] > self.coco.imgs[i]["width"]
                    or (square and self.coco.imgs[i]["height"] == self.coco.imgs[i]["width"]))
                for i in self.ids]

    def __getitem__(self, index: int):
        image_id = self.ids[index]
        info = self.coco.imgs[image_id]
        image = decode_jpeg(read_bytes(self.images / info["file_name"]), mode=ImageReadMode.RGB)
        h, w = image.shape[-2:]
        all_anns = self.coco.imgToAnns.get(image_id, [])
        boxes, kept = instance_boxes(all_anns, h, w, self.recipe)
        anns = [all_anns[i] for i in kept]
        labels = torch.tensor([self.category_to_label[a["category_id"]] for a in anns], dtype=torch.int64)
        # The sampler's flip; an index from elsewhere draws it here (random is seeded per worker in WorkerInit)
        flip = self.train and (index.flip if isinstance(index, Drawn) else random.random() < 0.5)
        polygons = (self.masks and self.recipe.mask_targets == "polygons" and anns
                    and all(isinstance(a["segmentation"], list) for a in anns))
        if not self.masks or polygons:
            masks = None
        elif anns:
            # decode gives H x W x N in column-major order: flip and turn it to N x H x W in numpy,
            # in one copy (torch's strided copy and flip of the same took ~6x longer: a loader
            # worker's largest cost at COCO's 20 instances, BENCHMARKS.md)
            decoded = mask_utils.decode([self._rle(a["segmentation"], h, w) for a in anns])
            masks = torch.from_numpy(np.ascontiguousarray((decoded[:, ::-1] if flip else decoded).transpose(2, 0, 1)))
        else:
            masks = torch.zeros((0, h, w), dtype=torch.uint8)
        if flip:
            image = image.flip(-1)
            boxes = flip_boxes(boxes, w, self.recipe)
        target = {"boxes": boxes, "labels": labels, "image_id": image_id, "orig_size": (h, w)}
        if masks is not None:
            target["masks"] = masks
        if polygons:  # kilobytes of edges instead of megabytes of masks; rasterised per RoI on the device
            edges, owner = polygon_edges([a["segmentation"] for a in anns])
            if flip:
                edges = flip_edges(edges, owner, w, self.recipe.box_offset)
            target.update(polygon_edges=edges, polygon_owner=owner,
                          polygons=max(len(a["segmentation"]) for a in anns))
        return image, target

    @staticmethod
    def _rle(segmentation, h: int, w: int):
        if isinstance(segmentation, list):  # polygons
            return mask_utils.merge(mask_utils.frPyObjects(segmentation, h, w))
        if isinstance(segmentation["counts"], list):  # uncompressed RLE
            return mask_utils.frPyObjects(segmentation, h, w)
        return segmentation


class Drawn(int):
    """A training image's index as a batch sampler draws it, carrying whether the image is flipped.
    The flip is drawn with the order (seeded by the pass and the image), not in the loader worker
    that reads the image: a run's flips then do not depend on how many workers there are, whether
    they outlive an epoch (persistent workers), or whether the run was resumed. An int, so a
    sampler's batches read as the indices they are."""

    def __new__(cls, index: int, flip: bool):
        drawn = super().__new__(cls, index)
        drawn.flip = bool(flip)
        return drawn

    def __reduce__(self):  # to the workers with its flip
        return Drawn, (int(self), self.flip)


FLIPS = 1                            # derive_seed's part that tells a pass's flips from its order
LOADER_SEEDS = 2**31                 # its part for a loader's own generator (after rank; epochs are smaller)


def pass_flips(seed: int, number: int, size: int) -> list[bool]:
    """Whether each of `size` images is flipped in pass (epoch) `number`: the same on every rank."""
    g = torch.Generator().manual_seed(derive_seed(seed, number, FLIPS))
    return (torch.rand(size, generator=g) < 0.5).tolist()


def collate(batch):
    return tuple(zip(*batch))


class GroupedBatchSampler(torch.utils.data.Sampler):
    """This rank's batches for one epoch: a seeded shuffle, sharded by rank, grouped by aspect ratio.

    Every rank yields the same number of batches (the global batch count, epoch-length fixed), so
    DDP never waits on a rank that ran out of data.
    """

    epoch_rule = "floor"             # recipe.iterations_per_epoch: full global batches only

    def __init__(self, groups: list[int], batch_size: int, *, rank: int, world_size: int, seed: int):
        self.groups = groups
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.epoch = 0
        if len(groups) < batch_size * world_size:
            raise ValueError(f"{len(groups)} training images are fewer than one global batch "
                             f"({batch_size} x {world_size})")
        self.num_batches = iterations_per_epoch(self.epoch_rule, len(groups), batch_size * world_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1000003 + self.epoch)
        order = torch.randperm(len(self.groups), generator=g).tolist()
        flips = pass_flips(self.seed, self.epoch, len(self.groups))
        mine = [Drawn(i, flips[i]) for i in order[self.rank::self.world_size]]
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


class StreamBatchSampler(GroupedBatchSampler):
    """This rank's batches of one epoch of the reference's endless stream (its
    IterationBasedBatchSampler over aspect-grouped batches): epoch e is batches [(e-1)N, eN) of
    the stream, N = images // global batch + 1, so no image is left out of the run and every
    rank steps N times between evaluations.

    The stream: pass after pass over the training set, each a seeded shuffle sharded by rank;
    images join their aspect group's bucket, and a bucket that reaches the batch size is the
    next batch. A bucket's remainder waits for the next pass instead of making a short batch,
    so every batch is full and one group (the reference ends each pass with a short batch per
    group). Every image is drawn once per pass. Deterministic from the seed: a resumed run gets
    the same batches from the epoch it resumes at.
    """

    epoch_rule = "ceil"
    _stream, _position = None, 0     # the stream's generator and how many batches it has given

    def __getstate__(self) -> dict:  # a spawned worker gets the sampler (WorkerInit), not its generator
        return {**self.__dict__, "_stream": None, "_position": 0}

    def passes(self):
        """(pass, index) of this rank's images, pass after pass, endlessly."""
        for number in itertools.count():
            g = torch.Generator().manual_seed(derive_seed(self.seed, number))
            order = torch.randperm(len(self.groups), generator=g)[self.rank::self.world_size].tolist()
            flips = pass_flips(self.seed, number, len(self.groups))
            yield from ((number, Drawn(index, flips[index])) for index in order)

    def batches(self):
        """The stream of this rank's batches, each a list of (pass, index)."""
        buckets: dict[int, list] = {}
        for drawn in self.passes():
            bucket = buckets.setdefault(self.groups[drawn[1]], [])
            bucket.append(drawn)
            if len(bucket) == self.batch_size:
                yield bucket[:]
                bucket.clear()

    def __iter__(self):
        start = max(self.epoch - 1, 0) * self.num_batches
        if self._stream is None or self._position > start:  # the stream resumes where the last epoch left it
            self._stream, self._position = self.batches(), 0
        for _ in range(start - self._position):
            next(self._stream)
            self._position += 1
        for _ in range(self.num_batches):
            batch = next(self._stream)
            self._position += 1
            yield [index for _, index in batch]


def batch_sampler(groups: list[int], batch_size: int, *, rank: int, world_size: int, seed: int, recipe: Recipe):
    """The training batches of the recipe's data order: the reference's stream ("ceil") or
    torchvision's per-epoch shuffle of full batches ("floor")."""
    cls = StreamBatchSampler if recipe.epoch == "ceil" else GroupedBatchSampler
    return cls(groups, batch_size, rank=rank, world_size=world_size, seed=seed)


def shard_indices(n: int, rank: int, world_size: int) -> list[int]:
    """Contiguous evaluation shard of this rank; all shards together cover every image once."""
    per = math.ceil(n / world_size)
    return list(range(rank * per, min(n, (rank + 1) * per)))


def derive_seed(master_seed: int, *parts: int) -> int:
    """A 32-bit seed for one (rank, epoch, worker, ...) from the master seed."""
    seq = np.random.SeedSequence([master_seed, *parts])
    return int(seq.generate_state(1)[0])


class WorkerInit:
    """Seeds a data-loader worker from (master seed, rank, worker id). Training draws nothing in
    the workers (the sampler decides the flips: Drawn), so workers may live for the whole run.

    A class, not a closure, so it pickles for spawned workers.
    """

    def __init__(self, master_seed: int, rank: int):
        self.master_seed, self.rank = master_seed, rank

    def __call__(self, worker_id: int) -> None:
        s = derive_seed(self.master_seed, self.rank, worker_id + 1)
        random.seed(s)
        np.random.seed(s)
        torch.manual_seed(s)
