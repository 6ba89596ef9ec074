"""Evaluation's speed pieces, behind the same switch as the model's (`--speed fast`;
evaluate.StockEvaluation is the stock path): `FastEvaluation` hands CocoEvaluator

- the GPU mask encoder (fast.rle_gpu.encode_all: every mask of a batch in one pass);
- results loaded in one pass (`load_results`, where pycocotools' loadRes calls C per result);
- faster-coco-eval's COCOeval where installed (`Backend`);
- from PARALLEL_MIN_RESULTS results on, worker processes that each score a share of the categories
  (`ScoringPool`). COCOeval's precision and recall of a category depend only on that category's
  detections and ground truth, and its summary is a mean over categories: the workers' arrays
  put side by side give pycocotools' summarize exactly the numbers one process computes.

The same numbers as the stock path (tests/test_evaluate.py). Every piece of state is held by an
object, none by the module: a trainer keeps one FastEvaluation (and so its workers) per run, and
a worker process keeps its indexed ground truth in the `serve` call that is its life.
"""
from __future__ import annotations

import collections
import contextlib
import copy
import functools
import io
import logging
import multiprocessing
import os
import pickle
import queue
import tempfile
import threading
import time
import traceback
import weakref
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future
from concurrent.futures.process import BrokenProcessPool

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from object_detection.coco_results import CocoResults
from object_detection.evaluate import IOU_TYPES, accumulated, score_with, summaries
from object_detection.fast.rle_gpu import encode_all

log = logging.getLogger(__name__)

# pycocotools is the reference. faster-coco-eval (C++ evaluate and accumulate, the same numbers to
# 1e-4 in tests/test_evaluate.py) is used when installed: about 7x less time on 1000 COCO-like
# images with 100 detections each (80 s against 11 s on a loaded 2-core host).
BACKENDS = ("auto", "pycocotools", "faster_coco_eval")
# Below this many results one process scores faster than starting and feeding workers.
PARALLEL_MIN_RESULTS = 20000


def default_workers() -> int:
    return min(len(os.sched_getaffinity(0)), 8)


def score_results(coco_gt: COCO, results: Sequence[dict] | CocoResults, iou_types: Iterable[str] = IOU_TYPES,
                  image_ids: Iterable[int] | None = None, backend: str = "auto",
                  workers: int | None = None) -> dict[str, list[float]]:
    """evaluate.score_with with a FastEvaluation of this call's own: `backend` one of BACKENDS
    ("auto" takes faster_coco_eval when it is installed); `workers` processes score shares of the
    categories (the same numbers), ended after the call; default: one per core, up to 8, from
    PARALLEL_MIN_RESULTS results on, else 1."""
    with FastEvaluation(backend, workers) as evaluation:
        return score_with(evaluation, coco_gt, results, iou_types, image_ids)


def evaluate_results(coco_gt: COCO, results: Sequence[dict], iou_types: Iterable[str] = IOU_TYPES,
                     image_ids: Iterable[int] | None = None, backend: str = "auto") -> dict[str, float]:
    """{iou_type: AP at IoU 0.50:0.95} for COCO results; see score_results for the arguments."""
    stats = score_results(coco_gt, results, iou_types, image_ids, backend)
    return {iou_type: values[0] for iou_type, values in stats.items()}


