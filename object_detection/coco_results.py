"""Detections as COCO results: `detections_to_results` turns a batch of model outputs into
`CocoResults` columns (masks RLE-encoded by the encoder the caller picks: rle.encode_on_host, or
fast.rle_gpu.encode_all where they live), which the evaluator keeps, gathers and scores. Needs
numpy; torch only when given tensors.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np

from object_detection.rle import encode_on_host


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
                       label_to_category: Sequence[int] | Mapping[int, int], box_offset: int = 0,
                       encode: Callable = encode_on_host) -> list[dict]:
    """COCO result dicts (image_id, category_id, bbox xywh, score, segmentation RLE) for a batch.

    `outputs`: one torchvision-detection dict per image, at the image's original resolution:
    boxes [N,4] xyxy, labels [N] (contiguous 1..K), scores [N], and optionally masks [N,1,H,W]
    (probabilities, thresholded at 0.5; uint8 or bool masks are taken as already thresholded).
    Tensors (on any device, boxes and scores in any float type: a model's outputs as they come
    under autocast) or numpy arrays. `label_to_category`: a mapping label -> COCO
    category id, or a sequence indexed by label whose element 0 (background) is None or 0.
    `box_offset` 1: the model's boxes end on their last pixel (the reference's +1 widths), so a
    box's COCO width is x1 - x0 + 1. `encode(masks per image, results per image)`: the masks' RLEs
    in order (default: pycocotools on the host; fast.rle_gpu.encode_all: on the GPU where they are).
    """
    return detections_to_results(outputs, image_ids, label_to_category, box_offset, encode).to_dicts()


def detections_to_results(outputs: Sequence[Mapping], image_ids: Sequence[int],
                          label_to_category: Sequence[int] | Mapping[int, int], box_offset: int = 0,
                          encode: Callable = encode_on_host) -> CocoResults:
    """detections_to_coco as CocoResults columns.

    The whole batch at once: GPU tensors cross to the host in one copy per field, and `encode` gets
    every mask of the batch in one call (fast.rle_gpu.encode_all encodes them in one GPU pass).
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
        masks = [output.get("masks") for output, _ in found]
        for m, n in zip(masks, per_image):
            if m is not None and len(m) != n:
                raise ValueError(f"{len(m)} masks for {n} boxes")
        segmentations = encode(masks, per_image)
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
