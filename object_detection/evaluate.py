"""COCO bbox and segm evaluation (pycocotools COCOeval), with the detections sharded across ranks.

Each rank turns the detections of its own images into COCO results (`detections_to_coco`), rank 0
gathers them and scores them once (`CocoEvaluator`). As in the MLPerf reference, boxes and masks
are scored from separate result lists: the segm results carry no box, so COCOeval takes areas and
boxes from the masks. `evaluate_results` needs only numpy and pycocotools (faster-coco-eval,
when installed, scores the same numbers in a fraction of the time).
"""
from __future__ import annotations

import contextlib
import copy
import functools
import io
import logging
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

log = logging.getLogger(__name__)

IOU_TYPES = ("bbox", "segm")
# pycocotools is the reference. faster-coco-eval (C++ evaluate and accumulate, the same numbers to
# 1e-4 in tests/test_evaluate.py) is used when installed: about 7x less time on 1000 COCO-like
# images with 100 detections each (80 s against 11 s on a loaded 2-core host).
BACKENDS = ("auto", "pycocotools", "faster_coco_eval")
MASK_THRESHOLD = 0.5
STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl",
              "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def detections_to_coco(outputs: Sequence[Mapping], image_ids: Sequence[int],
                       label_to_category: Sequence[int] | Mapping[int, int]) -> list[dict]:
    """COCO result dicts (image_id, category_id, bbox xywh, score, segmentation RLE) for a batch.

    `outputs`: one torchvision-detection dict per image, at the image's original resolution:
    boxes [N,4] xyxy, labels [N] (contiguous 1..K), scores [N], and optionally masks [N,1,H,W]
    (probabilities, thresholded at 0.5; uint8 or bool masks are taken as already thresholded).
    Tensors (on any device) or numpy arrays. `label_to_category`: a mapping label -> COCO
    category id, or a sequence indexed by label whose element 0 (background) is None or 0.
    """
    lookup = _label_lookup(label_to_category)
    results = []
    for output, image_id in zip(outputs, image_ids, strict=True):
        boxes = _numpy(output["boxes"]).astype(np.float64).reshape(-1, 4)
        if len(boxes) == 0:
            continue
        labels = _numpy(output["labels"]).astype(np.int64)
        if labels.min() < 1 or labels.max() >= len(lookup) or (lookup[labels] < 0).any():
            raise ValueError(f"labels {sorted(set(labels.tolist()))} of image {image_id} are not "
                             f"all in label_to_category")
        categories = lookup[labels].tolist()
        scores = _numpy(output["scores"]).astype(np.float64).tolist()
        boxes[:, 2:] -= boxes[:, :2]
        rles = _encode_masks(output["masks"]) if "masks" in output else None
        image_id = int(image_id)
        for index, (box, category, score) in enumerate(zip(boxes.tolist(), categories, scores)):
            result = {"image_id": image_id, "category_id": category, "bbox": box, "score": score}
            if rles is not None:
                result["segmentation"] = rles[index]
            results.append(result)
    return results


def _label_lookup(label_to_category: Sequence[int] | Mapping[int, int]) -> np.ndarray:
    """A numpy table label -> category id (-1 where a label has none), built once per call."""
    if isinstance(label_to_category, Mapping):
        pairs = {int(label): int(category) for label, category in label_to_category.items()}
    else:
        if label_to_category[0] not in (None, 0):
            raise ValueError("label_to_category as a sequence is indexed by label: element 0 is "
                             f"the background and must be None or 0, not {label_to_category[0]!r}")
        pairs = {label: int(category) for label, category in enumerate(label_to_category)
                 if label > 0}
    lookup = np.full(max(pairs, default=0) + 1, -1, dtype=np.int64)
    for label, category in pairs.items():
        lookup[label] = category
    return lookup


def _numpy(value) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor, possibly on a GPU
        return value.detach().cpu().numpy()
    return np.asarray(value)


def _encode_masks(masks) -> list[dict]:
    """RLE of each mask: [N,1,H,W] or [N,H,W], probabilities (> 0.5) or already binary."""
    if hasattr(masks, "detach"):
        import torch

        masks = masks.detach()
        if masks.dim() == 4:
            masks = masks[:, 0]
        binary = masks > MASK_THRESHOLD if masks.is_floating_point() else masks != 0
        if binary.device.type == "cpu":  # pycocotools' one C pass beats torch's several on a CPU
            rles = mask_utils.encode(binary.transpose(1, 2).to(torch.uint8).contiguous().numpy()
                                     .transpose(2, 1, 0))
        else:
            rles = _encode_tensor(binary)
    else:
        masks = np.asarray(masks)
        if masks.ndim == 4:
            masks = masks[:, 0]
        binary = masks > MASK_THRESHOLD if np.issubdtype(masks.dtype, np.floating) else masks != 0
        # pycocotools wants Fortran (H, W, N), which is C (N, W, H): one call for all masks.
        by_column = np.ascontiguousarray(binary.transpose(0, 2, 1), dtype=np.uint8)
        rles = mask_utils.encode(by_column.transpose(2, 1, 0))
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")  # JSON and pickles want text
    return rles


