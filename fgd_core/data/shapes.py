"""Procedural "shapes" detection dataset, written to disk as real COCO files and PNG images.

Every image is a pure function of ``(config.seed, split, index)``: the generator seeds one
``numpy.random.Generator`` per image with ``[seed, split_code, index]`` (train 0, val 1), so the
splits are independent and the same config gives byte-identical files.
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, fields
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_util

from fgd_core.data.errors import DatasetError

SHAPE_NAMES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross", "ring")
MANIFEST_NAME = "shapes_config.json"  # written last: its presence marks a complete dataset
FORMAT_VERSION = 1  # bump when the rendering changes, so old directories are not reused
SPLITS: tuple[str, ...] = ("train", "val")
_SPLIT_CODES = {"train": 0, "val": 1}
_PLACEMENT_TRIES = 12  # placements tried per object before it is left out
_MIN_CONTRAST = 90.0  # least RGB distance between a shape's colour and the background under it
_ASPECT_JITTER = 1.25  # object width/height ratio drawn log-uniformly in [1/j, j]


@dataclass(frozen=True)
class ShapesConfig:
    """What to generate; the whole dataset is a pure function of these fields."""

    seed: int = 0  # image i of a split is drawn from default_rng([seed, split_code, i])
    num_train: int = 4000  # training images (at least num_classes)
    num_val: int = 300  # validation images (at least num_classes)
    image_size: int = 128  # side of the square images, px
    num_classes: int = 4  # the first num_classes of SHAPE_NAMES (1..6)
    min_objects: int = 1  # objects attempted per image, uniform in [min_objects, max_objects]
    max_objects: int = 6  # (an object that cannot be placed without hiding others is left out)
    min_size: int = 8  # object extent (px), log-uniform in [min_size, max_size]: small ones common
    max_size: int = 64  # largest object extent, px (at most image_size)
    min_visible_fraction: float = 0.4  # an occluded object keeps at least this share of its area
    min_visible_pixels: int = 8  # ...and at least this many visible pixels
    noise_std: float = 8.0  # largest std of the per-image gaussian pixel noise (0..255 scale)

    def __post_init__(self) -> None:
        checks = [
            (self.seed >= 0, "seed must be >= 0"),
            (
                1 <= self.num_classes <= len(SHAPE_NAMES),
                f"num_classes must be in 1..{len(SHAPE_NAMES)}",
            ),
            (self.num_train >= self.num_classes, "num_train must be >= num_classes"),
            (self.num_val >= self.num_classes, "num_val must be >= num_classes"),
            (self.image_size >= 16, "image_size must be >= 16"),
            (1 <= self.min_objects <= self.max_objects, "need 1 <= min_objects <= max_objects"),
            (4 <= self.min_size <= self.max_size, "need 4 <= min_size <= max_size"),
            (self.max_size <= self.image_size, "max_size must be <= image_size"),
            (0.0 <= self.min_visible_fraction <= 1.0, "min_visible_fraction must be in [0, 1]"),
            (self.min_visible_pixels >= 1, "min_visible_pixels must be >= 1"),
            (self.noise_std >= 0.0, "noise_std must be >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"invalid ShapesConfig: {message}")

    @property
    def category_names(self) -> tuple[str, ...]:
        """Class names; the COCO category id of a name is its position + 1."""
        return SHAPE_NAMES[: self.num_classes]


@dataclass(frozen=True)
class ShapesDataset:
    """Where a generated shapes dataset lives (absolute paths)."""

    root: Path
    train_images: Path  # folder of train PNGs
    train_ann: Path  # COCO instances JSON of the train split
    val_images: Path
    val_ann: Path
    categories: tuple[str, ...]  # class names; COCO category id = position + 1
    config: ShapesConfig

    @property
    def num_classes(self) -> int:
        """Number of object classes (background excluded)."""
        return len(self.categories)


def generate_shapes(
    out_dir: str | os.PathLike[str], config: ShapesConfig | None = None
) -> ShapesDataset:
    """Write a shapes dataset under ``out_dir``, or return the one already there.

    Layout: ``train/*.png``, ``val/*.png``, ``annotations/instances_{train,val}.json`` and
    ``shapes_config.json``. Everything is written to a hidden sibling folder that is renamed to
    ``out_dir`` at the end, so a crash never leaves a complete-looking dataset, and concurrent
    callers with the same config all end up with the one winner's copy.

    Raises:
        DatasetError: ``out_dir`` holds a dataset of another config, or anything else.
    """
    config = config if config is not None else ShapesConfig()
    root = Path(out_dir).expanduser().resolve()
    existing = _existing(root, config)
    if existing is not None:
        return existing
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.partial-", dir=root.parent))
    try:
        os.chmod(tmp, 0o755)
        (tmp / "annotations").mkdir()
        for split in SPLITS:
            _write_split(tmp, split, config)
        _write_json(tmp / MANIFEST_NAME, _manifest(config))
        try:
            os.rename(tmp, root)
        except OSError as exc:
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
            existing = _existing(root, config)  # another process finished first
            if existing is None:
                raise DatasetError(f"{root} appeared while generating and is empty") from exc
            return existing
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return _describe(root, config)


def load_shapes(root: str | os.PathLike[str]) -> ShapesDataset:
    """Open a shapes dataset written by :func:`generate_shapes`, checking it is complete.

    Raises:
        DatasetError: no manifest, an unreadable or foreign manifest, or missing files.
    """
    root = Path(root).expanduser().resolve()
    manifest_path = root / MANIFEST_NAME
    try:
        manifest = json.loads(manifest_path.read_text())
    except FileNotFoundError as exc:
        raise DatasetError(f"{root} is not a shapes dataset: {MANIFEST_NAME} is missing") from exc
    except (OSError, ValueError) as exc:
        raise DatasetError(f"cannot read {manifest_path}: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        version = manifest.get("format_version") if isinstance(manifest, dict) else None
        raise DatasetError(
            f"{manifest_path}: format_version {version!r} is not {FORMAT_VERSION}; "
            "delete the folder to regenerate it"
        )
    try:
        config = ShapesConfig(**manifest["config"])
    except (KeyError, TypeError, ValueError) as exc:
        raise DatasetError(f"{manifest_path}: invalid config: {exc}") from exc
    info = _describe(root, config)
    expected = {"train": config.num_train, "val": config.num_val}
    for split, folder, ann in (
        ("train", info.train_images, info.train_ann),
        ("val", info.val_images, info.val_ann),
    ):
        if not ann.is_file():
            raise DatasetError(f"incomplete shapes dataset: {ann} is missing")
        count = sum(1 for _ in folder.glob("*.png")) if folder.is_dir() else 0
        if count != expected[split]:
            raise DatasetError(
                f"incomplete shapes dataset: {folder} holds {count} PNGs, expected {expected[split]}"
            )
    return info


def render_sample(
    config: ShapesConfig, split: str, index: int
) -> tuple[np.ndarray, list[tuple[int, np.ndarray]]]:
    """Draw image ``index`` of ``split``.

    Returns:
        ``(image, instances)``: image uint8 (H, W, 3) RGB; instances as ``(category_id, mask)``
        pairs in painting order, category ids 1-based, each mask bool (H, W) holding the
        object's VISIBLE pixels (later objects painted over it removed).
    """
    if split not in _SPLIT_CODES:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    rng = np.random.default_rng([config.seed, _SPLIT_CODES[split], index])
    size = config.image_size
    img = _background(rng, size)  # (H, W, 3) float32
    owner = np.zeros((size, size), dtype=np.int16)  # 0 background, k = k-th placed object
    full_area: list[int] = []
    visible: list[int] = []
    classes: list[int] = []
    for k in range(int(rng.integers(config.min_objects, config.max_objects + 1))):
        # The first object cycles through the classes, so every split of >= K images has all.
        cls = index % config.num_classes if k == 0 else int(rng.integers(config.num_classes))
        mask = _place(rng, cls, config, owner, full_area, visible, first=(k == 0))
        if mask is None:
            continue
        lost = np.bincount(owner[mask], minlength=len(classes) + 1)[1:]
        visible = [v - int(n) for v, n in zip(visible, lost, strict=True)]
        img[mask] = _pick_colour(rng, img, mask)
        owner[mask] = len(classes) + 1
        area = int(mask.sum())
        full_area.append(area)
        visible.append(area)
        classes.append(cls)
    std = rng.uniform(0.25, 1.0) * config.noise_std
    img += rng.standard_normal(img.shape, dtype=np.float32) * np.float32(std)
    image = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    instances = [(cls + 1, owner == k + 1) for k, cls in enumerate(classes)]
    return image, instances


def _place(
    rng: np.random.Generator,
    cls: int,
    config: ShapesConfig,
    owner: np.ndarray,
    full_area: list[int],
    visible: list[int],
    *,
    first: bool,
) -> np.ndarray | None:
    """Find a placement that leaves every earlier object visible enough; None if none found."""
    need = np.maximum(
        config.min_visible_fraction * np.asarray(full_area, dtype=np.float64),
        config.min_visible_pixels,
    )
    for _ in range(_PLACEMENT_TRIES):
        mask = _shape_mask(rng, cls, config)
        if first:
            return mask  # the first object hides nothing and is always kept (class cycling)
        if mask.sum() < config.min_visible_pixels:
            continue
        if visible:
            lost = np.bincount(owner[mask], minlength=len(visible) + 1)[1:]
            if np.any(np.asarray(visible) - lost < need):
                continue
        return mask
    return None


def _shape_mask(rng: np.random.Generator, cls: int, config: ShapesConfig) -> np.ndarray:
    """Bool (H, W) mask of one whole shape of class ``cls`` at a random place and size."""
    size = config.image_size
    extent = math.exp(rng.uniform(math.log(config.min_size), math.log(config.max_size)))
    aspect = math.exp(rng.uniform(-math.log(_ASPECT_JITTER), math.log(_ASPECT_JITTER)))
    w = min(extent * math.sqrt(aspect), float(size))
    h = min(extent / math.sqrt(aspect), float(size))
    cx = rng.uniform(w / 2, size - w / 2)
    cy = rng.uniform(h / 2, size - h / 2)
    x0, y0, x1, y1 = cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    name = SHAPE_NAMES[cls]
    if name == "circle":
        draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=1)
    elif name == "square":
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=1)
    elif name == "triangle":
        theta = rng.uniform(0.0, 2 * math.pi)
        angles = [theta + 2 * math.pi * j / 3 for j in range(3)]
        draw.polygon([(cx + w / 2 * math.cos(a), cy + h / 2 * math.sin(a)) for a in angles], fill=1)
    elif name == "diamond":
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=1)
    elif name == "cross":
        t = max(2.0, 0.34 * min(w, h)) / 2
        draw.rectangle((x0, cy - t, x1 - 1, cy + t - 1), fill=1)
        draw.rectangle((cx - t, y0, cx + t - 1, y1 - 1), fill=1)
    else:  # ring
        draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=1)
        draw.ellipse((cx - w / 4, cy - h / 4, cx + w / 4, cy + h / 4), fill=0)
    return np.asarray(canvas) > 0


def _pick_colour(rng: np.random.Generator, img: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """A random RGB colour that stands out from the background under ``mask``."""
    under = img[mask].mean(axis=0)
    for _ in range(8):
        colour = rng.uniform(0.0, 255.0, size=3).astype(np.float32)
        if float(np.linalg.norm(colour - under)) >= _MIN_CONTRAST:
            return colour
    # The farthest corner of the RGB cube is always at least 128 * sqrt(3) away.
    return np.where(under < 127.5, 255.0, 0.0).astype(np.float32)


@lru_cache(maxsize=4)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (ys, xs), each float32 (H, W) in [0, 1)."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) / np.float32(size)
    ys.setflags(write=False)
    xs.setflags(write=False)
    return ys, xs


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Float32 (H, W, 3) textured background: a colour gradient plus 0-2 textures."""
    ys, xs = _grid(size)
    c0, c1 = rng.uniform(0.0, 255.0, size=(2, 3)).astype(np.float32)
    theta = rng.uniform(0.0, 2 * math.pi)
    t = np.float32(math.cos(theta)) * xs + np.float32(math.sin(theta)) * ys
    t = (t - t.min()) / np.float32(t.max() - t.min() + 1e-6)
    img = c0 + (c1 - c0) * t[..., None]
    for _ in range(int(rng.integers(0, 3))):
        kind = int(rng.integers(3))
        direction = rng.normal(size=3)
        colour = (direction / (np.linalg.norm(direction) + 1e-6)).astype(np.float32)
        amp = np.float32(rng.uniform(10.0, 45.0))
        if kind == 0:  # stripes
            freq, phi, phase = rng.uniform(2.0, 12.0), rng.uniform(0, math.pi), rng.uniform(0, 6.3)
            proj = np.float32(math.cos(phi)) * xs + np.float32(math.sin(phi)) * ys
            pattern = np.sin(np.float32(2 * math.pi * freq) * proj + np.float32(phase))
        elif kind == 1:  # checkerboard
            cell = float(rng.integers(4, 33)) / size
            pattern = ((np.floor(xs / cell) + np.floor(ys / cell)) % 2) * 2 - 1
        else:  # soft blobs
            pattern = np.zeros_like(xs)
            for _ in range(int(rng.integers(2, 6))):
                bx, by = rng.uniform(0.0, 1.0, size=2)
                sigma = rng.uniform(0.05, 0.3)
                sign = np.float32(rng.choice([-1.0, 1.0]))
                d2 = (xs - np.float32(bx)) ** 2 + (ys - np.float32(by)) ** 2
                pattern += sign * np.exp(d2 * np.float32(-0.5 / sigma**2))
        img += amp * pattern.astype(np.float32)[..., None] * colour
    return img


def _write_split(root: Path, split: str, config: ShapesConfig) -> None:
    """Write ``root/split/*.png`` and ``root/annotations/instances_{split}.json``."""
    folder = root / split
    folder.mkdir()
    size = config.image_size
    count = config.num_train if split == "train" else config.num_val
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for index in range(count):
        image, instances = render_sample(config, split, index)
        file_name = f"{index:06d}.png"
        Image.fromarray(image).save(folder / file_name, format="PNG", compress_level=1)
        image_id = index + 1
        images.append({"id": image_id, "file_name": file_name, "width": size, "height": size})
        for category_id, mask in instances:
            rle = mask_util.encode(np.asfortranarray(mask, dtype=np.uint8))
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": category_id,
                    "bbox": [float(v) for v in mask_util.toBbox(rle)],  # [x, y, w, h]
                    "area": int(mask_util.area(rle)),
                    "iscrowd": 0,
                    "segmentation": {"size": [size, size], "counts": rle["counts"].decode("ascii")},
                }
            )
    coco = {
        "info": {
            "description": f"procedural shapes ({split}), fgd_core.data.shapes",
            "version": str(FORMAT_VERSION),
        },
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [
            {"id": i + 1, "name": name, "supercategory": "shape"}
            for i, name in enumerate(config.category_names)
        ],
    }
    _write_json(root / "annotations" / f"instances_{split}.json", coco)


def _manifest(config: ShapesConfig) -> dict[str, Any]:
    return {
        "generator": "fgd_core.data.shapes",
        "format_version": FORMAT_VERSION,
        "config": asdict(config),
        "categories": list(config.category_names),
    }


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, separators=(",", ":")))


def _describe(root: Path, config: ShapesConfig) -> ShapesDataset:
    return ShapesDataset(
        root=root,
        train_images=root / "train",
        train_ann=root / "annotations" / "instances_train.json",
        val_images=root / "val",
        val_ann=root / "annotations" / "instances_val.json",
        categories=config.category_names,
        config=config,
    )


def _existing(root: Path, config: ShapesConfig) -> ShapesDataset | None:
    """The dataset already at ``root`` if it matches ``config``; None if ``root`` is free."""
    if not root.exists():
        return None
    if not root.is_dir():
        raise DatasetError(f"{root} exists and is not a directory")
    if not (root / MANIFEST_NAME).exists():
        if any(root.iterdir()):
            raise DatasetError(
                f"{root} is not empty and holds no {MANIFEST_NAME}; "
                "refusing to write a shapes dataset over it"
            )
        return None
    found = load_shapes(root)
    if found.config != config:
        diff = ", ".join(
            f"{f.name}: {getattr(found.config, f.name)!r} on disk vs {getattr(config, f.name)!r}"
            for f in fields(ShapesConfig)
            if getattr(found.config, f.name) != getattr(config, f.name)
        )
        raise DatasetError(
            f"{root} holds a shapes dataset generated from a different config ({diff}); "
            "use another directory or delete this one"
        )
    return found
