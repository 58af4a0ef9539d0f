"""COCO-format datasets: samples, flips, segmentations, broken inputs, sampler and resume."""

from __future__ import annotations

import json
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from fgd_core.data import (
    CocoDetection,
    DatasetError,
    GroupedBatchSampler,
    ShapesConfig,
    build_eval_loader,
    build_train_loader,
    generate_shapes,
    iterate_forever,
    iterate_from,
)

SHAPES = ShapesConfig(seed=5, num_train=10, num_val=4, image_size=64, max_size=40)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory):
    return generate_shapes(tmp_path_factory.mktemp("shapes") / "ds", SHAPES)


def _train(shapes, **kwargs: Any) -> CocoDetection:
    return CocoDetection(shapes.train_images, shapes.train_ann, **{"train": True, **kwargs})


def _write_coco(
    root: Path,
    images: list[tuple[str, Any, tuple[int, int]]],
    annotations: list[dict[str, Any]],
    categories: list[dict[str, Any]] | None = None,
) -> Path:
    """Write images ((name, array | bytes | None, (h, w))) and a COCO JSON; returns its path."""
    (root / "img").mkdir(parents=True, exist_ok=True)
    entries = []
    for i, (name, content, (h, w)) in enumerate(images):
        if isinstance(content, bytes):
            (root / "img" / name).write_bytes(content)
        elif content is not None:
            Image.fromarray(content).save(root / "img" / name)
        entries.append({"id": 10 + i, "file_name": name, "height": h, "width": w})
    cats = (
        categories if categories is not None else [{"id": 7, "name": "a"}, {"id": 3, "name": "b"}]
    )
    ann_file = root / "ann.json"
    ann_file.write_text(
        json.dumps({"images": entries, "annotations": annotations, "categories": cats})
    )
    return ann_file


def _ann(ann_id: int, bbox: list[float], *, image_id: int = 10, cat: int = 7, **extra: Any) -> dict:
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": cat,
        "bbox": bbox,
        "iscrowd": 0,
        **extra,
    }


def _rgb(h: int = 20, w: int = 30) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8)


# --- samples -------------------------------------------------------------------------------


def test_shapes_samples(shapes) -> None:
    ds = CocoDetection(shapes.val_images, shapes.val_ann, train=False, with_masks=True)
    raw = json.loads(shapes.val_ann.read_text())
    assert len(ds) == SHAPES.num_val
    assert ds.num_classes == 4 and ds.category_names == list(shapes.categories)
    assert ds.label_to_cat_id == {1: 1, 2: 2, 3: 3, 4: 4}
    image, target = ds[0]
    assert image.dtype == torch.float32 and image.shape == (3, 64, 64)
    assert image.min() >= 0.0 and image.max() <= 1.0
    expected = np.array(Image.open(shapes.val_images / "000000.png")).transpose(2, 0, 1) / 255.0
    assert torch.allclose(image, torch.from_numpy(expected).float())
    anns = [a for a in raw["annotations"] if a["image_id"] == target["image_id"]]
    xywh = torch.tensor([a["bbox"] for a in anns])
    assert torch.equal(target["boxes"], torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1))
    assert target["boxes"].dtype == torch.float32 and target["labels"].dtype == torch.int64
    assert target["labels"].tolist() == [a["category_id"] for a in anns]
    assert target["masks"].dtype == torch.uint8 and target["masks"].shape == (len(anns), 64, 64)
    assert target["masks"].sum(dim=(1, 2)).tolist() == [a["area"] for a in anns]
    assert ds.image_sizes == [(64, 64)] * 4 and ds.image_aspect_ratios() == [1.0] * 4


def test_labels_are_contiguous_over_sorted_category_ids(tmp_path: Path) -> None:
    ann = _write_coco(
        tmp_path,
        [("a.png", _rgb(), (20, 30))],
        [_ann(1, [1, 1, 5, 5]), _ann(2, [2, 2, 5, 5], cat=3)],
    )
    ds = CocoDetection(tmp_path / "img", ann, train=False)
    assert ds.cat_id_to_label == {3: 1, 7: 2} and ds.label_to_cat_id == {1: 3, 2: 7}
    assert ds.category_names == ["b", "a"]
    assert ds[0][1]["labels"].tolist() == [2, 1]


