"""The teacher's FPN features kept on disk per (image, flip), shared by the runs of one teacher.

FGD reads only the teacher's FPN features, a pure function of the teacher's weights and of the
batched input. Students of one sweep (seeds, baseline pairs, hyperparameter trials) run the same
frozen teacher over the same images again and again; on the CPU that forward is most of FGD's
extra cost per step. With `fgd.teacher_cache` on, each (image, horizontal flip) is computed once
and later batches, in this run or in any other run of the same teacher on this machine, read it.

An entry is one image, flipped or not, at one resized size (multi-scale training gives an image
an entry per size), and holds its features in its own padded frame: its resized size rounded up to the
transform's `size_divisible`. A batch takes entries only when its padded tensor is exactly that
frame for every image in it: always for a dataset of one image size (the shapes data); a batch
that pads an image further (mixed sizes, as in COCO) is computed live, because padding changes
the features near the image's border. Cached features are therefore those the live forward would
give, up to the last bits of float rounding (a convolution over another batch).

The folder of a cache is named by a digest of everything the features depend on: the teacher's
weights file (its bytes), its architecture, the input transform, the distilled levels, and the
training images (folder and annotation file bytes). Entries are written once, atomically (a
temporary file renamed), so concurrent runs share a folder without locks: the first to need an
entry computes and writes it, the others read it. An entry that cannot be read is recomputed;
a cache that cannot be written (a full disk) warns once and the run goes on live.

Location: ``$FGD_TEACHER_CACHE_DIR``, else ``$FGD_HOME/cache/teacher-features`` (``FGD_HOME``
defaults to ``~/.fgd``). A cache takes about 8 bytes per teacher-feature cell per image (two
flips, float32): 0.7 GB for the 4,000 images of the cpu-scale shapes data; do not switch it on for
a large dataset at full resolution without the disk for it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import uuid
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

log = logging.getLogger(__name__)

ENV_DIR = "FGD_TEACHER_CACHE_DIR"

# (image_id, horizontally flipped, resized unpadded (h, w)): what an entry's features depend on
# besides the cache's key.
Entry = tuple[Any, bool, tuple[int, int]]
FORMAT = 1  # bumped when what an entry holds changes


def cache_root() -> Path:
    """``$FGD_TEACHER_CACHE_DIR``, else ``$FGD_HOME/cache/teacher-features``."""
    explicit = os.environ.get(ENV_DIR)
    if explicit:
        return Path(explicit).expanduser()
    home = Path(os.environ.get("FGD_HOME") or "~/.fgd").expanduser()
    return home / "cache" / "teacher-features"


def file_digest(path: str | os.PathLike[str]) -> str:
    """sha256 of a file's bytes, hex."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def cache_key(parts: dict[str, Any]) -> str:
    """A folder name for `parts` (JSON-serialisable): 24 hex digits of its sha256."""
    text = json.dumps({"format": FORMAT, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


@dataclass
class CacheStats:
    hits: int = 0  # images whose features came from the cache
    misses: int = 0  # images computed and written
    live_batches: int = 0  # batches computed live (padded beyond an image's own frame)


class TeacherFeatureCache:
    """Entries of one (teacher, transform, levels, dataset) in `directory`.

    Args:
        directory: the cache's folder (created on first write).
        channels: teacher channels of each cached level, in the order levels are stored.
    """

    def __init__(self, directory: str | os.PathLike[str], channels: Sequence[int]) -> None:
        self.directory = Path(directory)
        self.channels = list(channels)
        self.stats = CacheStats()
        self.writable = True

    def path(self, entry: Entry) -> Path:
        image_id, flipped, (h, w) = entry
        return self.directory / f"{image_id}-{int(flipped)}-{h}x{w}.npy"

    def load(self, entry: Entry, sizes: Sequence[tuple[int, int]]) -> list[Tensor]:
        """The entry's levels as (C_l, H_l, W_l) tensors; [] when absent or unreadable.

        Args:
            sizes: (H_l, W_l) of each level, in the cache's level order.
        """
        path = self.path(entry)
        try:
            flat = np.load(path, allow_pickle=False)
        except (FileNotFoundError, NotADirectoryError):
            return []
        except (OSError, ValueError) as exc:
            log.warning("teacher cache entry %s unreadable (%s); recomputing it", path, exc)
            return []
        counts = [c * h * w for c, (h, w) in zip(self.channels, sizes, strict=True)]
        if flat.dtype != np.float32 or flat.ndim != 1 or flat.size != sum(counts):
            log.warning("teacher cache entry %s has the wrong size; recomputing it", path)
            return []
        pieces = torch.from_numpy(flat).split(counts)
        return [p.view(c, h, w) for p, c, (h, w) in zip(pieces, self.channels, sizes, strict=True)]

    def store(self, entry: Entry, levels: Sequence[Tensor]) -> None:
        """Write one image's levels ((C_l, H_l, W_l) each) atomically; warn once on failure."""
        if not self.writable:
            return
        flat = torch.cat([t.detach().float().reshape(-1).cpu() for t in levels]).numpy()
        path = self.path(entry)
        tmp = path.with_name(f".{path.stem}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as fh:
                np.save(fh, flat, allow_pickle=False)
            os.replace(tmp, path)
        except OSError as exc:
            self.writable = False
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            warnings.warn(
                f"cannot write the teacher feature cache at {self.directory} ({exc}); "
                "this run goes on computing the teacher's features live",
                RuntimeWarning,
                stacklevel=2,
            )


def own_frame(size: tuple[int, int], size_divisible: int) -> tuple[int, int]:
    """The padded (H, W) of an image of resized `size` batched alone."""
    d = max(1, int(size_divisible))
    return (-(-size[0] // d) * d, -(-size[1] // d) * d)


def entry_ids(
    targets: Sequence[dict[str, Any]], sizes: Sequence[tuple[int, int]]
) -> list[Entry] | None:
    """The entry of each image, or None when a target lacks its image_id or hflip flag.

    Args:
        sizes: the resized, unpadded (h, w) of each image (multi-scale training resizes an
            image differently from batch to batch: each size is an entry of its own).
    """
    ids: list[Entry] = []
    for t, (h, w) in zip(targets, sizes, strict=True):
        if "image_id" not in t or "hflip" not in t:
            return None
        image_id = t["image_id"]
        if isinstance(image_id, Tensor):
            image_id = image_id.item()
        ids.append((image_id, bool(t["hflip"]), (int(h), int(w))))
    return ids
