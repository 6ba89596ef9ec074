"""COCO evaluation: ground truth scores 1.0, perturbations score what pycocotools says, and a
two-rank gloo run gathers to the single-process score. Real pycocotools on the shapes set."""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from object_detection.coco_results import detections_to_coco
from object_detection.evaluate import CocoEvaluator
from object_detection.fast import rle_gpu
from object_detection.fast.rle_gpu import encode_tensors
from object_detection.fast.scoring import FastEvaluation, evaluate_results, score_results
from mlperf.datasets.shapes import make_shapes

# Contiguous labels to COCO ids, permuted on purpose so that a mapping left out would show.
LABEL_TO_CATEGORY = {1: 3, 2: 1, 3: 2}
CATEGORY_TO_LABEL = {category: label for label, category in LABEL_TO_CATEGORY.items()}


@pytest.fixture(scope="module")
def coco_gt(tmp_path_factory) -> COCO:
    root = tmp_path_factory.mktemp("data") / "shapes"
    make_shapes(root, train_images=1, val_images=24, image_size=96, seed=11, workers=1)
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(root / "annotations" / "instances_val2017.json"))


def ground_truth_outputs(coco: COCO, image_id: int) -> dict:
    """The image's annotations as a model would output them: xyxy boxes, masks [N,1,H,W] floats."""
    anns = coco.loadAnns(coco.getAnnIds(imgIds=image_id))
    boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)],
                         dtype=torch.float32)
    masks = torch.from_numpy(np.stack([coco.annToMask(a) for a in anns])).float()[:, None]
    return {"boxes": boxes, "labels": torch.tensor([CATEGORY_TO_LABEL[a["category_id"]] for a in anns]),
            "scores": torch.linspace(0.99, 0.5, len(anns)), "masks": masks * 0.9}