class FastEvaluation:
    """CocoEvaluator's `speed` for `--speed fast`: `encode` and `score`. A trainer keeps one per
    run: its worker processes, once started, and their indexed ground truth serve every
    evaluation; `close()` ends them."""

    encode = staticmethod(encode_all)

    def __init__(self, backend: str = "auto", workers: int | None = None):
        self.backend = Backend(backend)
        self.workers = workers  # None: default_workers(), from PARALLEL_MIN_RESULTS results on
        self.pool: ScoringPool | None = None
        self.failed = False     # the workers broke once: scored in this process from then on

    def __enter__(self) -> FastEvaluation:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self, coco_gt: COCO | None = None) -> list[Future]:
        """Start the worker processes now, without waiting for them: a trainer calls this in
        initialisation (no `coco_gt`: nothing of the dataset is read before run_start), and again
        with the ground truth once the run has started, so that the workers index it while the
        first epoch trains. Returns futures that are done once the workers are up (and hold `coco_gt`)."""
        pool = self._pool()
        return [] if pool is None else pool.start(coco_gt)

    def score(self, coco_gt: COCO, results: CocoResults, iou_types: tuple[str, ...],
              image_ids: list[int] | None) -> dict[str, list[float]]:
        """The summary numbers of `results` (not empty, on `image_ids` only) per IoU type."""
        workers = self.workers or (default_workers() if len(results) >= PARALLEL_MIN_RESULTS else 1)
        pool = self._pool() if workers > 1 else None
        if pool is not None:
            try:
                return pool.score(coco_gt, results, iou_types, image_ids)
            except BrokenProcessPool as exc:
                self._failed(exc)
        evaluator_class, gt = self.backend.evaluator(coco_gt)
        return summaries(lambda iou_type: evaluated(evaluator_class, gt, results.to_dicts(iou_type), iou_type,
                                                    image_ids), iou_types)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool = None

    def _pool(self) -> ScoringPool | None:
        if self.pool is None and not self.failed:
            try:
                self.pool = ScoringPool(self.workers or default_workers(), self.backend.name)
            except BrokenProcessPool as exc:
                self._failed(exc)
        return self.pool

    def _failed(self, exc: BrokenProcessPool) -> None:
        """Not worth losing a run over: score in this process, from now on."""
        self.close()
        self.failed = True
        log.warning("scoring in worker processes failed (%s); scoring in this process instead. A script "
                    "that scores COCO results must keep its code under `if __name__ == \"__main__\":` "
                    "(workers start by importing it again)", exc)


class Backend:
    """A COCOeval implementation by name (one of BACKENDS), with each ground truth in the form it
    reads: faster-coco-eval indexes a copy of its own, once per COCO object."""

    def __init__(self, name: str = "auto"):
        if name not in BACKENDS:
            raise ValueError(f"backend {name!r} is not one of {BACKENDS}")
        self.name = name
        self._indexed: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # coco_gt -> its copy

    def evaluator(self, coco_gt: COCO) -> tuple[Callable, object]:
        """The COCOeval class to use and the ground truth in the form that class reads."""
        if self.name == "pycocotools":
            return COCOeval, coco_gt
        try:
            from faster_coco_eval import COCO as FasterCOCO, COCOeval_faster
        except ImportError:
            if self.name == "faster_coco_eval":
                raise
            return COCOeval, coco_gt
        quiet = functools.partial(COCOeval_faster, print_function=log.debug)  # it logs at INFO
        if isinstance(coco_gt, FasterCOCO):
            return quiet, coco_gt
        if coco_gt not in self._indexed:  # a deep copy, so coco_gt stays untouched
            self._indexed[coco_gt] = FasterCOCO(coco_gt.dataset, use_deepcopy=True)
        return quiet, self._indexed[coco_gt]


def evaluated(evaluator_class, coco_gt, own: list[dict], iou_type: str, image_ids: list[int] | None,
              category_ids: list[int] | None = None):
    """A COCOeval of `own` (loaded by load_results) after evaluate() and accumulate(), optionally
    on some categories only."""
    return accumulated(evaluator_class(coco_gt, load_results(coco_gt, own, iou_type), iou_type), image_ids,
                       category_ids)


def load_results(coco_gt, results: list[dict], iou_type: str):
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


