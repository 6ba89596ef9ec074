"""COCO bbox and segm evaluation (pycocotools COCOeval), with the detections sharded across ranks.

Each rank turns the detections of its own images into COCO results (coco_results.py), rank 0
gathers them and scores them once (`CocoEvaluator`). How masks are encoded and results scored is
the evaluator's `speed`: `StockEvaluation` is torchvision's path (pycocotools on the host, one
process), fast.scoring.FastEvaluation the speed pieces `--speed fast` runs (masks encoded on the
GPU, faster-coco-eval, worker processes); both give the same numbers (tests/test_evaluate.py).
As in the MLPerf reference, boxes and masks are scored from separate result lists: the segm
results carry no box, so COCOeval takes areas and boxes from the masks. Needs numpy and
pycocotools; torch only for tensors and gather().
"""
from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from object_detection.coco_results import CocoResults, detections_to_results
from object_detection.rle import encode_on_host

log = logging.getLogger(__name__)

IOU_TYPES = ("bbox", "segm")
STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl",
              "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


class StockEvaluation:
    """torchvision's evaluation path, none of object_detection.fast (`--speed stock`, and
    CocoEvaluator's default): masks RLE-encoded image by image with pycocotools on the host,
    results loaded by pycocotools' loadRes, pycocotools' COCOeval in this process."""

    encode = staticmethod(encode_on_host)

    def score(self, coco_gt: COCO, results: CocoResults, iou_types: tuple[str, ...],
              image_ids: list[int] | None) -> dict[str, list[float]]:
        """The summary numbers of `results` (not empty, on `image_ids` only) per IoU type."""
        def accumulate(iou_type: str) -> COCOeval:
            return accumulated(COCOeval(coco_gt, coco_gt.loadRes(results.to_dicts(iou_type)), iou_type), image_ids)

        return summaries(accumulate, iou_types)


def score_with(speed, coco_gt: COCO, results: Sequence[dict] | CocoResults, iou_types: Iterable[str] = IOU_TYPES,
               image_ids: Iterable[int] | None = None) -> dict[str, list[float]]:
    """COCOeval's 12 summary numbers (STAT_NAMES) per IoU type, as `speed` (StockEvaluation or
    fast.scoring.FastEvaluation) scores them; all zeros where nothing was found.

    `results`: COCO result dicts or CocoResults. `image_ids`: the images to score (default: every
    image of `coco_gt`); detections on other images are ignored, and ground truth on images not
    listed does not count as missed.
    """
    iou_types = tuple(iou_types)
    for iou_type in iou_types:
        if iou_type not in IOU_TYPES:
            raise ValueError(f"iou type {iou_type!r} is not one of {IOU_TYPES}")
    image_ids = sorted({int(i) for i in image_ids}) if image_ids is not None else None
    zeros = {iou_type: [0.0] * len(STAT_NAMES) for iou_type in iou_types}
    if image_ids == []:  # nothing was evaluated: COCOeval cannot accumulate over no images
        return zeros
    if not isinstance(results, CocoResults):
        results = CocoResults.from_dicts(results)
    if image_ids is not None:
        results = results.subset(np.isin(results.image_ids, image_ids))
    if results.segmentations is None:  # COCOeval cannot score an empty result set
        iou_types = tuple(t for t in iou_types if t != "segm")
    if not len(results) or not iou_types:
        return zeros
    return zeros | speed.score(coco_gt, results, iou_types, image_ids)


def accumulated(evaluator: COCOeval, image_ids: list[int] | None = None,
                category_ids: list[int] | None = None) -> COCOeval:
    """`evaluator` after evaluate() and accumulate(), on these images and categories only where given."""
    if image_ids is not None:
        evaluator.params.imgIds = image_ids
    if category_ids is not None:
        evaluator.params.catIds = category_ids
    evaluator.evaluate()
    evaluator.accumulate()
    return evaluator


def summaries(accumulate: Callable[[str], COCOeval], iou_types: Iterable[str]) -> dict[str, list[float]]:
    """Per IoU type the 12 numbers of COCOeval's summarize, for the accumulated evaluator that
    `accumulate(iou_type)` returns; what pycocotools prints goes to the debug log."""
    stats = {}
    for iou_type in iou_types:
        with contextlib.redirect_stdout(io.StringIO()) as printed:
            evaluator = accumulate(iou_type)
            evaluator.summarize()
        log.debug("COCOeval %s:\n%s", iou_type, printed.getvalue())
        stats[iou_type] = [float(value) for value in evaluator.stats]
    return stats


class CocoEvaluator:
    """Collects this rank's detections, gathers every rank's on rank 0, scores them there.

    for images, targets in loader: evaluator.update(model(images), image_ids)
    evaluator.gather(); aps = evaluator.summarize()  # on rank 0: {"bbox": AP, "segm": AP}

    `speed`: how masks are encoded and results scored, StockEvaluation() (the default) or a
    fast.scoring.FastEvaluation, which a trainer keeps across evaluations (its worker processes).
    """

    def __init__(self, coco_gt: COCO, label_to_category: Sequence[int] | Mapping[int, int],
                 iou_types: Iterable[str] = IOU_TYPES, box_offset: int = 0, speed=None):
        self.coco_gt = coco_gt
        self.box_offset = box_offset  # 1 for the reference recipe's +1 widths (detections_to_coco)
        self.speed = StockEvaluation() if speed is None else speed
        self.label_to_category = label_to_category
        self.iou_types = tuple(iou_types)
        self.results = CocoResults()
        self._batches: list[CocoResults] = []
        self.image_ids: list[int] = []
        self.stats: dict[str, list[float]] = {}

    def update(self, outputs: Sequence[Mapping], image_ids: Sequence[int]) -> None:
        """Add one batch: outputs at original image resolution (tensors may stay on the GPU), and
        the COCO ids of its images."""
        image_ids = [int(i) for i in image_ids]
        self._batches.append(detections_to_results(outputs, image_ids, self.label_to_category, self.box_offset,
                                                   self.speed.encode))
        self.image_ids.extend(image_ids)

    def _collect(self) -> None:
        self.results = CocoResults.concatenate([self.results, *self._batches])
        self._batches = []

    def gather(self) -> None:
        """Bring every rank's results and image ids to rank 0 (a no-op without torch.distributed);
        self.results then holds them (on the other ranks: nothing)."""
        import torch.distributed as dist

        self._collect()
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        # gather_object, not all_gather_object: only rank 0 scores, so only it needs everything.
        mine = (self.results, self.image_ids)
        everyone = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
        dist.gather_object(mine, everyone, dst=0)
        if dist.get_rank() == 0:
            self.results = CocoResults.concatenate(results for results, _ in everyone)
            self.image_ids = [image_id for _, ids in everyone for image_id in ids]
        else:
            self.results, self.image_ids = CocoResults(), []

    def summarize(self, image_ids: Iterable[int] | None = None) -> dict[str, float]:
        """{"bbox": AP, "segm": AP} over `image_ids` (default: every image given to update).

        Call on rank 0 after gather(); the 12 COCO numbers per type are kept in self.stats.
        """
        image_ids = self.image_ids if image_ids is None else image_ids
        self._collect()  # a single process need not call gather()
        self.stats = score_with(self.speed, self.coco_gt, self.results, self.iou_types, image_ids)
        for iou_type, values in self.stats.items():
            log.info("%s: %s", iou_type,
                     " ".join(f"{name}={value:.4f}" for name, value in zip(STAT_NAMES, values)))
        return {iou_type: values[0] for iou_type, values in self.stats.items()}
