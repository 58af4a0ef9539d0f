"""Training, distillation and checkpoints as plain functions; the loop itself does no I/O."""

from fgd_core.training.config import (
    DataConfig,
    FGDConfig,
    JobConfig,
    OptimConfig,
    ScheduleConfig,
    TrainConfig,
)

__all__ = [
    "DataConfig",
    "FGDConfig",
    "JobConfig",
    "OptimConfig",
    "ScheduleConfig",
    "TrainConfig",
]
