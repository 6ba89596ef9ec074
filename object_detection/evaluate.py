"""COCO bbox and segm evaluation (pycocotools COCOeval), with the detections sharded across ranks.

Each rank turns the detections of its own images into COCO results (`detections_to_results`, kept
as `CocoResults` columns; masks RLE-encoded where they live), rank 0 gathers them and scores them
once (`CocoEvaluator`), from 20k results on in worker processes that each take a share of the
categories (`score_results`). As in the MLPerf reference, boxes and masks are scored from separate
result lists: the segm results carry no box, so COCOeval takes areas and boxes from the masks.
`evaluate_results` needs only numpy and pycocotools (faster-coco-eval, when installed, scores the
same numbers in a fraction of the time).
"""
from __future__ import annotations

import collections
import contextlib
import copy
import functools
import io
import logging
import os
import time
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from object_detection.rle import encode_all

log = logging.getLogger(__name__)

IOU_TYPES = ("bbox", "segm")
# pycocotools is the reference. faster-coco-eval (C++ evaluate and accumulate, the same numbers to
# 1e-4 in tests/test_evaluate.py) is used when installed: about 7x less time on 1000 COCO-like
# images with 100 detections each (80 s against 11 s on a loaded 2-core host).
BACKENDS = ("auto", "pycocotools", "faster_coco_eval")
STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl",
              "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


class CocoResults:
    """COCO detection results as columns: what the evaluator keeps, gathers and sends to scoring
    workers (a list of 500k result dicts takes seconds to build, pickle and split; columns take
    milliseconds). `to_dicts()` gives the usual list of COCO result dicts.

    image_ids, category_ids [N] int64; scores [N] float64; boxes [N,4] float64 xywh;
    segmentations: N RLE dicts (None for a result without a mask), or None if no result has one.
    """

    def __init__(self, image_ids=(), category_ids=(), scores=(), boxes=None, segmentations=None):
        self.image_ids = np.asarray(image_ids, dtype=np.int64)
        self.category_ids = np.asarray(category_ids, dtype=np.int64)
        self.scores = np.asarray(scores, dtype=np.float64)
        self.boxes = (np.zeros((0, 4)) if boxes is None else np.asarray(boxes, dtype=np.float64)).reshape(-1, 4)
        self.segmentations = segmentations
        if not len(self.image_ids) == len(self.category_ids) == len(self.scores) == len(self.boxes):
            raise ValueError("CocoResults columns differ in length")

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getstate__(self) -> dict:
        """Masks travel as their RLE texts and an array of sizes: pickling 500k small dicts took
        seconds of the trainer's time, the texts alone a fraction of that."""
        state = dict(self.__dict__)
        segmentations = state.pop("segmentations")
        if segmentations is not None:
            present = [s is not None for s in segmentations]
            state["mask_counts"] = [s["counts"] for s in segmentations if s is not None]
            state["mask_sizes"] = np.fromiter((n for s in segmentations if s is not None for n in s["size"]),
                                              dtype=np.int64, count=2 * len(state["mask_counts"])).reshape(-1, 2)
            state["mask_present"] = None if all(present) else np.array(present)
        return state

    def __setstate__(self, state: dict) -> None:
        counts = state.pop("mask_counts", None)
        sizes, present = state.pop("mask_sizes", None), state.pop("mask_present", None)
        self.__dict__.update(state)
        self.segmentations = None
        if counts is not None:
            masks = iter([{"size": size, "counts": text} for size, text in zip(sizes.tolist(), counts)])
            self.segmentations = (list(masks) if present is None
                                  else [next(masks) if here else None for here in present.tolist()])

    @classmethod
    def from_dicts(cls, results: Sequence[Mapping]) -> CocoResults:
        segmentations = [r.get("segmentation") for r in results]
        return cls([r["image_id"] for r in results], [r["category_id"] for r in results],
                   [r["score"] for r in results], [r["bbox"] for r in results],
                   segmentations if any(s is not None for s in segmentations) else None)

    @classmethod
    def concatenate(cls, parts: Iterable[CocoResults]) -> CocoResults:
        parts = [part for part in parts if len(part)]
        if not parts:
            return cls()
        segmentations = None
        if any(part.segmentations is not None for part in parts):
            segmentations = [s for part in parts
                             for s in (part.segmentations or [None] * len(part))]
        return cls(np.concatenate([p.image_ids for p in parts]), np.concatenate([p.category_ids for p in parts]),
                   np.concatenate([p.scores for p in parts]), np.concatenate([p.boxes for p in parts]),
                   segmentations)

    def subset(self, keep: np.ndarray) -> CocoResults:
        """The results where the bool array `keep` is true."""
        index = np.flatnonzero(keep)
        return CocoResults(self.image_ids[index], self.category_ids[index], self.scores[index],
                           self.boxes[index],
                           None if self.segmentations is None else [self.segmentations[i] for i in index])

    def to_dicts(self, iou_type: str | None = None) -> list[dict]:
        """COCO result dicts, fresh ones: everything, or what `iou_type` reads ("bbox": no masks;
        "segm": no boxes, only results with a mask: a segm result's box and area come from its
        mask, as in the reference)."""
        columns = zip(self.image_ids.tolist(), self.category_ids.tolist(), self.scores.tolist(),
                      self.boxes.tolist(), self.segmentations or [None] * len(self))
        if iou_type == "bbox":
            return [{"image_id": i, "category_id": c, "bbox": b, "score": s} for i, c, s, b, _ in columns]
        if iou_type == "segm":
            return [{"image_id": i, "category_id": c, "segmentation": m, "score": s}
                    for i, c, s, _, m in columns if m is not None]
        return [{"image_id": i, "category_id": c, "bbox": b, "score": s} | ({} if m is None else {"segmentation": m})
                for i, c, s, b, m in columns]


