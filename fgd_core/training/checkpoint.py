"""Checkpoints: everything needed for an exact resume, written atomically, read weights-only."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import torch

from fgd_core.detectors import DetectorConfig
from fgd_core.training.config import (
    DataConfig,
    FGDConfig,
    JobConfig,
    OptimConfig,
    ScheduleConfig,
    TrainConfig,
)


def rng_state() -> dict[str, Any]:
    """The random states the training loop draws from (torch CPU and CUDA, Python)."""
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": list(random.getstate()[1]) + [random.getstate()[0], -1],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "python" in state:
        values = list(state["python"])
        version, internal = values[-2], tuple(int(v) for v in values[:-2])
        random.setstate((int(version), internal, None))


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Write `state` to `path` atomically (a crash never leaves a half-written checkpoint)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint with `weights_only=True` (no pickled code is ever executed)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a corrupt or foreign file: say which one
        raise ValueError(f"cannot read checkpoint {path}: {exc}") from exc
    if not isinstance(state, dict) or "model" not in state:
        raise ValueError(f"{path} is not a training checkpoint (no 'model' entry)")
    return state


def job_from_dict(data: dict[str, Any]) -> JobConfig:
    """Rebuild a JobConfig from `JobConfig.to_dict()` (as stored in checkpoints)."""
    train = dict(data["train"])
    train["optim"] = OptimConfig(**train["optim"])
    sched = dict(train["schedule"])
    sched["milestones"] = tuple(sched["milestones"])
    train["schedule"] = ScheduleConfig(**sched)
    fgd = dict(data["fgd"])
    if fgd.get("levels") is not None:
        fgd["levels"] = tuple(fgd["levels"])
    return JobConfig(
        kind=data["kind"],
        data=DataConfig(**data["data"]),
        model=DetectorConfig(**data["model"]),
        train=TrainConfig(**train),
        teacher=DetectorConfig(**data["teacher"]) if data.get("teacher") else None,
        teacher_weights=data.get("teacher_weights"),
        fgd=FGDConfig(**fgd),
        evaluate_teacher=data.get("evaluate_teacher", True),
    )
