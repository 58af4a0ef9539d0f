"""COCO-format detection datasets for torchvision detectors, and reproducible, resumable loaders.

Reproducibility: batch order is :meth:`GroupedBatchSampler.batch_index_order`, a pure function
of ``(seed, epoch)``; the horizontal flip of dataset item ``i`` in epoch ``e`` is drawn from
``numpy.random.default_rng([dataset.seed, e, i])``. Neither touches global RNG state, so
:func:`iterate_from` can resume at any step by computing ``epoch, skip = divmod(step, len(sampler))``
and leaving the skipped batches out of the sampler, without decoding their images.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from fgd_core.data.errors import DatasetError

Target = dict[str, Any]
Batch = tuple[list[torch.Tensor], list[Target]]

BOX_SLACK = 1.0  # px a box may stick out of its image (rounding) before it is an error


class CocoDetection(Dataset[tuple[torch.Tensor, Target]]):
    """An images folder plus a COCO instances JSON, as torchvision detection samples.

    Item ``i`` is ``(image, target)``: image float32 (3, H, W) in [0, 1], RGB; target has
    ``boxes`` float32 (N, 4) ``[x1, y1, x2, y2]`` in image pixels, ``labels`` int64 (N,) in
    1..K (sorted COCO category ids mapped to 1..K), ``image_id`` (int, the COCO id), ``hflip``
    (bool, whether the item was flipped; it keys the teacher feature cache) and, with
    ``with_masks``, ``masks`` uint8 (N, H, W). Crowd annotations are skipped; boxes under 1 px
    wide or high (after clipping to the image) are dropped.

    The annotation file is parsed and validated at construction; a broken file raises
    :class:`DatasetError` naming the file and annotation. Images are decoded in ``__getitem__``.

    Args:
        images_dir: folder the ``file_name`` of each image is relative to.
        ann_file: COCO instances JSON.
        train: flip horizontally with probability ``hflip_prob`` (deterministic, see module doc).
        hflip_prob: flip probability when ``train``.
        with_masks: also decode instance masks (polygon or RLE segmentations).
        seed: seed of the flip decisions.
        check_files: check at construction that every image file exists (one listdir per
            folder; cheap even for COCO). Decoding every image is :meth:`validate`.
    """

    def __init__(
        self,
        images_dir: str | os.PathLike[str],
        ann_file: str | os.PathLike[str],
        *,
        train: bool,
        hflip_prob: float = 0.5,
        with_masks: bool = False,
        seed: int = 0,
        check_files: bool = True,
    ) -> None:
        if not 0.0 <= hflip_prob <= 1.0:
            raise ValueError(f"hflip_prob must be in [0, 1], got {hflip_prob}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.images_dir = Path(images_dir)
        self.ann_file = Path(ann_file)
        self.train = train
        self.hflip_prob = hflip_prob
        self.with_masks = with_masks
        self.seed = seed
        self.epoch = 0
        self._parse(_read_json(self.ann_file))
        if check_files:
            self._check_files_exist()

    # --- construction -------------------------------------------------------------------

    def _parse(self, data: Any) -> None:
        src = self.ann_file
        if not isinstance(data, dict):
            raise DatasetError(f"{src}: top level is not a JSON object")
        images, categories = data.get("images"), data.get("categories")
        annotations = data.get("annotations", [])
        if not isinstance(images, list) or not isinstance(categories, list):
            raise DatasetError(f"{src}: 'images' and 'categories' must both be lists")
        if not isinstance(annotations, list):
            raise DatasetError(f"{src}: 'annotations' must be a list")
        if not images:
            raise DatasetError(f"{src}: no images (empty split)")
        try:
            cat_names = {int(c["id"]): str(c.get("name", c["id"])) for c in categories}
        except (KeyError, TypeError, ValueError) as exc:
            raise DatasetError(f"{src}: malformed category entry: {exc!r}") from exc
        if len(cat_names) != len(categories) or not cat_names:
            raise DatasetError(f"{src}: category ids must be unique and at least one is needed")
        cat_ids = sorted(cat_names)
        self.cat_id_to_label: dict[int, int] = {c: i + 1 for i, c in enumerate(cat_ids)}
        self.label_to_cat_id: dict[int, int] = {i + 1: c for i, c in enumerate(cat_ids)}
        self.category_names: list[str] = [cat_names[c] for c in cat_ids]  # label l -> [l - 1]
        self.num_classes: int = len(cat_ids)

        self.image_ids: list[int] = []
        self.file_names: list[str] = []
        self.image_sizes: list[tuple[int, int]] = []  # (h, w) from the JSON
        index_of: dict[int, int] = {}
        for entry in images:
            try:
                image_id, file_name = int(entry["id"]), str(entry["file_name"])
                h, w = int(entry["height"]), int(entry["width"])
            except (KeyError, TypeError, ValueError) as exc:
                raise DatasetError(f"{src}: malformed image entry {entry!r}: {exc!r}") from exc
            if image_id in index_of:
                raise DatasetError(f"{src}: duplicate image id {image_id} ({file_name})")
            if h < 1 or w < 1:
                raise DatasetError(f"{src}: image {file_name} has size {w}x{h}")
            index_of[image_id] = len(self.image_ids)
            self.image_ids.append(image_id)
            self.file_names.append(file_name)
            self.image_sizes.append((h, w))

        # Validate in one plain-Python pass, then check and store the boxes with numpy, grouped
        # by image (CSR: the annotations of image i are rows offsets[i]:offsets[i + 1]).
        ann_ids: list[Any] = []
        rows: list[int] = []
        labels: list[int] = []
        bboxes: list[Any] = []
        segs: list[Any] = []
        get_index, get_label = index_of.get, self.cat_id_to_label.get
        for ann in annotations:
            ann_id = ann.get("id") if isinstance(ann, dict) else None
            try:
                image_id, cat_id, bbox = ann["image_id"], ann["category_id"], ann["bbox"]
                crowd = ann.get("iscrowd", 0)
                idx, label = get_index(image_id), get_label(cat_id)
            except (KeyError, TypeError) as exc:
                raise DatasetError(
                    f"{src}: annotation {ann_id}: missing or bad field {exc}"
                ) from exc
            if idx is None:
                raise DatasetError(
                    f"{src}: annotation {ann_id} refers to unknown image_id {image_id!r}"
                )
            if label is None:
                raise DatasetError(
                    f"{src}: annotation {ann_id} (image {self.file_names[idx]}) has category_id "
                    f"{cat_id!r}, which is not in 'categories'"
                )
            if crowd:
                continue
            ann_ids.append(ann_id)
            rows.append(idx)
            labels.append(label)
            bboxes.append(bbox)
            if self.with_masks:
                segs.append(ann.get("segmentation"))
        boxes, keep = self._check_boxes(ann_ids, rows, bboxes)
        row_arr = np.asarray(rows, dtype=np.int64)[keep]
        order = np.argsort(row_arr, kind="stable")
        self._box_data = boxes[keep][order].astype(np.float32)  # (M, 4) [x1, y1, x2, y2]
        self._label_data = np.asarray(labels, dtype=np.int64)[keep][order]  # (M,)
        counts = np.bincount(row_arr, minlength=len(self.image_ids))
        self._offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self._segs: list[Any] | None = None
        if self.with_masks:
            kept = np.flatnonzero(keep)[order].tolist()
            self._segs = [self._check_segmentation(ann_ids[j], segs[j], rows[j]) for j in kept]

    def _check_boxes(
        self, ann_ids: list[Any], rows: list[int], bboxes: list[Any]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Clipped ``[x1, y1, x2, y2]`` float64 (M, 4) from COCO ``[x, y, w, h]`` boxes, and the
        bool (M,) mask of the non-degenerate ones (at least 1 px wide and high)."""
        if not bboxes:
            return np.zeros((0, 4)), np.zeros(0, dtype=bool)
        try:
            xywh = np.asarray(bboxes, dtype=np.float64)
        except (TypeError, ValueError):
            xywh = None
        if xywh is None or xywh.shape != (len(bboxes), 4):
            j = next((j for j, b in enumerate(bboxes) if not _is_xywh(b)), 0)
            raise DatasetError(
                f"{self.ann_file}: annotation {ann_ids[j]} has malformed bbox {bboxes[j]!r}"
            )
        hw = np.asarray(self.image_sizes, dtype=np.float64)[np.asarray(rows, dtype=np.int64)]
        h, w = hw[:, 0], hw[:, 1]
        x1, y1 = xywh[:, 0], xywh[:, 1]
        x2, y2 = x1 + xywh[:, 2], y1 + xywh[:, 3]
        # Written so that NaN and infinities fail too.
        inside = (x1 >= -BOX_SLACK) & (y1 >= -BOX_SLACK) & (x2 <= w + BOX_SLACK)
        inside &= y2 <= h + BOX_SLACK
        if not inside.all():
            j = int(np.argmin(inside))
            height, width = self.image_sizes[rows[j]]
            raise DatasetError(
                f"{self.ann_file}: annotation {ann_ids[j]} has bbox [x, y, w, h] = {bboxes[j]!r} "
                f"outside image {self.file_names[rows[j]]} ({width}x{height})"
            )
        boxes = np.stack(
            [np.clip(x1, 0.0, w), np.clip(y1, 0.0, h), np.clip(x2, 0.0, w), np.clip(y2, 0.0, h)], 1
        )
        keep = (boxes[:, 2] - boxes[:, 0] >= 1.0) & (boxes[:, 3] - boxes[:, 1] >= 1.0)
        return boxes, keep

    def _check_segmentation(self, ann_id: Any, seg: Any, idx: int) -> Any:
        h, w = self.image_sizes[idx]
        ok = isinstance(seg, list) and all(isinstance(p, list) for p in seg)
        if isinstance(seg, dict):
            ok = "counts" in seg and list(seg.get("size", [])) == [h, w]
        if not ok:
            raise DatasetError(
                f"{self.ann_file}: annotation {ann_id} (image {self.file_names[idx]}) has no "
                f"usable segmentation (need polygons or an RLE of size [{h}, {w}])"
            )
        return seg

    def _check_files_exist(self) -> None:
        if not self.images_dir.is_dir():
            raise DatasetError(f"images folder {self.images_dir} (for {self.ann_file}) not found")
        listed: dict[Path, set[str]] = {}
        missing: list[str] = []
        for name in self.file_names:
            path = self.images_dir / name
            folder = path.parent
            if folder not in listed:
                listed[folder] = set(os.listdir(folder)) if folder.is_dir() else set()
            if path.name not in listed[folder]:
                missing.append(name)
        if missing:
            raise DatasetError(
                f"{len(missing)} image file(s) listed in {self.ann_file} are missing from "
                f"{self.images_dir}, e.g. {self.images_dir / missing[0]}"
            )

    # --- access -------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.image_ids)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose flip decisions ``__getitem__`` uses."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self.epoch = epoch

    def is_flipped(self, index: int, epoch: int | None = None) -> bool:
        """Whether item ``index`` is flipped in ``epoch`` (default: the current epoch)."""
        if not self.train or self.hflip_prob <= 0.0:
            return False
        rng = np.random.default_rng([self.seed, self.epoch if epoch is None else epoch, index])
        return bool(rng.random() < self.hflip_prob)

    def image_aspect_ratios(self) -> list[float]:
        """Width / height of every image, from the JSON (no decoding)."""
        return [w / h for h, w in self.image_sizes]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Target]:
        index = range(len(self))[index]  # negative indices and bounds, like a list
        h, w = self.image_sizes[index]
        pixels = self._load_image(index)  # (H, W, 3) uint8
        lo, hi = int(self._offsets[index]), int(self._offsets[index + 1])
        boxes = self._box_data[lo:hi].copy()  # (N, 4) [x1, y1, x2, y2]
        masks = self._masks(index, lo, hi) if self._segs is not None else None  # (N, H, W)
        flipped = self.is_flipped(index)
        if flipped:
            pixels = pixels[:, ::-1]
            boxes[:, [0, 2]] = w - boxes[:, [2, 0]]
            if masks is not None:
                masks = masks[:, :, ::-1]
        image = torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))
        target: Target = {
            "boxes": torch.from_numpy(boxes),
            "labels": torch.from_numpy(self._label_data[lo:hi].copy()),
            "image_id": self.image_ids[index],
            "hflip": flipped,
        }
        if masks is not None:
            target["masks"] = torch.from_numpy(np.ascontiguousarray(masks))
        return image.float().div_(255.0), target

    def _load_image(self, index: int) -> np.ndarray:
        path = self.images_dir / self.file_names[index]
        h, w = self.image_sizes[index]
        try:
            with Image.open(path) as im:
                rgb = im.convert("RGB")
        except FileNotFoundError as exc:
            raise DatasetError(f"image file not found: {path} (listed in {self.ann_file})") from exc
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            raise DatasetError(f"cannot read image {path}: {exc}") from exc
        if rgb.size != (w, h):
            raise DatasetError(
                f"image {path} is {rgb.size[0]}x{rgb.size[1]} but {self.ann_file} says {w}x{h}"
            )
        return np.array(rgb, dtype=np.uint8)

    def _masks(self, index: int, lo: int, hi: int) -> np.ndarray:
        h, w = self.image_sizes[index]
        assert self._segs is not None
        segs = self._segs[lo:hi]
        out = np.zeros((len(segs), h, w), dtype=np.uint8)
        for k, seg in enumerate(segs):
            out[k] = segmentation_to_mask(seg, h, w)
        return out

    def validate(self, check_images: bool = True) -> None:
        """Check every image file exists and, with ``check_images``, decodes at its JSON size.

        Raises:
            DatasetError: naming the first bad file.
        """
        self._check_files_exist()
        if check_images:
            for index in range(len(self)):
                self._load_image(index)

    def coco_gt(self) -> COCO:
        """A pycocotools ``COCO`` of the annotation file (for COCOeval), built without printing."""
        coco = COCO()
        coco.dataset = _read_json(self.ann_file)
        with contextlib.redirect_stdout(io.StringIO()):
            coco.createIndex()
        return coco