def perturbed_outputs(coco: COCO, image_id: int, rng: np.random.Generator) -> dict:
    """Shift boxes and masks by a few pixels, drop some, relabel some, add a false positive."""
    out = ground_truth_outputs(coco, image_id)
    n = len(out["labels"])
    keep = torch.from_numpy(rng.random(n) > 0.2)
    shift = torch.from_numpy(rng.integers(-2, 3, size=(n, 2))).float()
    out["boxes"] = out["boxes"] + shift.repeat(1, 2)
    out["masks"] = torch.stack([torch.roll(m, shifts=(int(dy), int(dx)), dims=(1, 2))
                                for m, (dx, dy) in zip(out["masks"], shift.tolist())])
    relabel = torch.from_numpy(rng.random(n) < 0.15)
    out["labels"] = torch.where(relabel, out["labels"] % 3 + 1, out["labels"])
    out["scores"] = torch.from_numpy(rng.uniform(0.05, 1.0, n)).float()
    out = {key: value[keep] for key, value in out.items()}
    h, w = coco.imgs[image_id]["height"], coco.imgs[image_id]["width"]
    false_mask = torch.zeros(1, 1, h, w)
    false_mask[..., : h // 3, : w // 3] = 1.0
    out["boxes"] = torch.cat([out["boxes"], torch.tensor([[0.0, 0.0, w // 3, h // 3]])])
    out["labels"] = torch.cat([out["labels"], torch.tensor([1])])
    out["scores"] = torch.cat([out["scores"], torch.tensor([0.3])])
    out["masks"] = torch.cat([out["masks"], false_mask])
    return out


def noisy_outputs(coco: COCO, image_id: int, rng: np.random.Generator) -> dict:
    """Four perturbed copies of the image's objects: duplicates and hundreds of results."""
    copies = [perturbed_outputs(coco, image_id, rng) for _ in range(4)]
    return {key: torch.cat([copy[key] for copy in copies]) for key in copies[0]}


def pycocotools_directly(coco: COCO, outputs: dict, iou_type: str) -> list[float]:
    """The same detections scored by hand, per instance, without object_detection's evaluation."""
    results = []
    for image_id, out in outputs.items():
        for box, label, score, mask in zip(out["boxes"].tolist(), out["labels"].tolist(),
                                           out["scores"].tolist(), out["masks"][:, 0].numpy()):
            result = {"image_id": image_id, "category_id": LABEL_TO_CATEGORY[label], "score": score}
            if iou_type == "bbox":
                result["bbox"] = [box[0], box[1], box[2] - box[0], box[3] - box[1]]
            else:
                result["segmentation"] = mask_utils.encode(np.asfortranarray(mask > 0.5,
                                                                             dtype=np.uint8))
            results.append(result)
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator = COCOeval(coco, coco.loadRes(results), iou_type)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return list(evaluator.stats)


def all_outputs(coco: COCO, make) -> dict[int, dict]:
    rng = np.random.default_rng(0)
    return {image_id: make(coco, image_id) if make is ground_truth_outputs else make(coco, image_id, rng)
            for image_id in coco.getImgIds()}


def to_results(outputs: dict[int, dict]) -> list[dict]:
    return detections_to_coco(list(outputs.values()), list(outputs), LABEL_TO_CATEGORY)


@pytest.mark.parametrize("backend", ["pycocotools", "faster_coco_eval"])
def test_ground_truth_fed_back_scores_one(coco_gt, backend):
    results = to_results(all_outputs(coco_gt, ground_truth_outputs))
    assert len(results) == len(coco_gt.anns)
    assert evaluate_results(coco_gt, results, backend=backend) == \
        {"bbox": pytest.approx(1.0), "segm": pytest.approx(1.0)}


@pytest.mark.parametrize("make", [perturbed_outputs, noisy_outputs])
def test_perturbed_detections_score_what_pycocotools_gives(coco_gt, make):
    outputs = all_outputs(coco_gt, make)
    results = to_results(outputs)
    assert len(results) > 255 or make is perturbed_outputs  # past pycocotools' uint8 scratch
    stats = score_results(coco_gt, results, backend="pycocotools")
    for iou_type in ("bbox", "segm"):
        expected = pycocotools_directly(coco_gt, outputs, iou_type)
        assert stats[iou_type] == expected
        assert 0.1 < expected[0] < 0.9, f"{iou_type}: the perturbation should cost some AP, not all"


def test_faster_coco_eval_matches_pycocotools(coco_gt):
    results = to_results(all_outputs(coco_gt, noisy_outputs))
    half = coco_gt.getImgIds()[::2]
    for image_ids in (None, half):
        reference = score_results(coco_gt, results, image_ids=image_ids, backend="pycocotools")
        faster = score_results(coco_gt, results, image_ids=image_ids, backend="faster_coco_eval")
        for iou_type in ("bbox", "segm"):
            assert faster[iou_type] == pytest.approx(reference[iou_type], abs=1e-4)


def test_thresholded_and_numpy_masks_give_the_same_results(coco_gt):
    image_id = coco_gt.getImgIds()[0]
    out = ground_truth_outputs(coco_gt, image_id)
    as_uint8 = {**out, "masks": (out["masks"] > 0.5).to(torch.uint8)}
    as_numpy = {key: value.numpy() for key, value in out.items()}
    expected = detections_to_coco([out], [image_id], [None, 3, 1, 2])
    assert detections_to_coco([as_uint8], [image_id], LABEL_TO_CATEGORY) == expected
    assert detections_to_coco([as_numpy], [image_id], LABEL_TO_CATEGORY) == expected
    json.dumps(expected)  # results must be plain JSON (RLE counts as text)
    for result, ann in zip(expected, coco_gt.loadAnns(coco_gt.getAnnIds(imgIds=image_id))):
        assert result["segmentation"] == ann["segmentation"]
        assert result["bbox"] == pytest.approx(ann["bbox"])


def test_outputs_under_autocast_are_taken_as_they_come(coco_gt):
    """bf16 and fp16 boxes and scores (a model's outputs under autocast; numpy has neither) give
    the results of the same values in float32, and probability masks those of thresholded ones."""
    image_id = coco_gt.getImgIds()[0]
    out = ground_truth_outputs(coco_gt, image_id)
    for dtype in (torch.bfloat16, torch.float16):
        low = {**out, "boxes": out["boxes"].to(dtype), "scores": out["scores"].to(dtype)}
        as_float = {**low, "boxes": low["boxes"].float(), "scores": low["scores"].float(),
                    "masks": out["masks"] > 0.5}
        assert detections_to_coco([low], [image_id], LABEL_TO_CATEGORY) == \
            detections_to_coco([as_float], [image_id], LABEL_TO_CATEGORY)


def test_run_lengths_found_by_torch_are_the_bytes_pycocotools_encodes():
    """The GPU path (encode_tensors), run here on CPU tensors: edge cases and random masks, one
    image at a time and all images (each its own size) in one pass."""
    generator = torch.Generator().manual_seed(0)
    cases = [torch.zeros(2, 5, 7, dtype=torch.bool), torch.ones(2, 5, 7, dtype=torch.bool),
             torch.ones(1, 1, 1, dtype=torch.bool)]
    for shape in ((3, 7, 9), (4, 2, 3), (6, 33, 40)):
        cases += [torch.rand(shape, generator=generator) > level for level in (0.1, 0.5, 0.9)]
    edges = torch.zeros(1, 6, 8, dtype=torch.bool)
    edges[0, 0, :] = edges[0, -1, :] = edges[0, :, 0] = edges[0, :, -1] = True
    cases.append(edges)
    # Long runs (counts that take 4-5 characters, differences of either sign), empty masks
    # between others, and a mask whose only run reaches the last pixel.
    large = torch.zeros(5, 700, 900, dtype=torch.bool)
    large[0, 10:600, 20:880] = True
    large[2, 650:, 899] = True
    large[3, 300:302, 5:700] = True
    large[4, -1, -1] = True
    cases.append(large)
    cases.insert(4, torch.zeros(0, 4, 4, dtype=torch.bool))  # an image without detections
    everything = []
    for masks in cases:
        expected = [{"size": list(rle["size"]), "counts": rle["counts"].decode()} for rle in
                    mask_utils.encode(np.asfortranarray(masks.permute(1, 2, 0).numpy(), dtype=np.uint8))] \
            if len(masks) else []
        assert encode_tensors([masks]) == expected
        everything += expected
    assert encode_tensors(cases) == everything
    assert encode_tensors([]) == []


def test_a_batch_encoded_in_one_pass_gives_what_each_image_gives(coco_gt, monkeypatch):
    """The fast encoder routes GPU masks of a whole batch through one encode_tensors pass; with
    CPU tensors taken for GPU ones, the results are those of the image-by-image path, also for an
    image without detections and one without masks in the same batch."""
    image_ids = coco_gt.getImgIds()[:5]
    outputs = [ground_truth_outputs(coco_gt, i) for i in image_ids]
    outputs[1] = {key: value[:0] for key, value in outputs[1].items()}
    outputs[3] = {key: value for key, value in outputs[3].items() if key != "masks"}
    expected = [r for out, i in zip(outputs, image_ids) for r in detections_to_coco([out], [i], LABEL_TO_CATEGORY)]
    assert any("segmentation" not in r for r in expected) and sum("segmentation" in r for r in expected) > 3
    monkeypatch.setattr(rle_gpu, "on_gpu", lambda masks: isinstance(masks, torch.Tensor))
    calls = []
    encode = rle_gpu.encode_tensors
    monkeypatch.setattr(rle_gpu, "encode_tensors", lambda binaries: calls.append(len(binaries)) or encode(binaries))
    assert detections_to_coco(outputs, image_ids, LABEL_TO_CATEGORY, encode=rle_gpu.encode_all) == expected
    assert calls == [3]  # the three images with detections and masks


def test_bad_label_maps_are_refused(coco_gt):
    out = ground_truth_outputs(coco_gt, coco_gt.getImgIds()[0])
    with pytest.raises(ValueError, match="element 0"):
        detections_to_coco([out], [1], [1, 2, 3])
    out["labels"] = torch.full_like(out["labels"], 3)
    with pytest.raises(ValueError, match="not all in label_to_category"):
        detections_to_coco([out], [1], {1: 3, 2: 1})


def test_only_the_evaluated_images_are_scored_and_nothing_scores_zero(coco_gt):
    outputs = all_outputs(coco_gt, ground_truth_outputs)
    first_half = coco_gt.getImgIds()[:12]
    evaluator = CocoEvaluator(coco_gt, LABEL_TO_CATEGORY)
    evaluator.update([outputs[i] for i in first_half], first_half)
    assert evaluator.summarize() == {"bbox": pytest.approx(1.0), "segm": pytest.approx(1.0)}
    everything = evaluator.summarize(image_ids=coco_gt.getImgIds())
    assert everything["bbox"] < 0.75 and everything["segm"] < 0.75
    empty = CocoEvaluator(coco_gt, LABEL_TO_CATEGORY)
    empty.update([{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
                   "scores": torch.zeros(0), "masks": torch.zeros(0, 1, 96, 96)}], first_half[:1])
    assert empty.summarize() == {"bbox": 0.0, "segm": 0.0}


def evaluated_stats(coco: COCO, outputs: dict[int, dict], speed) -> dict[str, list[float]]:
    """The 12 numbers per IoU type of a CocoEvaluator with this `speed`, fed in batches of 4."""
    evaluator = CocoEvaluator(coco, LABEL_TO_CATEGORY, speed=speed)
    image_ids = sorted(outputs)
    for start in range(0, len(image_ids), 4):
        batch = image_ids[start:start + 4]
        evaluator.update([outputs[i] for i in batch], batch)
    evaluator.summarize()
    return evaluator.stats


def test_speed_stock_and_fast_evaluations_give_the_same_scores(coco_gt, monkeypatch):
    """`--speed stock` evaluates as torchvision does (pycocotools' encoder, loadRes and COCOeval in
    one process) and gives the numbers of `--speed fast`: the trainer's FastEvaluation (faster-coco-
    eval where installed: to its 1e-4), and, to the last bit, every fast piece at once on pycocotools
    (masks through the GPU encoder, here on CPU tensors; the results loader; worker processes)."""
    from object_detection.evaluate import StockEvaluation
    from object_detection.rle import encode_on_host
    from object_detection.train import evaluation_speed, parse_args

    outputs = all_outputs(coco_gt, noisy_outputs)
    required = ["--data-root", "data", "--result-log", "log.txt"]
    stock_speed = evaluation_speed(parse_args([*required, "--speed", "stock"]))
    assert isinstance(stock_speed, StockEvaluation) and stock_speed.encode is encode_on_host
    stock = evaluated_stats(coco_gt, outputs, stock_speed)
    assert 0.1 < stock["bbox"][0] < 0.9 and 0.1 < stock["segm"][0] < 0.9
    fast_speed = evaluation_speed(parse_args(required))
    assert isinstance(fast_speed, FastEvaluation) and fast_speed.encode is rle_gpu.encode_all
    with fast_speed:
        fast = evaluated_stats(coco_gt, outputs, fast_speed)
    for iou_type in ("bbox", "segm"):
        assert fast[iou_type] == pytest.approx(stock[iou_type], abs=1e-4)
    monkeypatch.setattr(rle_gpu, "on_gpu", lambda masks: isinstance(masks, torch.Tensor))
    calls = []
    encode = rle_gpu.encode_tensors
    monkeypatch.setattr(rle_gpu, "encode_tensors", lambda binaries: calls.append(len(binaries)) or encode(binaries))
    with FastEvaluation(backend="pycocotools", workers=2) as every_piece:
        assert evaluated_stats(coco_gt, outputs, every_piece) == stock
        assert every_piece.pool is not None and not every_piece.failed
    assert calls  # the GPU encoder ran


@pytest.mark.slow
def test_the_stock_evaluation_loads_nothing_of_the_speed_code(tmp_path, coco_gt):
    """CocoEvaluator's default, and what `--speed stock` gives it, runs without object_detection.fast:
    a fresh interpreter scores with it and has not imported any of it."""
    import subprocess
    import sys

    annotations = tmp_path / "gt.json"
    annotations.write_text(json.dumps(coco_gt.dataset))
    code = (
        "import sys, torch\n"
        "from pycocotools.coco import COCO\n"
        "from object_detection.evaluate import CocoEvaluator\n"
        f"gt = COCO({str(annotations)!r})\n"
        "anns = gt.loadAnns(gt.getAnnIds(imgIds=[1]))\n"
        "evaluator = CocoEvaluator(gt, {c: c for c in gt.getCatIds()})\n"
        "evaluator.update([{'boxes': torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (a['bbox'] for a in anns)]),\n"
        "                   'labels': torch.tensor([a['category_id'] for a in anns]),\n"
        "                   'scores': torch.full((len(anns),), 0.9),\n"
        "                   'masks': torch.stack([torch.from_numpy(gt.annToMask(a)) for a in anns])[:, None]}], [1])\n"
        "print(evaluator.summarize())\n"
        "print(sorted(m for m in sys.modules if m.startswith('object_detection.fast')))\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    scores, fast_modules = done.stdout.splitlines()[-2:]
    assert fast_modules == "[]"
    assert scores == "{'bbox': 1.0, 'segm': 1.0}"  # its ground truth fed back


def _rank_main(rank: int, world_size: int, port: int, outputs: dict, annotation_file: str,
               answer: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            coco = COCO(annotation_file)
        mine = sorted(outputs)[rank::world_size]
        evaluator = CocoEvaluator(coco, LABEL_TO_CATEGORY, speed=FastEvaluation())
        for start in range(0, len(mine), 4):  # a few batches, as in the training loop
            batch = mine[start:start + 4]
            evaluator.update([outputs[i] for i in batch], batch)
        evaluator.gather()
        if rank == 0:
            Path(answer).write_text(json.dumps({"aps": evaluator.summarize(),
                                                "images": sorted(evaluator.image_ids)}))
        else:
            assert len(evaluator.results) == 0 and evaluator.image_ids == []
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_ranks_gather_to_the_single_process_score(coco_gt, tmp_path):
    outputs = all_outputs(coco_gt, perturbed_outputs)
    single = evaluate_results(coco_gt, to_results(outputs))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    answer = tmp_path / "answer.json"
    annotation_file = str(tmp_path / "gt.json")
    Path(annotation_file).write_text(json.dumps(coco_gt.dataset))
    mp.spawn(_rank_main, args=(2, port, outputs, annotation_file, str(answer)), nprocs=2)
    gathered = json.loads(answer.read_text())
    assert gathered["images"] == sorted(coco_gt.getImgIds())
    assert gathered["aps"] == single


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["pycocotools", "faster_coco_eval"])
def test_categories_scored_in_worker_processes_give_the_same_numbers(coco_gt, backend):
    """score_results(workers=N) splits the categories over N processes and merges their
    precision and recall: the same 12 numbers per IoU type as one process, to the last bit,
    also for a subset of images, and with a category that has ground truth but no detections."""
    results = to_results(all_outputs(coco_gt, noisy_outputs))
    missing_one = [r for r in results if r["category_id"] != 2]
    half = coco_gt.getImgIds()[::2]
    for chosen, image_ids in ((results, None), (results, half), (missing_one, None)):
        serial = score_results(coco_gt, chosen, image_ids=image_ids, backend=backend, workers=1)
        for workers in (2, 3):
            assert score_results(coco_gt, chosen, image_ids=image_ids, backend=backend,
                                 workers=workers) == serial
    assert score_results(coco_gt, [], backend=backend, workers=2) == \
        {"bbox": [0.0] * 12, "segm": [0.0] * 12}


def test_results_columns_survive_pickling_and_subsets(coco_gt):
    """What goes to the scoring workers (compact masks on the way) comes back as the same results."""
    import pickle

    from object_detection.coco_results import CocoResults

    results = to_results(all_outputs(coco_gt, noisy_outputs))
    columns = CocoResults.from_dicts(results)
    assert pickle.loads(pickle.dumps(columns)).to_dicts() == results
    without_masks = [{k: v for k, v in r.items() if k != "segmentation"} if i % 3 == 0 else r
                     for i, r in enumerate(results)]
    mixed = pickle.loads(pickle.dumps(CocoResults.from_dicts(without_masks)))
    assert mixed.to_dicts() == without_masks
    keep = np.arange(len(results)) % 2 == 0
    assert mixed.subset(keep).to_dicts() == [r for r, k in zip(without_masks, keep) if k]
    assert pickle.loads(pickle.dumps(CocoResults.from_dicts([{k: v for k, v in r.items() if k != "segmentation"}
                                                             for r in results]))).segmentations is None



def test_a_script_without_a_main_guard_still_scores_with_a_warning(tmp_path):
    """Workers start by importing the main script again; one that scores at import time breaks
    them. score_results then scores in its own process and says why, instead of failing."""
    import subprocess
    import sys

    script = tmp_path / "score.py"
    script.write_text(
        "from pycocotools.coco import COCO\n"
        "from object_detection.fast.scoring import score_results\n"
        "gt = COCO()\n"
        "gt.dataset = {'images': [{'id': 1, 'width': 10, 'height': 10}], 'categories': [{'id': 1}, {'id': 2}],\n"
        "              'annotations': [{'id': 1, 'image_id': 1, 'category_id': 1, 'bbox': [1, 1, 3, 3],\n"
        "                               'area': 9, 'iscrowd': 0}]}\n"
        "gt.createIndex()\n"
        "ap = score_results(gt, [{'image_id': 1, 'category_id': 1, 'bbox': [1, 1, 3, 3], 'score': 0.9}],\n"
        "                   ['bbox'], workers=2)['bbox'][0]\n"
        "print(f'AP {ap}')\n")  # one write: print('AP', ap) writes its pieces apart, and workers' lines fall between
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    # the workers that re-import the script print pycocotools' "creating index..." into the same
    # stdout, at times on the line where the script's own result lands
    assert re.findall(r"AP (\d+\.\d+)", done.stdout) == ["1.0"], done.stdout
    assert "scoring in this process instead" in done.stderr and '__name__ == "__main__"' in done.stderr
