"""COCO evaluation of torchvision-style detectors (pycocotools' COCOeval, output silenced).

Metrics are flat floats named ``{iou_type}_{stat}`` with the 12 COCOeval stats:
AP, AP50, AP75, APs, APm, APl (stats[0:6]) and AR1, AR10, AR100, ARs, ARm, ARl (stats[6:12]),
on a 0-1 scale. As in COCOeval, a stat is -1.0 when it has nothing to measure (e.g. APs when
no ground-truth object is small); callers that plot or average should skip negative values.
"""

from __future__ import annotations

import contextlib
import copy
import io
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import Tensor, nn

STAT_NAMES: tuple[str, ...] = (
    "AP",
    "AP50",
    "AP75",
    "APs",
    "APm",
    "APl",
    "AR1",
    "AR10",
    "AR100",
    "ARs",
    "ARm",
    "ARl",
)
IOU_TYPES: tuple[str, ...] = ("bbox", "segm")


def _results_for(detections: Sequence[dict[str, Any]], iou_type: str) -> list[dict[str, Any]]:
    """Copies of the results with only the geometry `iou_type` uses (loadRes mutates them, and
    takes "bbox" over "segmentation" when both are present, giving segm the box's area)."""
    drop = "segmentation" if iou_type == "bbox" else "bbox"
    out = []
    for det in detections:
        if iou_type == "segm" and "segmentation" not in det:
            raise ValueError("segm evaluation needs a 'segmentation' (RLE) in every detection")
        out.append({k: copy.deepcopy(v) for k, v in det.items() if k != drop})
    return out


def _empty_results(coco_gt: COCO) -> COCO:
    """A results COCO with no detections (COCO.loadRes([]) crashes on an empty list)."""
    coco_dt = COCO()
    coco_dt.dataset = {
        "images": list(coco_gt.dataset.get("images", [])),
        "categories": copy.deepcopy(coco_gt.dataset.get("categories", [])),
        "annotations": [],
    }
    coco_dt.createIndex()
    return coco_dt


def coco_metrics(
    coco_gt: COCO,
    detections: Sequence[dict[str, Any]],
    *,
    iou_types: Sequence[str] = ("bbox",),
    img_ids: Iterable[int] | None = None,
) -> dict[str, float]:
    """COCOeval stats of COCO-format `detections` against `coco_gt`.

    Args:
        detections: COCO results dicts: image_id, category_id, bbox [x, y, w, h] in original
            image pixels, score, and for "segm" a "segmentation" RLE.
        iou_types: any of "bbox", "segm".
        img_ids: images to evaluate on (default: all of `coco_gt`); pass the images actually
            run, or unseen images count as misses.

    Returns:
        ``{f"{iou_type}_{name}": value}`` for every name in STAT_NAMES (see module docstring).
        No detections at all gives 0 (or -1 where COCOeval has nothing to measure).
    """
    known = set(coco_gt.getImgIds())
    ids = sorted(known) if img_ids is None else sorted({int(i) for i in img_ids})
    unknown = sorted({int(d["image_id"]) for d in detections} - known)
    if unknown:
        raise ValueError(f"detections for image ids not in the ground truth: {unknown[:5]}")
    if not ids:
        raise ValueError("no images to evaluate")
    metrics: dict[str, float] = {}
    for iou_type in iou_types:
        if iou_type not in IOU_TYPES:
            raise ValueError(f"unknown iou_type {iou_type!r}; expected one of {IOU_TYPES}")
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            if detections:
                coco_dt = coco_gt.loadRes(_results_for(detections, iou_type))
            else:
                coco_dt = _empty_results(coco_gt)
            evaluator = COCOeval(coco_gt, coco_dt, iou_type)
            evaluator.params.imgIds = ids
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        for name, value in zip(STAT_NAMES, evaluator.stats, strict=True):
            metrics[f"{iou_type}_{name}"] = float(value)
    return metrics