def segmentation_to_mask(seg: Any, h: int, w: int) -> np.ndarray:
    """Decode a COCO segmentation (polygons, uncompressed or compressed RLE) to uint8 (h, w)."""
    if isinstance(seg, list):
        polygons = [p for p in seg if len(p) >= 6]  # shorter lists are not polygons
        if not polygons:
            return np.zeros((h, w), dtype=np.uint8)
        rle = mask_util.merge(mask_util.frPyObjects(polygons, h, w))
    elif isinstance(seg.get("counts"), list):
        rle = mask_util.frPyObjects(seg, h, w)
    else:
        counts = seg["counts"]
        rle = {"size": [h, w], "counts": counts.encode() if isinstance(counts, str) else counts}
    return np.asarray(mask_util.decode(rle), dtype=np.uint8)


def _is_xywh(bbox: Any) -> bool:
    return (
        isinstance(bbox, list | tuple)
        and len(bbox) == 4
        and all(isinstance(v, int | float) and not isinstance(v, bool) for v in bbox)
    )


def _read_json(path: Path) -> Any:
    try:
        with open(path, "rb") as f:
            return json.load(f)
    except FileNotFoundError as exc:
        raise DatasetError(f"annotation file not found: {path}") from exc
    except OSError as exc:
        raise DatasetError(f"cannot read annotation file {path}: {exc}") from exc
    except ValueError as exc:
        raise DatasetError(f"invalid JSON in annotation file {path}: {exc}") from exc