def detections_to_coco(outputs: Sequence[Mapping], image_ids: Sequence[int],
                       label_to_category: Sequence[int] | Mapping[int, int], box_offset: int = 0) -> list[dict]:
    """COCO result dicts (image_id, category_id, bbox xywh, score, segmentation RLE) for a batch.

    `outputs`: one torchvision-detection dict per image, at the image's original resolution:
    boxes [N,4] xyxy, labels [N] (contiguous 1..K), scores [N], and optionally masks [N,1,H,W]
    (probabilities, thresholded at 0.5; uint8 or bool masks are taken as already thresholded).
    Tensors (on any device, boxes and scores in any float type: a model's outputs as they come
    under autocast) or numpy arrays. `label_to_category`: a mapping label -> COCO
    category id, or a sequence indexed by label whose element 0 (background) is None or 0.
    `box_offset` 1: the model's boxes end on their last pixel (the reference's +1 widths), so a
    box's COCO width is x1 - x0 + 1.
    """
    return detections_to_results(outputs, image_ids, label_to_category, box_offset).to_dicts()


def detections_to_results(outputs: Sequence[Mapping], image_ids: Sequence[int],
                          label_to_category: Sequence[int] | Mapping[int, int], box_offset: int = 0) -> CocoResults:
    """detections_to_coco as CocoResults columns.

    The whole batch at once: GPU tensors cross to the host in one copy per field, and every mask of
    the batch is RLE-encoded in one pass (`rle.encode_tensors`); image by image, these were five waits
    for the GPU and ~70 small kernels per image.
    """
    outputs, image_ids = list(outputs), [int(i) for i in image_ids]
    if len(outputs) != len(image_ids):
        raise ValueError(f"{len(outputs)} outputs for {len(image_ids)} image ids")
    found = [(output, image_id) for output, image_id in zip(outputs, image_ids) if len(output["boxes"])]
    if not found:
        return CocoResults()
    lookup = _label_lookup(label_to_category)
    boxes = _numpy_cat([output["boxes"] for output, _ in found]).astype(np.float64).reshape(-1, 4)
    labels = _numpy_cat([output["labels"] for output, _ in found]).astype(np.int64)
    scores = _numpy_cat([output["scores"] for output, _ in found]).astype(np.float64)
    per_image = [len(output["boxes"]) for output, _ in found]
    ids = np.repeat([image_id for _, image_id in found], per_image)
    bad = (labels < 1) | (labels >= len(lookup))
    bad[~bad] = lookup[labels[~bad]] < 0
    if bad.any():
        image_id = int(ids[bad.argmax()])
        raise ValueError(f"labels {sorted(set(labels[ids == image_id].tolist()))} of image {image_id} are "
                         f"not all in label_to_category")
    boxes[:, 2:] -= boxes[:, :2] - box_offset
    segmentations = None
    if any("masks" in output for output, _ in found):
        segmentations = encode_all([output.get("masks") for output, _ in found], per_image)
    return CocoResults(ids, lookup[labels], scores, boxes, segmentations)