def test_horizontal_flip_matches_manual_flip(shapes) -> None:
    plain = _train(shapes, hflip_prob=0.0, with_masks=True)
    flipped = _train(shapes, hflip_prob=1.0, with_masks=True)
    for index in range(3):
        image, target = plain[index]
        f_image, f_target = flipped[index]
        assert torch.equal(f_image, image.flip(-1))
        boxes = target["boxes"]
        expected = torch.stack([64 - boxes[:, 2], boxes[:, 1], 64 - boxes[:, 0], boxes[:, 3]], 1)
        assert torch.equal(f_target["boxes"], expected)
        assert torch.equal(f_target["masks"], target["masks"].flip(-1))
        for box, mask in zip(f_target["boxes"], f_target["masks"], strict=True):
            ys, xs = torch.nonzero(mask, as_tuple=True)
            tight = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
            assert box.tolist() == [float(v) for v in tight]


def test_flip_decisions_are_deterministic_per_seed_epoch_index(shapes) -> None:
    ds = _train(shapes)
    epoch0 = [ds.is_flipped(i) for i in range(len(ds))]
    assert epoch0 == [_train(shapes).is_flipped(i) for i in range(len(ds))]
    ds.set_epoch(1)
    epoch1 = [ds.is_flipped(i) for i in range(len(ds))]
    assert epoch1 == [ds.is_flipped(i, epoch=1) for i in range(len(ds))]
    assert epoch0 != epoch1
    assert epoch0 != [_train(shapes, seed=9).is_flipped(i, epoch=0) for i in range(len(ds))]
    assert not any(
        CocoDetection(shapes.train_images, shapes.train_ann, train=False).is_flipped(i)
        for i in range(5)
    )


def test_grayscale_and_rgba_become_rgb(tmp_path: Path) -> None:
    gray = np.full((20, 30), 100, dtype=np.uint8)
    rgba = np.dstack([_rgb(), np.full((20, 30), 255, np.uint8)])
    ann = _write_coco(tmp_path, [("g.png", gray, (20, 30)), ("c.png", rgba, (20, 30))], [])
    ds = CocoDetection(tmp_path / "img", ann, train=False)
    for index in range(2):
        image, target = ds[index]
        assert image.shape == (3, 20, 30)
        assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)
    assert torch.allclose(ds[0][0], torch.full((3, 20, 30), 100 / 255))


def test_polygon_and_uncompressed_rle_segmentations(tmp_path: Path) -> None:
    polygon = [[2, 3, 12, 3, 12, 9, 2, 9]]  # the rectangle x 2..12, y 3..9
    rle = {"size": [20, 30], "counts": [20 * 5 + 4, 6, 14, 6, 600 - 20 * 5 - 4 - 26]}
    anns = [
        _ann(1, [2, 3, 10, 6], segmentation=polygon),
        _ann(2, [5, 4, 2, 6], segmentation=rle),  # columns 5..6, rows 4..9
        _ann(3, [0, 0, 30, 20], iscrowd=1, segmentation=rle),  # crowd: skipped
    ]
    ann = _write_coco(tmp_path, [("a.png", _rgb(), (20, 30))], anns)
    ds = CocoDetection(tmp_path / "img", ann, train=False, with_masks=True)
    masks = ds[0][1]["masks"]
    assert masks.shape == (2, 20, 30)
    ys, xs = torch.nonzero(masks[0], as_tuple=True)
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (2, 11, 3, 8)  # pixels [2, 12) x [3, 9)
    expected = torch.zeros(20, 30, dtype=torch.uint8)
    expected[4:10, 5:7] = 1
    assert torch.equal(masks[1], expected)


def test_degenerate_boxes_dropped_and_slack_clipped(tmp_path: Path) -> None:
    anns = [_ann(1, [3, 3, 0.5, 8]), _ann(2, [-0.6, 2, 10, 18.8]), _ann(3, [25, 0, 5.5, 4])]
    ann = _write_coco(tmp_path, [("a.png", _rgb(), (20, 30))], anns)
    boxes = CocoDetection(tmp_path / "img", ann, train=False)[0][1]["boxes"]
    assert boxes.flatten().tolist() == pytest.approx([0.0, 2.0, 9.4, 20.0, 25.0, 0.0, 30.0, 4.0])


