"""COCO evaluation: exact cases on an in-memory ground truth, and a real tiny model end to end."""

from __future__ import annotations

import contextlib
import io
from typing import Any

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from torch import Tensor, nn

from fgd_core.detectors import build_detector
from fgd_core.evaluation import STAT_NAMES, coco_metrics, detections_to_coco, evaluate

LABEL_TO_CAT = {1: 1, 2: 5}  # model labels 1..K -> non-contiguous COCO category ids
SIZES = {10: (64, 80), 11: (56, 48)}  # image id -> (h, w)
BOXES = {  # image id -> [(x1, y1, x2, y2, label)] in image pixels
    10: [(5, 6, 40, 50, 1), (30, 10, 70, 30, 2)],
    11: [(2, 3, 20, 30, 2), (25, 30, 45, 52, 1)],
}


def rect_mask(h: int, w: int, box: tuple[int, ...]) -> np.ndarray:
    m = np.zeros((h, w), dtype=np.uint8)
    x1, y1, x2, y2 = box[:4]
    m[y1:y2, x1:x2] = 1
    return m


def make_gt() -> COCO:
    images, anns = [], []
    for image_id, (h, w) in SIZES.items():
        images.append({"id": image_id, "height": h, "width": w, "file_name": f"{image_id}.png"})
        for x1, y1, x2, y2, label in BOXES[image_id]:
            rle = mask_utils.encode(np.asfortranarray(rect_mask(h, w, (x1, y1, x2, y2))))
            rle["counts"] = rle["counts"].decode("ascii")
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": image_id,
                    "category_id": LABEL_TO_CAT[label],
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "area": float((x2 - x1) * (y2 - y1)),
                    "iscrowd": 0,
                    "segmentation": rle,
                }
            )
    gt = COCO()
    gt.dataset = {
        "images": images,
        "annotations": anns,
        "categories": [{"id": 1, "name": "a"}, {"id": 5, "name": "b"}],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
    return gt


def gt_outputs(
    image_id: int, *, shift: float = 0.0, relabel: bool = False, masks: bool = False
) -> dict[str, Tensor]:
    """Torchvision-style outputs equal to the ground truth (optionally shifted or mislabelled)."""
    rows = BOXES[image_id]
    boxes = torch.tensor([r[:4] for r in rows], dtype=torch.float32) + shift
    labels = torch.tensor([r[4] for r in rows])
    if relabel:
        labels = 3 - labels  # 1 <-> 2
    out = {"boxes": boxes, "labels": labels, "scores": torch.ones(len(rows))}
    if masks:
        h, w = SIZES[image_id]
        out["masks"] = torch.stack(
            [torch.from_numpy(rect_mask(h, w, r)).float()[None] for r in rows]
        )  # (N, 1, H, W)
    return out


def dets(**kwargs: Any) -> list[dict[str, Any]]:
    ids = list(SIZES)
    return detections_to_coco(
        [gt_outputs(i, **kwargs) for i in ids],
        ids,
        LABEL_TO_CAT,
        with_masks=kwargs.get("masks", False),
    )


def test_detections_to_coco_format() -> None:
    out = gt_outputs(10)
    out["labels"] = torch.tensor([1, 0])  # label 0 (background) is dropped
    res = detections_to_coco([out], [10], LABEL_TO_CAT)
    assert res == [{"image_id": 10, "category_id": 1, "bbox": [5.0, 6.0, 35.0, 44.0], "score": 1.0}]
    empty = {
        "boxes": torch.zeros(0, 4),
        "labels": torch.zeros(0, dtype=torch.long),
        "scores": torch.zeros(0),
        "masks": torch.zeros(0, 1, 64, 80),
    }
    assert detections_to_coco([empty], [10], LABEL_TO_CAT, with_masks=True) == []
    with pytest.raises(ValueError, match="image ids"):
        detections_to_coco([out], [10, 11], LABEL_TO_CAT)


def test_perfect_detections_give_ap_one(capsys: pytest.CaptureFixture[str]) -> None:
    gt = make_gt()
    results = dets()
    m = coco_metrics(gt, results)
    assert capsys.readouterr().out == ""  # COCOeval's printing is swallowed
    assert set(m) == {f"bbox_{n}" for n in STAT_NAMES}
    assert m["bbox_AP"] == pytest.approx(1.0)
    assert m["bbox_AP50"] == pytest.approx(1.0)
    assert m["bbox_AR100"] == pytest.approx(1.0)
    assert m["bbox_APl"] == -1.0  # no large object in the ground truth: COCOeval's -1
    assert "area" not in results[0]  # the caller's dicts are not mutated by loadRes


def test_shifted_and_mislabelled_detections_score_lower() -> None:
    gt = make_gt()
    shifted = coco_metrics(gt, dets(shift=3.0))["bbox_AP"]
    assert 0.0 < shifted < 0.9
    assert coco_metrics(gt, dets(relabel=True))["bbox_AP"] == pytest.approx(0.0)


def test_empty_detections_give_zero() -> None:
    m = coco_metrics(make_gt(), [], iou_types=("bbox", "segm"))
    assert m["bbox_AP"] == 0.0 and m["segm_AP"] == 0.0 and m["bbox_AR100"] == 0.0
    assert m["bbox_APl"] == -1.0


def test_segm_with_gt_masks_gives_ap_one() -> None:
    gt = make_gt()
    m = coco_metrics(gt, dets(masks=True), iou_types=("bbox", "segm"))
    assert m["segm_AP"] == pytest.approx(1.0)
    assert m["bbox_AP"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="segmentation"):
        coco_metrics(gt, dets(), iou_types=("segm",))


def test_img_ids_and_unknown_images() -> None:
    gt = make_gt()
    only_10 = [d for d in dets() if d["image_id"] == 10]
    assert coco_metrics(gt, only_10)["bbox_AP"] < 1.0  # image 11's objects count as missed
    assert coco_metrics(gt, only_10, img_ids=[10])["bbox_AP"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="not in the ground truth"):
        coco_metrics(gt, [dict(only_10[0], image_id=99)])


class GroundTruthModel(nn.Module):
    """Returns the ground truth for each image (identified by its height): tests `evaluate`."""

    def __init__(self) -> None:
        super().__init__()
        self.by_height = {h: i for i, (h, _) in SIZES.items()}

    def forward(self, images: list[Tensor]) -> list[dict[str, Tensor]]:
        assert not self.training and not torch.is_grad_enabled()
        return [gt_outputs(self.by_height[img.shape[-2]], masks=True) for img in images]


def loader() -> list[tuple[list[Tensor], list[dict[str, Any]]]]:
    return [([torch.rand(3, *SIZES[i])], [{"image_id": torch.tensor(i)}]) for i in SIZES]


def test_evaluate_logic_with_ground_truth_model() -> None:
    model = GroundTruthModel().train()
    gt = make_gt()
    metrics, results = evaluate(
        model, loader(), gt, LABEL_TO_CAT, device="cpu", iou_types=("bbox", "segm")
    )
    assert metrics["bbox_AP"] == pytest.approx(1.0) and metrics["segm_AP"] == pytest.approx(1.0)
    assert len(results) == 4 and model.training
    metrics, results = evaluate(model, loader(), gt, LABEL_TO_CAT, device="cpu", max_batches=1)
    assert metrics["bbox_AP"] == pytest.approx(1.0)  # only the image run is evaluated
    assert {r["image_id"] for r in results} == {10}


@pytest.mark.parametrize(
    ("arch", "iou_types"), [("retinanet", ("bbox",)), ("maskrcnn", ("bbox", "segm"))]
)
def test_evaluate_tiny_untrained_model(arch: str, iou_types: tuple[str, ...]) -> None:
    torch.manual_seed(0)
    model = build_detector(
        arch=arch,
        backbone="resnet18",
        num_classes=2,
        fpn_channels=16,
        min_size=64,
        max_size=64,
        score_thresh=0.0,
        box_head_dim=32,
        mask_head_channels=8,
    )
    model.train()
    metrics, results = evaluate(
        model, loader(), make_gt(), LABEL_TO_CAT, device="cpu", iou_types=iou_types
    )
    assert set(metrics) == {f"{t}_{n}" for t in iou_types for n in STAT_NAMES}
    assert all(np.isfinite(v) and -1.0 <= v <= 1.0 for v in metrics.values())
    assert results and all(r["category_id"] in (1, 5) for r in results)
    assert ("segmentation" in results[0]) == ("segm" in iou_types)
    assert model.training
    model.eval()
    evaluate(model, loader(), make_gt(), LABEL_TO_CAT, device="cpu", max_batches=1)
    assert not model.training
