"""Saving, strict loading and FGD's "inheriting" of detector weights."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

_SHOW = 5  # how many offending keys an error message lists


class WeightsError(ValueError):
    """Weights could not be loaded as asked (missing file, wrong content, keys or shapes)."""


def _listing(keys: Sequence[str]) -> str:
    shown = ", ".join(keys[:_SHOW])
    return f"{shown}, ... ({len(keys)} in all)" if len(keys) > _SHOW else shown


def save_weights(model: nn.Module, path: str | Path) -> None:
    """Save `model.state_dict()` (a plain state dict) with torch.save."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)


def _extract_state_dict(obj: object, key: str | None, path: Path) -> dict[str, Tensor]:
    if key is not None:
        if not isinstance(obj, Mapping) or key not in obj:
            raise WeightsError(f"{path}: no key {key!r} in the checkpoint")
        obj = obj[key]
    elif isinstance(obj, Mapping) and "model" in obj and isinstance(obj["model"], Mapping):
        obj = obj["model"]  # a training checkpoint {"model": state_dict, "optimizer": ...}
    if not isinstance(obj, Mapping) or not obj:
        raise WeightsError(f"{path}: not a state dict (got {type(obj).__name__})")
    bad = [str(k) for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, Tensor)]
    if bad:
        raise WeightsError(f"{path}: not a state dict; non-tensor entries: {_listing(bad)}")
    state = dict(obj)
    if all(k.startswith("module.") for k in state):  # saved from DistributedDataParallel
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state


def load_weights(
    model: nn.Module, path: str | Path, *, strict: bool = True, key: str | None = None
) -> list[str]:
    """Load a state dict saved by `save_weights` (or a checkpoint holding one) into `model`.

    Args:
        path: file written by torch.save; read with ``weights_only=True``.
        strict: missing or unexpected keys are errors. Shape mismatches are always errors, and
            so is a file sharing no key with the model (never a silently random model).
        key: take the state dict from ``checkpoint[key]``; by default a dict with a "model"
            entry that is itself a dict is taken as a checkpoint.

    Returns:
        The names loaded.

    Raises:
        WeightsError: on any of the above.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling errors come in many types
        raise WeightsError(f"{path}: cannot be read as torch weights: {exc}") from exc
    state = _extract_state_dict(obj, key, path)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and state[k].shape != v.shape
    ]
    problems = []
    if shapes:
        problems.append(f"shape mismatches: {_listing(shapes)}")
    if strict and missing:
        problems.append(f"missing keys: {_listing(missing)}")
    if strict and unexpected:
        problems.append(f"unexpected keys: {_listing(unexpected)}")
    if len(missing) == len(own):
        problems.append("no key of the model is in the file")
    if problems:
        raise WeightsError(f"{path} does not fit {type(model).__name__}: " + "; ".join(problems))
    loadable = {k: v for k, v in state.items() if k in own}
    model.load_state_dict(loadable, strict=strict)
    return list(loadable)


def inherit_weights(
    student: nn.Module,
    teacher: nn.Module,
    *,
    prefixes: Sequence[str] = ("backbone.fpn", "head", "rpn", "roi_heads"),
) -> list[str]:
    """FGD's "inheriting": copy the teacher's neck and head tensors into the student.

    Copies every parameter and buffer under one of `prefixes` whose name and shape match in
    both models (e.g. the FPN's lateral 1x1 convs are skipped when the backbones' channels
    differ). Returns the copied names.
    """
    teacher_state = teacher.state_dict()
    copied: list[str] = []
    with torch.no_grad():
        for name, tensor in student.state_dict().items():
            if not any(name == p or name.startswith(p + ".") for p in prefixes):
                continue
            source = teacher_state.get(name)
            if source is not None and source.shape == tensor.shape:
                tensor.copy_(source)  # state_dict tensors share storage with the module
                copied.append(name)
    return copied