def _numpy_cat(values: list) -> np.ndarray:
    """All values end to end as one array: tensors (on any device) cross to the host in one copy."""
    if all(hasattr(value, "detach") for value in values):
        import torch

        return _numpy(torch.cat([value.detach().to(values[0].device) for value in values]))
    return np.concatenate([_numpy(value) for value in values])


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
        import torch

        value = value.detach()
        if value.dtype in (torch.bfloat16, torch.float16):  # under autocast; numpy has no bf16
            value = value.float()
        return value.cpu().numpy()
    return np.asarray(value)


def score_results(coco_gt: COCO, results: Sequence[dict] | CocoResults,
                  iou_types: Iterable[str] = IOU_TYPES, image_ids: Iterable[int] | None = None,
                  backend: str = "auto", workers: int | None = None) -> dict[str, list[float]]:
    """COCOeval's 12 summary numbers (STAT_NAMES) per IoU type; all zeros where nothing was found.

    `results`: COCO result dicts or CocoResults. `image_ids`: the images to score (default: every
    image of `coco_gt`); detections on other images are ignored, and ground truth on images not
    listed does not count as missed. `backend`: one of BACKENDS; "auto" takes faster_coco_eval
    when it is installed. `workers`: processes that score shares of the categories
    (`_score_in_workers`, the same numbers); default: one per core, up to 8, from
    PARALLEL_MIN_RESULTS results on, else 1.
    """
    iou_types = tuple(iou_types)
    for iou_type in iou_types:
        if iou_type not in IOU_TYPES:
            raise ValueError(f"iou type {iou_type!r} is not one of {IOU_TYPES}")
    image_ids = sorted({int(i) for i in image_ids}) if image_ids is not None else None
    zeros = {iou_type: [0.0] * len(STAT_NAMES) for iou_type in iou_types}
    if image_ids == []:  # nothing was evaluated: COCOeval cannot accumulate over no images
        return zeros
    if workers is None:
        workers = default_workers() if len(results) >= PARALLEL_MIN_RESULTS else 1
    if not isinstance(results, CocoResults):
        results = CocoResults.from_dicts(results)
    if image_ids is not None:
        results = results.subset(np.isin(results.image_ids, image_ids))
    if results.segmentations is None:  # COCOeval cannot score an empty result set
        iou_types = tuple(t for t in iou_types if t != "segm")
    if not len(results) or not iou_types:
        return zeros
    if workers > 1 and not _workers_failed(backend, workers):
        from concurrent.futures.process import BrokenProcessPool
        try:
            return zeros | _score_in_workers(coco_gt, results, iou_types, image_ids, backend, workers)
        except BrokenProcessPool as exc:  # not worth losing a run over: score here, from now on
            _POOLS[(backend, workers)] = None
            log.warning("scoring in worker processes failed (%s); scoring in this process instead. A script "
                        "that scores COCO results must keep its code under `if __name__ == \"__main__\":` "
                        "(workers start by importing it again)", exc)
    evaluator_class, backend_gt = _backend(backend, coco_gt)
    stats = {}
    for iou_type in iou_types:
        with contextlib.redirect_stdout(io.StringIO()) as printed:
            evaluator = _evaluated(evaluator_class, backend_gt, results.to_dicts(iou_type), iou_type,
                                   image_ids)
            evaluator.summarize()
        log.debug("COCOeval %s:\n%s", iou_type, printed.getvalue())
        stats[iou_type] = [float(value) for value in evaluator.stats]
    return zeros | stats


# Below this many results one process scores faster than starting and feeding workers.
PARALLEL_MIN_RESULTS = 20000


def _evaluated(evaluator_class, coco_gt, own: list[dict], iou_type: str, image_ids: list[int] | None,
               category_ids: list[int] | None = None):
    """A COCOeval of `own` after evaluate() and accumulate(), optionally on some categories only."""
    coco_dt = _load_results(coco_gt, own, iou_type)
    evaluator = evaluator_class(coco_gt, coco_dt, iou_type)
    if image_ids is not None:
        evaluator.params.imgIds = image_ids
    if category_ids is not None:
        evaluator.params.catIds = category_ids
    evaluator.evaluate()
    evaluator.accumulate()
    return evaluator