# --- broken inputs ---------------------------------------------------------------------------


def test_unreadable_image(tmp_path: Path) -> None:
    ann = _write_coco(tmp_path, [("bad.png", b"not a png at all", (20, 30))], [])
    ds = CocoDetection(tmp_path / "img", ann, train=False)  # exists, so construction passes
    with pytest.raises(DatasetError, match=r"cannot read image .*bad\.png"):
        ds[0]
    with pytest.raises(DatasetError, match=r"bad\.png"):
        ds.validate(check_images=True)
    ds.validate(check_images=False)


def test_image_size_disagreeing_with_json(tmp_path: Path) -> None:
    ann = _write_coco(tmp_path, [("a.png", _rgb(), (21, 30))], [])
    with pytest.raises(DatasetError, match=r"a\.png is 30x20 but .*ann\.json says 30x21"):
        CocoDetection(tmp_path / "img", ann, train=False)[0]


def test_missing_image(tmp_path: Path) -> None:
    ann = _write_coco(tmp_path, [("a.png", _rgb(), (20, 30)), ("gone.png", None, (20, 30))], [])
    with pytest.raises(DatasetError, match=r"1 image file\(s\) .* missing .*gone\.png"):
        CocoDetection(tmp_path / "img", ann, train=False)
    ds = CocoDetection(tmp_path / "img", ann, train=False, check_files=False)
    with pytest.raises(DatasetError, match=r"image file not found: .*gone\.png"):
        ds[1]


def test_box_outside_image(tmp_path: Path) -> None:
    ann = _write_coco(tmp_path, [("a.png", _rgb(), (20, 30))], [_ann(41, [25, 2, 8, 5])])
    with pytest.raises(DatasetError, match=r"annotation 41 .* outside image a\.png \(30x20\)"):
        CocoDetection(tmp_path / "img", ann, train=False)


@pytest.mark.parametrize("bbox", [[1, 2, 3], [1, "x", 3, 4], [float("nan"), 1, 2, 2]])
def test_malformed_box(tmp_path: Path, bbox: list) -> None:
    anns = [_ann(1, [1, 1, 4, 4]), _ann(44, bbox)]
    ann = _write_coco(tmp_path, [("a.png", _rgb(), (20, 30))], anns)
    with pytest.raises(DatasetError, match=r"annotation 44 has (malformed )?bbox"):
        CocoDetection(tmp_path / "img", ann, train=False)


def test_unknown_category(tmp_path: Path) -> None:
    ann = _write_coco(tmp_path, [("a.png", _rgb(), (20, 30))], [_ann(42, [1, 1, 4, 4], cat=99)])
    with pytest.raises(DatasetError, match=r"annotation 42 \(image a\.png\) has category_id 99"):
        CocoDetection(tmp_path / "img", ann, train=False)


def test_unknown_image_id(tmp_path: Path) -> None:
    ann = _write_coco(tmp_path, [("a.png", _rgb(), (20, 30))], [_ann(43, [1, 1, 4, 4], image_id=5)])
    with pytest.raises(DatasetError, match="annotation 43 refers to unknown image_id 5"):
        CocoDetection(tmp_path / "img", ann, train=False)


def test_empty_split(tmp_path: Path) -> None:
    ann = _write_coco(tmp_path, [], [])
    with pytest.raises(DatasetError, match=r"ann\.json: no images \(empty split\)"):
        CocoDetection(tmp_path / "img", ann, train=False)


def test_invalid_json(tmp_path: Path) -> None:
    ann = tmp_path / "broken.json"
    ann.write_text('{"images": [')
    with pytest.raises(DatasetError, match=r"invalid JSON in annotation file .*broken\.json"):
        CocoDetection(tmp_path, ann, train=False)


def test_missing_annotation_file(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"annotation file not found: .*nope\.json"):
        CocoDetection(tmp_path, tmp_path / "nope.json", train=False)
    assert issubclass(DatasetError, ValueError)


def test_missing_images_folder(tmp_path: Path) -> None:
    ann = _write_coco(tmp_path, [("a.png", _rgb(), (20, 30))], [])
    with pytest.raises(DatasetError, match=r"images folder .*elsewhere"):
        CocoDetection(tmp_path / "elsewhere", ann, train=False)


