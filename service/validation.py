"""Checks on a JobSpec beyond its own validators: data paths must lie under the data roots.

Paths are compared after resolving ``..`` and symlinks that exist on this host; they need not
exist here (they are read by the Ray workers).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

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
    path = Path(value).expanduser()
    if not path.is_absolute():
        return False
    resolved = path.resolve(strict=False)
    return any(resolved == root or resolved.is_relative_to(root) for root in roots)