def _score_in_workers(coco_gt: COCO, results: CocoResults, iou_types: tuple[str, ...],
                      image_ids: list[int] | None, backend: str, workers: int) -> dict[str, list[float]]:
    """Score the IoU types as `workers` shares of the categories, in parallel processes.

    COCOeval's precision and recall of a category depend only on that category's detections and
    ground truth, and its summary is a mean over categories: each worker evaluates and
    accumulates its categories, and the arrays put side by side give pycocotools' summarize
    exactly the numbers one process computes (tests/test_evaluate.py compares them).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r} is not one of {BACKENDS}")
    started = time.perf_counter()
    pool = _scoring_pool(backend, workers)
    path = _ground_truth_file(coco_gt)
    category_ids = sorted(coco_gt.getCatIds())
    detections = collections.Counter(dict(zip(*np.unique(results.category_ids, return_counts=True))))
    weight = {c: detections[c] + len(coco_gt.catToImgs.get(c, ())) for c in category_ids}
    shares = _balanced_shares(category_ids, weight.__getitem__, workers)
    share_of = np.full(max(category_ids + [int(results.category_ids.max())]) + 1, -1)
    for share, members in enumerate(shares):
        share_of[members] = share
    share_of_result = share_of[results.category_ids]
    futures = [pool.submit(_score_share, path, results.subset(share_of_result == share), iou_types, image_ids,
                           members) for share, members in enumerate(shares)]
    submitted = time.perf_counter()
    merged, busy = {}, []
    for members, future in zip(shares, futures):
        index = [category_ids.index(c) for c in members]
        per_type, seconds = future.result()
        busy.append(seconds)
        for iou_type, accumulated in per_type.items():
            if iou_type not in merged:  # precision, scores [T,R,K,A,M], recall [T,K,A,M]: K third from the end
                merged[iou_type] = {key: np.full(value.shape[:-3] + (len(category_ids),) + value.shape[-2:], -1.0)
                                    for key, value in accumulated.items()}
            for key, value in accumulated.items():
                merged[iou_type][key][..., index, :, :] = value
    stats = {}
    for iou_type, arrays in merged.items():
        summary = COCOeval(iouType=iou_type)
        summary.params.catIds = category_ids
        summary.eval = {"params": summary.params, **arrays}
        with contextlib.redirect_stdout(io.StringIO()):
            summary.summarize()
        stats[iou_type] = [float(value) for value in summary.stats]
    log.debug("scored %d results in %d workers: %.2f s to split and send, %.2f s in all; worker "
              "seconds %s", len(results), workers, submitted - started, time.perf_counter() - started,
              " ".join(f"{b:.2f}" for b in busy))
    return stats


def _balanced_shares(items: list[int], weight: Callable[[int], int], shares: int) -> list[list[int]]:
    """`items` in at most `shares` groups of similar total weight (heaviest first, to the lightest
    group), each group sorted; no empty groups."""
    groups = [[0, []] for _ in range(min(shares, len(items)))]
    for item in sorted(items, key=weight, reverse=True):
        lightest = min(groups, key=lambda group: group[0])
        lightest[0] += weight(item)
        lightest[1].append(item)
    return [sorted(members) for _, members in groups]


_WORKER: dict = {}


def _start_worker(backend: str) -> None:
    """A worker starts without data (it may start before run_start, when nothing of the dataset
    may be read); its ground truth arrives with its first task (`_ground_truth`)."""
    _WORKER["backend"], _WORKER["path"], _WORKER["gt"] = backend, None, None


def _ground_truth(path: str):
    """This worker's ground truth (the pickled COCO dataset at `path`), loaded and indexed once, in
    the form its backend reads."""
    import pickle

    if _WORKER["path"] != path:
        with open(path, "rb") as file:
            gt = COCO()
            gt.dataset = pickle.load(file)
        with contextlib.redirect_stdout(io.StringIO()):
            gt.createIndex()
            _backend(_WORKER["backend"], gt)  # builds and keeps faster_coco_eval's index when that is the backend
        _WORKER["path"], _WORKER["gt"] = path, gt
    return _WORKER["gt"]


def _started(path: str | None = None) -> float:
    """A task that makes a worker start (and, given `path`, index that ground truth) before scoring
    needs it."""
    if path is not None:
        _ground_truth(path)
    return time.time()


def _score_share(path: str, results: CocoResults, iou_types: tuple[str, ...], image_ids: list[int] | None,
                 category_ids: list[int]) -> tuple[dict[str, dict[str, np.ndarray]], float]:
    """In a worker: evaluate and accumulate these categories; per IoU type precision, recall and
    scores, and the seconds it took."""
    started = time.perf_counter()
    evaluator_class, gt = _backend(_WORKER["backend"], _ground_truth(path))
    accumulated = {}
    for iou_type in iou_types:
        with contextlib.redirect_stdout(io.StringIO()):
            evaluator = _evaluated(evaluator_class, gt, results.to_dicts(iou_type), iou_type, image_ids,
                                   category_ids)
        accumulated[iou_type] = {key: np.asarray(evaluator.eval[key]) for key in ("precision", "recall", "scores")}
    return accumulated, time.perf_counter() - started


def start_scoring_workers(coco_gt: COCO | None = None, backend: str = "auto", workers: int | None = None) -> list:
    """Start score_results' worker processes now, without waiting for them: a trainer calls this
    in initialisation (no `coco_gt`: nothing of the dataset is read before run_start), and again
    with the ground truth once the run has started, so that the workers index it while the first
    epoch trains. Returns futures that are done once the workers are up (and hold `coco_gt`)."""
    workers = workers or default_workers()
    if _workers_failed(backend, workers):
        return []  # score_results scores in-process from now on
    pool = _scoring_pool(backend, workers)
    path = None if coco_gt is None else _ground_truth_file(coco_gt)
    return [pool.submit(_started, path) for _ in range(workers)]


def default_workers() -> int:
    return min(len(os.sched_getaffinity(0)), 8)


_POOLS: dict = {}                                               # (backend, workers) -> pool; None: broken
_GROUND_TRUTH_FILES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # coco_gt -> its pickle


def _workers_failed(backend: str, workers: int) -> bool:
    """Whether these workers broke before (score_results then marks their pool None)."""
    return _POOLS.get((backend, workers), True) is None


def _scoring_pool(backend: str, workers: int):
    """Worker processes, kept for the next evaluation of the run.

    forkserver, not fork: the trainer has CUDA and loader threads that a forked child must not
    inherit. The ground truth reaches the workers through a file, not their start arguments:
    those are written to each new process while it imports the trainer's modules, which held the
    caller for seconds per process (8.5 s measured for one late start)."""
    from concurrent.futures import ProcessPoolExecutor
    import multiprocessing

    key = (backend, workers)
    if key not in _POOLS:
        method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
        _POOLS[key] = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method),
                                          initializer=_start_worker, initargs=(backend,))
    return _POOLS[key]


def _ground_truth_file(coco_gt: COCO) -> str:
    """The pickled ground truth the workers load, written once per COCO object (removed with it)."""
    import pickle
    import tempfile

    if coco_gt not in _GROUND_TRUTH_FILES:
        descriptor, path = tempfile.mkstemp(prefix="coco-ground-truth-", suffix=".pickle")
        with os.fdopen(descriptor, "wb") as file:
            pickle.dump(coco_gt.dataset, file, protocol=pickle.HIGHEST_PROTOCOL)
        _GROUND_TRUTH_FILES[coco_gt] = path
        weakref.finalize(coco_gt, _remove, path)
    return _GROUND_TRUTH_FILES[coco_gt]


def _remove(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


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
                 iou_types: Iterable[str] = IOU_TYPES, backend: str = "auto", box_offset: int = 0):
        self.coco_gt = coco_gt
        self.box_offset = box_offset  # 1 for the reference recipe's +1 widths (detections_to_coco)
        self.backend = backend
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
        self._batches.append(detections_to_results(outputs, image_ids, self.label_to_category, self.box_offset))
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
        self.stats = score_results(self.coco_gt, self.results, self.iou_types, image_ids,
                                   self.backend)
        for iou_type, values in self.stats.items():
            log.info("%s: %s", iou_type,
                     " ".join(f"{name}={value:.4f}" for name, value in zip(STAT_NAMES, values)))
        return {iou_type: values[0] for iou_type, values in self.stats.items()}