def test_coco_gt_is_silent(shapes, capsys: pytest.CaptureFixture[str]) -> None:
    gt = CocoDetection(shapes.val_images, shapes.val_ann, train=False).coco_gt()
    assert len(gt.getImgIds()) == SHAPES.num_val
    assert capsys.readouterr().out == ""


# --- sampler and loaders -----------------------------------------------------------------------


def _mixed_orientation(tmp_path: Path) -> CocoDetection:
    sizes = [(20, 30) if i % 3 else (30, 20) for i in range(23)]
    ann = _write_coco(tmp_path, [(f"{i}.png", None, s) for i, s in enumerate(sizes)], [])
    return CocoDetection(tmp_path / "img", ann, train=True, check_files=False)


def test_grouped_batches_are_single_orientation_and_seeded(tmp_path: Path) -> None:
    ds = _mixed_orientation(tmp_path)
    portrait = {i for i, (h, w) in enumerate(ds.image_sizes) if w < h}
    sampler = build_train_loader(ds, batch_size=3, seed=1).batch_sampler
    assert isinstance(sampler, GroupedBatchSampler)
    assert len(sampler) == 15 // 3 + 8 // 3
    orders = [sampler.batch_index_order(e) for e in range(3)]
    for batches in orders:
        assert len(batches) == len(sampler)
        assert all(len(b) == 3 for b in batches)
        assert all(len({i in portrait for i in b}) == 1 for b in batches)
        assert len({i for b in batches for i in b}) == 3 * len(batches)  # no repeats
    assert orders[0] != orders[1]
    same = GroupedBatchSampler([int(i in portrait) for i in range(23)], 3, seed=1)
    assert [same.batch_index_order(e) for e in range(3)] == orders
    assert GroupedBatchSampler([0] * 23, 3, seed=2).batch_index_order(0) != orders[0]
    keep = GroupedBatchSampler([int(i in portrait) for i in range(23)], 3, seed=1, drop_last=False)
    assert sorted(i for b in keep.batch_index_order(0) for i in b) == list(range(23))
    assert len(keep) == 5 + 3


def test_eval_loader_keeps_order(shapes) -> None:
    ds = CocoDetection(shapes.val_images, shapes.val_ann, train=False)
    batches = list(build_eval_loader(ds, batch_size=3))
    assert [len(images) for images, _ in batches] == [3, 1]
    assert [t["image_id"] for _, targets in batches for t in targets] == [1, 2, 3, 4]


class _Counting(CocoDetection):
    loads = 0

    def __getitem__(self, index: int):
        type(self).loads += 1
        return super().__getitem__(index)


def _key(batch: Any) -> list[tuple[int, list[float], float]]:
    images, targets = batch
    return [
        (t["image_id"], t["boxes"].flatten().tolist(), float(img[0, :, :5].sum()))
        for img, t in zip(images, targets, strict=True)
    ]


def test_iterate_from_matches_skipping_without_loading(shapes) -> None:
    loader = build_train_loader(_train(shapes), batch_size=3, seed=4)
    assert len(loader) == 3  # 10 images, drop_last
    reference = [_key(b) for b in islice(iterate_forever(loader), 11)]
    assert reference[:3] != reference[3:6]  # each epoch reshuffles
    for start in (0, 2, 3, 7):
        counting = _Counting(shapes.train_images, shapes.train_ann, train=True)
        resumed = iterate_from(build_train_loader(counting, batch_size=3, seed=4), start)
        _Counting.loads = 0
        got = [_key(b) for b in islice(resumed, 11 - start)]
        assert got == reference[start:]
        assert _Counting.loads == 3 * (11 - start)  # the skipped batches were never loaded


def test_workers_see_the_epoch(shapes) -> None:
    in_process = build_train_loader(_train(shapes), batch_size=3, seed=4)
    with_worker = build_train_loader(_train(shapes), batch_size=3, seed=4, num_workers=1)
    expected = [_key(b) for b in islice(iterate_from(in_process, 2), 5)]
    assert [_key(b) for b in islice(iterate_from(with_worker, 2), 5)] == expected