def collate_fn(batch: Sequence[tuple[torch.Tensor, Target]]) -> Batch:
    """Batch samples as ``(list_of_images, list_of_targets)`` (detectors take lists)."""
    return [image for image, _ in batch], [target for _, target in batch]


class GroupedBatchSampler(Sampler[list[int]]):
    """Shuffled batches in which all images share one group (e.g. aspect-ratio orientation).

    The batches of an epoch are :meth:`batch_index_order`, a pure function of ``(seed, epoch)``;
    their number, ``len(sampler)``, is the same every epoch. With ``drop_last`` the leftover
    images of each group are left out of that epoch (a group smaller than a batch never shows).

    Args:
        group_ids: group of each dataset index.
        batch_size: images per batch.
        seed: seed of the shuffling.
        drop_last: drop each group's incomplete last batch.
        shuffle: shuffle (False: dataset order within each group).
    """

    def __init__(
        self,
        group_ids: Sequence[int],
        batch_size: int,
        *,
        seed: int,
        drop_last: bool = True,
        shuffle: bool = True,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.group_ids = np.asarray(group_ids, dtype=np.int64)
        self.batch_size = batch_size
        self.seed = seed
        self.drop_last = drop_last
        self.shuffle = shuffle
        self.epoch = 0
        self.start_batch = 0
        sizes = np.bincount(self.group_ids) if len(self.group_ids) else np.zeros(0, np.int64)
        rounding = np.floor_divide if drop_last else _ceil_div
        self._num_batches = int(sum(int(rounding(int(s), batch_size)) for s in sizes))

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Iterate ``batch_index_order(epoch)[start_batch:]`` from now on."""
        if epoch < 0 or not 0 <= start_batch <= self._num_batches:
            raise ValueError(f"bad epoch {epoch} / start_batch {start_batch}")
        self.epoch, self.start_batch = epoch, start_batch

    def batch_index_order(self, epoch: int) -> list[list[int]]:
        """All batches (lists of dataset indices) of ``epoch``, in order."""
        n = len(self.group_ids)
        order = (
            np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else range(n)
        )
        buffers: dict[int, list[int]] = {}
        batches: list[list[int]] = []
        for idx in order:
            buf = buffers.setdefault(int(self.group_ids[idx]), [])
            buf.append(int(idx))
            if len(buf) == self.batch_size:
                batches.append(buf.copy())
                buf.clear()
        if not self.drop_last:
            batches.extend(buf for _, buf in sorted(buffers.items()) if buf)
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        yield from self.batch_index_order(self.epoch)[self.start_batch :]

    def __len__(self) -> int:
        return self._num_batches


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def aspect_ratio_groups(image_sizes: Sequence[tuple[int, int]]) -> list[int]:
    """Group 0 for landscape or square images (w >= h), 1 for portrait; sizes are (h, w)."""
    return [0 if w >= h else 1 for h, w in image_sizes]


def _image_sizes(dataset: Any) -> list[tuple[int, int]]:
    if isinstance(dataset, Subset):
        sizes = _image_sizes(dataset.dataset)
        return [sizes[i] for i in dataset.indices]
    if hasattr(dataset, "image_sizes"):
        return list(dataset.image_sizes)
    raise TypeError(f"{type(dataset).__name__} has no image_sizes to group by aspect ratio")


def _set_dataset_epoch(dataset: Any, epoch: int) -> None:
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    if hasattr(dataset, "set_epoch"):
        dataset.set_epoch(epoch)


def build_train_loader(
    dataset: Dataset[Any],
    *,
    batch_size: int,
    seed: int,
    num_workers: int = 0,
    group_by_aspect_ratio: bool = True,
    drop_last: bool = True,
) -> DataLoader[Any]:
    """Shuffled training loader over a :class:`GroupedBatchSampler` seeded with ``seed``.

    Iterate it with :func:`iterate_forever` / :func:`iterate_from`, which set the epoch on the
    sampler and the dataset. Workers are not persistent, so each epoch's workers see the
    dataset's current epoch (flip decisions).
    """
    n = len(dataset)  # type: ignore[arg-type]
    groups = aspect_ratio_groups(_image_sizes(dataset)) if group_by_aspect_ratio else [0] * n
    sampler = GroupedBatchSampler(groups, batch_size, seed=seed, drop_last=drop_last)
    if len(sampler) == 0:
        raise ValueError(f"dataset of {n} images gives no full batch of {batch_size}")
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_fn,
        persistent_workers=False,
    )


def build_eval_loader(
    dataset: Dataset[Any], *, batch_size: int, num_workers: int = 0
) -> DataLoader[Any]:
    """Loader over every image once, in dataset order."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        drop_last=False,
        num_workers=num_workers,
        collate_fn=collate_fn,
    )