def _masks_to_rles(masks: Tensor, threshold: float) -> list[dict[str, Any]]:
    """(N, 1, H, W) mask probabilities -> N compressed RLEs with str counts (JSON-ready)."""
    binary = (masks[:, 0] > threshold).to(torch.uint8).numpy()  # (N, H, W)
    rles = mask_utils.encode(np.asfortranarray(binary.transpose(1, 2, 0)))  # wants (H, W, N)
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")
    return rles


def detections_to_coco(
    outputs: Sequence[Mapping[str, Tensor]],
    image_ids: Sequence[int],
    label_to_cat_id: Mapping[int, int],
    *,
    with_masks: bool = False,
    mask_threshold: float = 0.5,
) -> list[dict[str, Any]]:
    """Torchvision detections -> COCO results dicts.

    Args:
        outputs: per image "boxes" (N, 4) [x1, y1, x2, y2] in original image pixels, "scores"
            (N,), "labels" (N,) in 1..K, and with `with_masks` "masks" (N, 1, H, W) probabilities.
        image_ids: the COCO image id of each output.
        label_to_cat_id: model label -> COCO category id; labels not in it (e.g. the background
            label 0 a RetinaNet/FCOS may emit) are dropped.
        with_masks: also give each result a "segmentation" RLE of ``masks > mask_threshold``.
    """
    if len(outputs) != len(image_ids):
        raise ValueError(f"{len(outputs)} outputs but {len(image_ids)} image ids")
    results: list[dict[str, Any]] = []
    for output, image_id in zip(outputs, image_ids, strict=True):
        labels = output["labels"].detach().cpu()
        keep = torch.tensor([int(lab) in label_to_cat_id for lab in labels], dtype=torch.bool)
        if not bool(keep.any()):
            continue
        boxes = output["boxes"].detach().cpu().float()[keep]  # (N, 4) xyxy
        xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
        scores = output["scores"].detach().cpu()[keep].tolist()
        cats = [label_to_cat_id[int(lab)] for lab in labels[keep]]
        rles: list[dict[str, Any]] | None = None
        if with_masks:
            rles = _masks_to_rles(output["masks"].detach().cpu()[keep], mask_threshold)
        for i, (box, score, cat) in enumerate(zip(xywh, scores, cats, strict=True)):
            result: dict[str, Any] = {
                "image_id": int(image_id),
                "category_id": int(cat),
                "bbox": [float(v) for v in box],
                "score": float(score),
            }
            if rles is not None:
                result["segmentation"] = rles[i]
            results.append(result)
    return results


def evaluate(
    model: nn.Module,
    loader: Iterable[tuple[Sequence[Tensor], Sequence[Mapping[str, Any]]]],
    coco_gt: COCO,
    label_to_cat_id: Mapping[int, int],
    *,
    device: torch.device | str,
    iou_types: Sequence[str] = ("bbox",),
    max_batches: int | None = None,
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Run `model` in eval mode over `loader` and score it with COCOeval.

    Args:
        loader: yields (images, targets): (3, H, W) images in [0, 1] and targets holding at
            least "image_id" (int or 0-d tensor) of `coco_gt`.
        max_batches: stop after this many batches; only the images run are evaluated.

    Returns:
        (metrics as `coco_metrics`, the COCO results dicts, e.g. to save as a results JSON).
        The model's train/eval mode is restored afterwards.
    """
    with_masks = "segm" in iou_types
    detections: list[dict[str, Any]] = []
    seen: list[int] = []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for index, (images, targets) in enumerate(loader):
                if max_batches is not None and index >= max_batches:
                    break
                outputs = model([img.to(device) for img in images])
                ids = [int(torch.as_tensor(t["image_id"]).item()) for t in targets]
                detections += detections_to_coco(
                    outputs, ids, label_to_cat_id, with_masks=with_masks
                )
                seen += ids
    finally:
        model.train(was_training)
    if not seen:
        raise ValueError("the loader yielded no images to evaluate")
    return coco_metrics(coco_gt, detections, iou_types=iou_types, img_ids=seen), detections