class ScoringPool:
    """Worker processes that evaluate and accumulate shares of the categories (`score`), kept for
    the run's next evaluation; each keeps the ground truth it last indexed.

    forkserver, not fork: the trainer has CUDA and loader threads that a forked child must not
    inherit. Every process starts here, at once (ProcessPoolExecutor had started one late, at
    submit time), and a thread of ours feeds it (`_Worker`), so submitting never waits. The
    ground truth reaches the workers through a file (`ground_truth_file`), not their start
    arguments: those are written to each new process while it imports the trainer's modules, which
    held the caller for seconds per process (8.5 s measured for one late start)."""

    def __init__(self, workers: int, backend: str = "auto"):
        method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
        context = multiprocessing.get_context(method)
        self.ground_truth_files: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # coco_gt -> its pickle
        self._workers: list[_Worker] = []
        self._removals: list[weakref.finalize] = []
        self._close = weakref.finalize(self, _shut, self._workers, self._removals)  # also when forgotten
        try:
            for _ in range(workers):
                self._workers.append(_Worker(context, backend))
        except (OSError, EOFError) as exc:  # e.g. a forkserver that died importing a script without a main guard
            self.close()
            raise BrokenProcessPool(f"a scoring worker process did not start: {exc!r}") from exc

    def close(self) -> None:
        """End the workers (after the tasks they were given) and remove the ground truth files."""
        self._close()

    def start(self, coco_gt: COCO | None = None) -> list[Future]:
        """A task per worker, done once it is up (and, given `coco_gt`, has indexed it)."""
        path = None if coco_gt is None else self.ground_truth_file(coco_gt)
        return [worker.submit("started", path) for worker in self._workers]

    def score(self, coco_gt: COCO, results: CocoResults, iou_types: tuple[str, ...],
              image_ids: list[int] | None) -> dict[str, list[float]]:
        """Score the IoU types as shares of the categories of similar weight, one per worker."""
        started = time.perf_counter()
        path = self.ground_truth_file(coco_gt)
        category_ids = sorted(coco_gt.getCatIds())
        detections = collections.Counter(dict(zip(*np.unique(results.category_ids, return_counts=True))))
        weight = {c: detections[c] + len(coco_gt.catToImgs.get(c, ())) for c in category_ids}
        shares = balanced_shares(category_ids, weight.__getitem__, len(self._workers))
        share_of = np.full(max(category_ids + [int(results.category_ids.max())]) + 1, -1)
        for share, members in enumerate(shares):
            share_of[members] = share
        share_of_result = share_of[results.category_ids]
        futures = [worker.submit("score_share", path, results.subset(share_of_result == share), iou_types,
                                 image_ids, members)
                   for worker, (share, members) in zip(self._workers, enumerate(shares))]
        submitted = time.perf_counter()
        merged, busy = {}, []
        for members, future in zip(shares, futures):
            index = [category_ids.index(c) for c in members]
            per_type, seconds = future.result()
            busy.append(seconds)
            for iou_type, arrays in per_type.items():
                if iou_type not in merged:  # precision, scores [T,R,K,A,M], recall [T,K,A,M]: K third from the end
                    merged[iou_type] = {key: np.full(value.shape[:-3] + (len(category_ids),) + value.shape[-2:], -1.0)
                                        for key, value in arrays.items()}
                for key, value in arrays.items():
                    merged[iou_type][key][..., index, :, :] = value
        stats = summaries(lambda iou_type: _summarizable(iou_type, merged[iou_type], category_ids), tuple(merged))
        log.debug("scored %d results in %d workers: %.2f s to split and send, %.2f s in all; worker "
                  "seconds %s", len(results), len(shares), submitted - started, time.perf_counter() - started,
                  " ".join(f"{b:.2f}" for b in busy))
        return stats

    def ground_truth_file(self, coco_gt: COCO) -> str:
        """The pickled ground truth the workers load, written once per COCO object (removed with
        it, or with this pool)."""
        if coco_gt not in self.ground_truth_files:
            descriptor, path = tempfile.mkstemp(prefix="coco-ground-truth-", suffix=".pickle")
            with os.fdopen(descriptor, "wb") as file:
                pickle.dump(coco_gt.dataset, file, protocol=pickle.HIGHEST_PROTOCOL)
            self.ground_truth_files[coco_gt] = path
            self._removals.append(weakref.finalize(coco_gt, _remove, path))
        return self.ground_truth_files[coco_gt]


def _summarizable(iou_type: str, arrays: dict[str, np.ndarray], category_ids: list[int]) -> COCOeval:
    """A COCOeval holding the workers' accumulated arrays, for summarize() alone."""
    summary = COCOeval(iouType=iou_type)
    summary.params.catIds = category_ids
    summary.eval = {"params": summary.params, **arrays}
    return summary


def balanced_shares(items: list[int], weight: Callable[[int], int], shares: int) -> list[list[int]]:
    """`items` in at most `shares` groups of similar total weight (heaviest first, to the lightest
    group), each group sorted; no empty groups."""
    groups = [[0, []] for _ in range(min(shares, len(items)))]
    for item in sorted(items, key=weight, reverse=True):
        lightest = min(groups, key=lambda group: group[0])
        lightest[0] += weight(item)
        lightest[1].append(item)
    return [sorted(members) for _, members in groups]


