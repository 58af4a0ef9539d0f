"""Checks on a JobSpec beyond its own validators: data paths must lie under the data roots.

Paths are compared after resolving ``..`` and symlinks that exist on this host; they need not
exist here (they are read by the Ray workers). Resolving costs a system call per component of
the path, and every submission names several paths, mostly the same few: each resolution is
remembered for ``RESOLVED_SECONDS``, so a symlink changed on this host counts within a minute.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from service.cache import TtlCache
from workers.spec import JobSpec

# Spec fields holding a path the workers read; a sweep grid may override them by dotted path.
PATH_FIELDS = (
    "data.coco.train_images",
    "data.coco.train_ann",
    "data.coco.val_images",
    "data.coco.val_ann",
    "data.shapes.root",
    "teacher.checkpoint",
)


class PathNotAllowed(ValueError):
    """``loc`` is the field's location in the request body, e.g. ``("spec", "data", ...)``."""

    def __init__(self, loc: tuple[str | int, ...], message: str) -> None:
        self.loc = loc
        super().__init__(message)


def check_data_paths(spec: JobSpec, roots: Sequence[Path]) -> None:
    """Raise ``PathNotAllowed`` for the first path field outside every root.

    Raises:
        PathNotAllowed: naming the field (``spec.data.coco.train_ann``) and the allowed roots.
    """
    for loc, value in _paths(spec):
        if not _allowed(value, roots):
            shown = ", ".join(str(r) for r in roots)
            where = "absolute path" if not Path(value).expanduser().is_absolute() else "path"
            raise PathNotAllowed(
                ("spec", *loc),
                f"{where} {value!r} is not under an allowed data root ({shown}); "
                "use an absolute path inside one of them",
            )


def _paths(spec: JobSpec) -> Iterator[tuple[tuple[str | int, ...], str]]:
    data = spec.to_dict()
    for dotted in PATH_FIELDS:
        value: Any = data
        for part in dotted.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if isinstance(value, str):
            yield tuple(dotted.split(".")), value
    if spec.sweep is not None:
        for dotted, values in spec.sweep.grid.items():
            if dotted in PATH_FIELDS:
                for i, value in enumerate(values):
                    if isinstance(value, str):
                        yield ("sweep", "grid", dotted, i), value


def _allowed(value: str, roots: Sequence[Path]) -> bool:
    resolved = _resolve(value)
    return resolved is not None and any(
        resolved == str(root) or resolved.startswith(os.path.join(root, "")) for root in roots
    )


RESOLVED_SECONDS = 60.0
# The path as sent -> its resolution (None: not absolute).
_RESOLVED: TtlCache[str, str | None] = TtlCache(RESOLVED_SECONDS, 4096)


def _resolve(value: str) -> str | None:
    """``value`` with ``~``, ``..`` and symlinks resolved; None when it is not absolute."""
    found, resolved = _RESOLVED.lookup(value)
    if found:
        return resolved
    path = os.path.expanduser(value)
    resolved = os.path.realpath(path) if os.path.isabs(path) else None
    _RESOLVED.put(value, resolved)
    return resolved