def _encode_tensor(binary) -> list[dict]:
    """COCO RLE of bool masks [N,H,W], with the run boundaries found where the tensor lives.

    On a GPU only the boundaries (a few hundred numbers a mask) cross to the host, not H*W bytes
    a mask, and no CPU scans the pixels: pycocotools only compresses the run lengths. The same
    bytes as mask_utils.encode (tests/test_evaluate.py checks it).
    """
    n, height, width = binary.shape
    if n == 0:
        return []
    column_major = binary.transpose(1, 2).reshape(n, height * width)  # COCO runs go down columns
    starts = column_major.clone()  # a run starts at pixel 0 if it is set, and wherever a pixel
    starts[:, 1:] = column_major[:, 1:] != column_major[:, :-1]  # differs from the one before
    instance, position = (index.cpu().numpy() for index in starts.nonzero(as_tuple=True))
    bounds = np.searchsorted(instance, np.arange(n + 1))
    uncompressed = [{"size": [height, width],
                     "counts": np.diff(position[bounds[k]:bounds[k + 1]], prepend=0,
                                       append=height * width).tolist()}
                    for k in range(n)]
    return mask_utils.frPyObjects(uncompressed, height, width)


def score_results(coco_gt: COCO, results: Sequence[dict], iou_types: Iterable[str] = IOU_TYPES,
                  image_ids: Iterable[int] | None = None,
                  backend: str = "auto") -> dict[str, list[float]]:
    """COCOeval's 12 summary numbers (STAT_NAMES) per IoU type; all zeros where nothing was found.

    `image_ids`: the images to score (default: every image of `coco_gt`); detections on other
    images are ignored, and ground truth on images not listed does not count as missed.
    `backend`: one of BACKENDS; "auto" takes faster_coco_eval when it is installed.
    """
    evaluator_class, coco_gt = _backend(backend, coco_gt)
    image_ids = sorted({int(i) for i in image_ids}) if image_ids is not None else None
    if image_ids == []:  # nothing was evaluated: COCOeval cannot accumulate over no images
        return {iou_type: [0.0] * len(STAT_NAMES) for iou_type in iou_types}
    stats = {}
    for iou_type in iou_types:
        if iou_type not in IOU_TYPES:
            raise ValueError(f"iou type {iou_type!r} is not one of {IOU_TYPES}")
        # Separate lists, like the reference: a segm result gets its area and box from its mask,
        # not from the detected box. Fresh dicts: _load_results writes into them.
        if iou_type == "bbox":
            own = [{"image_id": r["image_id"], "category_id": r["category_id"],
                    "bbox": r["bbox"], "score": r["score"]} for r in results]
        else:
            own = [{"image_id": r["image_id"], "category_id": r["category_id"],
                    "segmentation": r["segmentation"], "score": r["score"]}
                   for r in results if "segmentation" in r]
        if image_ids is not None:
            wanted = set(image_ids)
            own = [r for r in own if r["image_id"] in wanted]
        if not own:  # COCOeval cannot score an empty result set: nothing detected scores zero
            stats[iou_type] = [0.0] * len(STAT_NAMES)
            continue
        with contextlib.redirect_stdout(io.StringIO()) as printed:
            coco_dt = _load_results(coco_gt, own, iou_type)
            evaluator = evaluator_class(coco_gt, coco_dt, iou_type)
            if image_ids is not None:
                evaluator.params.imgIds = image_ids
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        log.debug("COCOeval %s:\n%s", iou_type, printed.getvalue())
        stats[iou_type] = [float(value) for value in evaluator.stats]
    return stats


