"""The procedural shapes dataset: determinism, COCO validity, masks, reuse and crash safety."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from fgd_core.data import DatasetError, ShapesConfig, generate_shapes, load_shapes
from fgd_core.data import shapes as shapes_module

TINY = ShapesConfig(seed=3, num_train=12, num_val=6, image_size=64, max_size=40)
MODERATE = ShapesConfig(seed=1, num_train=30, num_val=4, image_size=96, max_size=64)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    return generate_shapes(tmp_path_factory.mktemp("shapes") / "tiny", TINY)


@pytest.fixture(scope="module")
def moderate(tmp_path_factory: pytest.TempPathFactory):
    return generate_shapes(tmp_path_factory.mktemp("shapes") / "moderate", MODERATE)


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def _quiet_coco(path: Path) -> COCO:
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(path))


def test_layout_and_paths(tiny) -> None:
    assert tiny.root.is_absolute()
    assert tiny.categories == ("circle", "square", "triangle", "diamond")
    assert tiny.num_classes == 4
    assert len(list(tiny.train_images.glob("*.png"))) == TINY.num_train
    assert len(list(tiny.val_images.glob("*.png"))) == TINY.num_val
    assert tiny.train_ann == tiny.root / "annotations" / "instances_train.json"
    manifest = json.loads((tiny.root / "shapes_config.json").read_text())
    assert manifest["config"]["seed"] == TINY.seed
    assert load_shapes(tiny.root) == tiny


def test_generation_is_deterministic(tiny, tmp_path: Path) -> None:
    again = generate_shapes(tmp_path / "again", TINY)
    assert _files(again.root) == _files(tiny.root)


def test_splits_are_different_images(tiny) -> None:
    a = (tiny.train_images / "000000.png").read_bytes()
    b = (tiny.val_images / "000000.png").read_bytes()
    assert a != b


def test_every_class_in_both_splits(tiny) -> None:
    for ann_file in (tiny.train_ann, tiny.val_ann):
        data = json.loads(ann_file.read_text())
        assert {a["category_id"] for a in data["annotations"]} == {1, 2, 3, 4}
        assert [c["id"] for c in data["categories"]] == [1, 2, 3, 4]


def test_box_sizes_span_small_to_large(moderate) -> None:
    data = json.loads(moderate.train_ann.read_text())
    sides = np.array([max(a["bbox"][2], a["bbox"][3]) for a in data["annotations"]])
    assert sides.min() < 16
    assert sides.max() > 40
    assert len(data["annotations"]) > 2 * MODERATE.num_train  # several objects per image


def test_masks_are_visible_parts_with_tight_boxes(moderate) -> None:
    data = json.loads(moderate.train_ann.read_text())
    by_image: dict[int, list[np.ndarray]] = {}
    for ann in data["annotations"]:
        assert ann["iscrowd"] == 0
        mask = mask_util.decode(ann["segmentation"])
        assert mask.shape == (96, 96)
        ys, xs = np.nonzero(mask)
        x, y, w, h = ann["bbox"]
        assert (x, y, w, h) == (
            xs.min(),
            ys.min(),
            xs.max() - xs.min() + 1,
            ys.max() - ys.min() + 1,
        )
        assert ann["area"] == int(mask.sum())
        assert ann["area"] >= MODERATE.min_visible_pixels
        by_image.setdefault(ann["image_id"], []).append(mask)
    for masks in by_image.values():
        assert np.stack(masks).sum(axis=0).max() <= 1  # visible parts never overlap


def test_occlusion_happens_and_keeps_enough_visible() -> None:
    cfg = ShapesConfig(num_train=40, num_val=4, image_size=64, max_size=48, max_objects=8)
    occluded = 0
    for index in range(cfg.num_train):
        _, instances = shapes_module.render_sample(cfg, "train", index)
        for _, mask in instances:
            assert mask.sum() >= cfg.min_visible_pixels
        # An unoccluded square fills its box exactly; a partly covered one does not.
        occluded += sum(1 for cat, m in instances if cat == 2 and m.sum() < _bbox_area(m))
    assert occluded > 0


def _bbox_area(mask: np.ndarray) -> int:
    ys, xs = np.nonzero(mask)
    return int((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))


def test_pycocotools_loads_and_evaluates(tiny) -> None:
    gt = _quiet_coco(tiny.val_ann)
    assert len(gt.getImgIds()) == TINY.num_val
    results = [
        {
            "image_id": a["image_id"],
            "category_id": a["category_id"],
            "bbox": a["bbox"],
            "score": 1.0,
        }
        for a in gt.dataset["annotations"]
    ]
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator = COCOeval(gt, gt.loadRes(results), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    assert evaluator.stats[0] == pytest.approx(1.0)


def test_same_config_is_reused(tiny) -> None:
    before = {p: p.stat().st_mtime_ns for p in tiny.root.rglob("*")}
    assert generate_shapes(tiny.root, TINY) == tiny
    assert {p: p.stat().st_mtime_ns for p in tiny.root.rglob("*")} == before


def test_different_config_is_refused(tiny) -> None:
    with pytest.raises(DatasetError, match=r"different config \(seed: 3 on disk vs 4\)"):
        generate_shapes(tiny.root, ShapesConfig(**{**TINY.__dict__, "seed": 4}))


def test_foreign_folder_is_refused(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(DatasetError, match="refusing"):
        generate_shapes(tmp_path, TINY)
    assert generate_shapes(tmp_path / "empty_is_fine", TINY).root.exists()


def test_crash_leaves_nothing_that_looks_complete(tmp_path: Path, monkeypatch) -> None:
    real = shapes_module._write_split

    def crash_on_val(root: Path, split: str, config: ShapesConfig) -> None:
        if split == "val":
            raise RuntimeError("disk full")
        real(root, split, config)

    monkeypatch.setattr(shapes_module, "_write_split", crash_on_val)
    with pytest.raises(RuntimeError, match="disk full"):
        generate_shapes(tmp_path / "ds", TINY)
    assert list(tmp_path.iterdir()) == []  # neither the target nor a partial folder is left
    with pytest.raises(DatasetError, match="shapes_config.json is missing"):
        load_shapes(tmp_path / "ds")


def test_incomplete_dataset_is_reported(tiny, tmp_path: Path) -> None:
    ds = generate_shapes(tmp_path / "ds", TINY)
    (ds.val_images / "000001.png").unlink()
    with pytest.raises(DatasetError, match="holds 5 PNGs, expected 6"):
        load_shapes(ds.root)


@pytest.mark.parametrize(
    "changes",
    [{"num_classes": 7}, {"num_val": 2}, {"min_size": 30, "max_size": 20}, {"max_size": 200}],
)
def test_invalid_config(changes: dict) -> None:
    with pytest.raises(ValueError, match="invalid ShapesConfig"):
        ShapesConfig(**changes)