def _shut(workers: list[_Worker], removals: list[weakref.finalize]) -> None:
    for worker in workers:
        worker.close()
    for removal in removals:
        removal()


def _remove(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


class _Worker:
    """One worker process and the thread of ours that sends it tasks, one at a time, and settles
    their futures in order. Once its process has ended, every task fails with BrokenProcessPool."""

    def __init__(self, context, backend: str):
        self.connection, theirs = context.Pipe()
        self.process = context.Process(target=serve, args=(theirs, backend), daemon=True)
        self.process.start()  # raises in a process still importing its main script: no workers from there
        theirs.close()        # so that its end closing, when it dies, reaches us
        self.tasks: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._feed, name="scoring-worker", daemon=True).start()

    def submit(self, method: str, *args) -> Future:
        future = Future()
        self.tasks.put((future, method, args))
        return future

    def close(self) -> None:
        self.tasks.put(None)

    def _feed(self) -> None:
        ended = None
        while (task := self.tasks.get()) is not None:
            future, method, args = task
            if not future.set_running_or_notify_cancel():
                continue
            if ended is None:
                try:
                    self.connection.send((method, args))
                    done, value, text = self.connection.recv()
                except (EOFError, OSError) as exc:
                    ended = f"a scoring worker process ended ({exc!r}, exit code {self.process.exitcode})"
                except Exception as exc:  # a task or a reply that does not pickle
                    future.set_exception(exc)
                    continue
                else:
                    if not done:  # the worker's traceback, as the cause
                        value.__cause__ = RuntimeError(f"in a scoring worker process:\n{text}")
                    (future.set_result if done else future.set_exception)(value)
                    continue
            future.set_exception(BrokenProcessPool(ended))
        with contextlib.suppress(OSError):
            self.connection.send(None)
        self.connection.close()
        self.process.join(timeout=30)


def serve(connection, backend: str) -> None:
    """A worker process's life: the pool's tasks in order, until the pool closes or its process
    ends. What the worker keeps between tasks (the ground truth it indexed) lives in this call."""
    worker = _ShareScorer(backend)
    while True:
        try:
            task = connection.recv()
        except EOFError:
            return
        if task is None:
            return
        method, args = task
        try:
            reply = (True, getattr(worker, method)(*args), None)
        except Exception as exc:
            reply = (False, exc, traceback.format_exc())
        try:
            connection.send(reply)
        except Exception:  # an exception that does not pickle: its text instead
            connection.send((False, RuntimeError(repr(reply[1])), reply[2]))


class _ShareScorer:
    """A worker's side: its tasks, and the ground truth it was last given, loaded and indexed once
    (in the form its backend reads)."""

    def __init__(self, backend: str):
        self.backend = Backend(backend)
        self.path: str | None = None
        self.gt: COCO | None = None

    def ground_truth(self, path: str) -> COCO:
        if self.path != path:
            with open(path, "rb") as file:
                gt = COCO()
                gt.dataset = pickle.load(file)
            with contextlib.redirect_stdout(io.StringIO()):
                gt.createIndex()
                self.backend.evaluator(gt)  # builds and keeps faster_coco_eval's index when that is the backend
            self.path, self.gt = path, gt
        return self.gt

    def started(self, path: str | None = None) -> float:
        """The task that makes a worker start (and, given `path`, index that ground truth) before
        scoring needs it."""
        if path is not None:
            self.ground_truth(path)
        return time.time()

    def score_share(self, path: str, results: CocoResults, iou_types: tuple[str, ...], image_ids: list[int] | None,
                    category_ids: list[int]) -> tuple[dict[str, dict[str, np.ndarray]], float]:
        """Evaluate and accumulate these categories; per IoU type precision, recall and scores,
        and the seconds it took."""
        started = time.perf_counter()
        evaluator_class, gt = self.backend.evaluator(self.ground_truth(path))
        arrays = {}
        for iou_type in iou_types:
            with contextlib.redirect_stdout(io.StringIO()):
                evaluator = evaluated(evaluator_class, gt, results.to_dicts(iou_type), iou_type, image_ids,
                                      category_ids)
            arrays[iou_type] = {key: np.asarray(evaluator.eval[key]) for key in ("precision", "recall", "scores")}
        return arrays, time.perf_counter() - started