def iterate_from(loader: DataLoader[Any], start_step: int = 0) -> Iterator[Any]:
    """Yield batches forever, starting at global step ``start_step`` (0-based).

    Step ``s`` is batch ``s % len(sampler)`` of epoch ``s // len(sampler)``; the batches before
    ``start_step`` are never loaded. Requires a :class:`GroupedBatchSampler` batch sampler (as
    built by :func:`build_train_loader`).
    """
    sampler = loader.batch_sampler
    if not isinstance(sampler, GroupedBatchSampler):
        raise TypeError("iterate_from needs a loader whose batch_sampler is a GroupedBatchSampler")
    if len(sampler) == 0:
        raise ValueError("the loader has no batches")
    if start_step < 0:
        raise ValueError(f"start_step must be >= 0, got {start_step}")
    epoch, skip = divmod(start_step, len(sampler))
    while True:
        sampler.set_epoch(epoch, start_batch=skip)
        _set_dataset_epoch(loader.dataset, epoch)
        yield from loader
        epoch, skip = epoch + 1, 0


def iterate_forever(loader: DataLoader[Any]) -> Iterator[Any]:
    """Yield batches forever, epoch after epoch (0, 1, ...), setting each epoch deterministically."""
    if isinstance(loader.batch_sampler, GroupedBatchSampler):
        yield from iterate_from(loader, 0)
        return
    if len(loader) == 0:
        raise ValueError("the loader has no batches")
    epoch = 0
    while True:
        _set_dataset_epoch(loader.dataset, epoch)
        yield from loader
        epoch += 1
