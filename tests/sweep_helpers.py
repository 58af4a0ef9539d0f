"""Tiny sweep specs and a teacher file shared by the sweep tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

TINY_MODEL = {
    "arch": "retinanet",
    "backbone": "resnet18",
    "fpn_channels": 16,
    "min_size": 64,
    "max_size": 64,
}


def tiny_job(
    data_root: Path,
    teacher: Path | None,
    *,
    sweep: dict[str, Any],
    iterations: int = 6,
    eval_every: int = 2,
) -> dict[str, Any]:
    job: dict[str, Any] = {
        "kind": "distill" if teacher else "baseline",
        "data": {
            "shapes": {
                "root": str(data_root),
                "num_train": 16,
                "num_val": 8,
                "image_size": 64,
                "seed": 0,
            }
        },
        "model": TINY_MODEL,
        "train": {
            "batch_size": 4,
            "schedule": {"iterations": iterations, "warmup_iters": 1},
            "eval_every": eval_every,
            "checkpoint_every": eval_every,
            "log_every": 1,
            "eval_max_batches": 1,
            "eval_batch_size": 4,
        },
        "fgd": {"temp": 2.0},
        "sweep": sweep,
    }
    if teacher:
        job["teacher"] = {"checkpoint": str(teacher), "model": {**TINY_MODEL, "fpn_channels": 32}}
        job["evaluate_teacher"] = False
    return job


def make_teacher(data_root: Path, out: Path) -> Path:
    """Train a tiny teacher for 2 steps and save its state dict."""
    import torch

    from fgd_core.training import JobConfig, ScheduleConfig, TrainConfig
    from fgd_core.training.jobs import run_job
    from workers.convert import detector_config, resolve_data
    from workers.spec import DataSpec, DetectorSpec

    data_spec = DataSpec.model_validate(
        {
            "shapes": {
                "root": str(data_root),
                "num_train": 16,
                "num_val": 8,
                "image_size": 64,
                "seed": 0,
            }
        }
    )
    data = resolve_data(data_spec)
    model = detector_config(DetectorSpec.model_validate({**TINY_MODEL, "fpn_channels": 32}), 4)
    train = TrainConfig(
        batch_size=4,
        schedule=ScheduleConfig(iterations=2, warmup_iters=1),
        eval_max_batches=1,
        eval_batch_size=4,
    )
    result = run_job(JobConfig(kind="teacher", data=data, model=model, train=train))
    torch.save(result.model_state, out)
    return out