def _load_results(coco_gt, results: list[dict], iou_type: str):
    """What coco_gt.loadRes(results) builds, with mask areas and boxes in one C call for all.

    loadRes calls pycocotools once per result: 10-30 s for 500k masks. Same fields, same values
    (tests/test_evaluate.py compares every COCO number with loadRes's). Writes into `results`.
    """
    unknown = {r["image_id"] for r in results} - set(coco_gt.getImgIds())
    if unknown:
        raise ValueError(f"results for images not in the ground truth: {sorted(unknown)[:5]}")
    if iou_type == "segm":
        # Chunks of 255: pycocotools' area() overflows a uint8 scratch array past that (numpy 2).
        for start in range(0, len(results), 255):
            chunk = results[start:start + 255]
            rles = [result["segmentation"] for result in chunk]
            for result, area, box in zip(chunk, mask_utils.area(rles), mask_utils.toBbox(rles)):
                result["area"], result["bbox"] = area, box
    else:  # bbox scoring reads boxes only: loadRes's box-shaped polygon is left out
        for result in results:
            result["area"] = result["bbox"][2] * result["bbox"][3]
    for number, result in enumerate(results, start=1):
        result["id"], result["iscrowd"] = number, 0
    coco_dt = type(coco_gt)()
    coco_dt.dataset = {"info": copy.deepcopy(coco_gt.dataset.get("info", {})),
                       "images": list(coco_gt.dataset["images"]),
                       "categories": copy.deepcopy(coco_gt.dataset["categories"]),
                       "annotations": results}
    coco_dt.createIndex()
    return coco_dt


def evaluate_results(coco_gt: COCO, results: Sequence[dict], iou_types: Iterable[str] = IOU_TYPES,
                     image_ids: Iterable[int] | None = None, backend: str = "auto") -> dict[str, float]:
    """{iou_type: AP at IoU 0.50:0.95} for COCO results; see score_results for the arguments."""
    stats = score_results(coco_gt, results, iou_types, image_ids, backend)
    return {iou_type: values[0] for iou_type, values in stats.items()}


_FASTER_GT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _backend(backend: str, coco_gt: COCO) -> tuple[Callable, object]:
    """The COCOeval class to use and the ground truth in the form that class reads."""
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r} is not one of {BACKENDS}")
    if backend == "pycocotools":
        return COCOeval, coco_gt
    try:
        from faster_coco_eval import COCO as FasterCOCO, COCOeval_faster
    except ImportError:
        if backend == "faster_coco_eval":
            raise
        return COCOeval, coco_gt
    quiet = functools.partial(COCOeval_faster, print_function=log.debug)  # it logs at INFO
    if isinstance(coco_gt, FasterCOCO):
        return quiet, coco_gt
    faster_gt = _FASTER_GT.get(coco_gt)
    if faster_gt is None:  # indexed once per ground truth; a deep copy, so coco_gt stays untouched
        faster_gt = _FASTER_GT[coco_gt] = FasterCOCO(coco_gt.dataset, use_deepcopy=True)
    return quiet, faster_gt


class CocoEvaluator:
    """Collects this rank's detections, gathers every rank's on rank 0, scores them there.

    for images, targets in loader: evaluator.update(model(images), image_ids)
    evaluator.gather(); aps = evaluator.summarize()  # on rank 0: {"bbox": AP, "segm": AP}
    """

    def __init__(self, coco_gt: COCO, label_to_category: Sequence[int] | Mapping[int, int],
                 iou_types: Iterable[str] = IOU_TYPES, backend: str = "auto"):
        self.coco_gt = coco_gt
        self.backend = backend
        self.label_to_category = label_to_category
        self.iou_types = tuple(iou_types)
        self.results: list[dict] = []
        self.image_ids: list[int] = []
        self.stats: dict[str, list[float]] = {}

    def update(self, outputs: Sequence[Mapping], image_ids: Sequence[int]) -> None:
        """Add one batch: outputs at original image resolution, and the COCO ids of its images."""
        image_ids = [int(i) for i in image_ids]
        self.results.extend(detections_to_coco(outputs, image_ids, self.label_to_category))
        self.image_ids.extend(image_ids)

    def gather(self) -> None:
        """Bring every rank's results and image ids to rank 0 (a no-op without torch.distributed)."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        # gather_object, not all_gather_object: only rank 0 scores, so only it needs everything.
        mine = (self.results, self.image_ids)
        everyone = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
        dist.gather_object(mine, everyone, dst=0)
        if dist.get_rank() == 0:
            self.results = [result for results, _ in everyone for result in results]
            self.image_ids = [image_id for _, ids in everyone for image_id in ids]
        else:
            self.results, self.image_ids = [], []

    def summarize(self, image_ids: Iterable[int] | None = None) -> dict[str, float]:
        """{"bbox": AP, "segm": AP} over `image_ids` (default: every image given to update).

        Call on rank 0 after gather(); the 12 COCO numbers per type are kept in self.stats.
        """
        image_ids = self.image_ids if image_ids is None else image_ids
        self.stats = score_results(self.coco_gt, self.results, self.iou_types, image_ids,
                                   self.backend)
        for iou_type, values in self.stats.items():
            log.info("%s: %s", iou_type,
                     " ".join(f"{name}={value:.4f}" for name, value in zip(STAT_NAMES, values)))
        return {iou_type: values[0] for iou_type, values in self.stats.items()}
