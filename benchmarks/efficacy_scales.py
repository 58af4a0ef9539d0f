"""The configurations of `benchmarks/efficacy.py`: smoke (CI, under a minute), cpu, gpu.

cpu: 128 px shapes, 4 classes, 1-6 objects of 8-64 px, 4,000 train / 300 val images;
RetinaNet with trainable BatchNorm, a 64-channel FPN on P3-P7, GroupNorm head and anchors of
8-128 px (the defaults at min_size 128); AdamW at 1e-3, batch 16, warm-up then cosine, clipping
at 10. Teacher ResNet-34, 1,000 iterations on 2 threads (``--teacher-iterations`` changes it);
students ResNet-18, 600 iterations, the baseline and the FGD student of a seed side by side on
1 thread each. Training autocasts to bfloat16 where the CPU computes it natively
(``train.cpu_bf16``, AMX or AVX-512 BF16), evaluation stays in float32; other CPUs train in
float32.

FGD: the authors' RetinaNet weights (alpha 1e-3, beta 5e-4, gamma 5e-4, lambda 5e-6) times
0.01 at temperature 2. The authors' values were tuned on COCO at 800 px with 256 channels; here
the trained teacher's features have |F| of about 4-9, so at T = 0.5 both attention maps are
nearly one-hot and the raw weights make FGD's loss hundreds of times the detection loss (see
FGD_SPEC.md and docs/results.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

MIN_LEAD = 0.03  # the teacher must lead the baseline by 3 AP points (0-1 scale)

AUTHORS_X001 = {"alpha": 1e-5, "beta": 5e-6, "gamma": 5e-6, "lambda": 5e-8, "temp": 2.0}


def _retinanet(backbone: str, size: int, fpn: int) -> dict[str, Any]:
    return {
        "arch": "retinanet",
        "backbone": backbone,
        "fpn_channels": fpn,
        "min_size": size,
        "max_size": size,
    }


def _train(iterations: int, warmup: int, *, batch: int, eval_every: int, **extra: Any) -> dict:
    return {
        "batch_size": batch,
        "optim": {"name": "adamw", "lr": 1e-3},
        "schedule": {"iterations": iterations, "warmup_iters": warmup},
        "clip_grad_norm": 10.0,
        "eval_every": eval_every,
        "checkpoint_every": eval_every,
        "log_every": 25,
        "eval_batch_size": 50,
        **extra,
    }


@dataclass(frozen=True)
class Scale:
    shapes: dict[str, Any]  # ShapesSpec fields but the seed (the data seed)
    teacher_model: dict[str, Any]
    student_model: dict[str, Any]
    teacher_train: dict[str, Any]
    student_train: dict[str, Any]  # the seed is the sweep's grid
    fgd: dict[str, Any] = field(default_factory=lambda: dict(AUTHORS_X001))
    teacher_resources: dict[str, float] = field(default_factory=lambda: {"cpu": 2})
    student_resources: dict[str, float] = field(default_factory=lambda: {"cpu": 1})
    max_concurrent: int = 2
    teacher_features_cached: bool = True  # fgd.teacher_cache of the students' job


SCALES: dict[str, Scale] = {
    # CI: checks the pipeline end to end in under a minute; the AP figures mean nothing.
    "smoke": Scale(
        shapes={"num_train": 24, "num_val": 8, "image_size": 64, "max_size": 32},
        teacher_model=_retinanet("resnet34", 64, 16),
        student_model=_retinanet("resnet18", 64, 16),
        teacher_train=_train(4, 1, batch=4, eval_every=0, eval_batch_size=8, cpu_bf16=True),
        student_train=_train(4, 1, batch=4, eval_every=2, eval_batch_size=8, cpu_bf16=True),
    ),
    "cpu": Scale(
        shapes={"num_train": 4000, "num_val": 300, "image_size": 128, "max_size": 64},
        teacher_model=_retinanet("resnet34", 128, 64),
        student_model=_retinanet("resnet18", 128, 64),
        teacher_train=_train(1000, 50, batch=16, eval_every=0, cpu_bf16=True),
        student_train=_train(600, 50, batch=16, eval_every=150, cpu_bf16=True),
    ),
    # One GPU: the cpu protocol, all trials of the students' sweep at once on the one device.
    "gpu": Scale(
        shapes={"num_train": 4000, "num_val": 300, "image_size": 128, "max_size": 64},
        teacher_model=_retinanet("resnet34", 128, 64),
        student_model=_retinanet("resnet18", 128, 64),
        teacher_train=_train(1000, 50, batch=16, eval_every=0),
        student_train=_train(600, 50, batch=16, eval_every=150),
        teacher_resources={"cpu": 2, "gpu": 1},
        student_resources={"cpu": 2, "gpu": 0.15},
        max_concurrent=6,
    ),
}
