"""`fgd demo --local`: a teacher, a baseline student and an FGD student on shapes data, side by side.

The three runs are ordinary JobSpecs built here and written to the demo folder as YAML, so each
can be rerun with `fgd train <kind> <file>`. Sized for a few minutes on 2 CPU cores.
"""

from __future__ import annotations

import json
from pathlib import Path

from fgd_cli.console import console, metrics_table, say
from fgd_cli.runner import RunOutcome, run_job_spec
from workers.spec import (
    Backbone,
    DataSpec,
    DetectorSpec,
    FGDSpec,
    JobSpec,
    OptimSpec,
    ScheduleSpec,
    ShapesSpec,
    TeacherSpec,
    TrainSpec,
    dump_spec,
)

DEMO_STATS = (("AP", "AP"), ("AP50", "AP50"), ("APs", "APs"), ("APm", "APm"), ("APl", "APl"))


def demo_specs(out: Path, *, quick: bool = False) -> dict[str, JobSpec]:
    """The teacher, baseline and distill specs of the demo (distill reads out/teacher/model.pt).

    Full: 128 px shapes (800 train / 100 val images), RetinaNet ResNet-34 teacher and ResNet-18
    students with 64-channel FPNs. FGD uses calibrated weights (distillation total = the
    detection loss on the first batch) and temp 2: the authors' raw weights, tuned for COCO at
    800 px and 256 channels, are far off at this scale (see FGD_SPEC.md).
    Quick: 64 px, 8 / 4 images, 16-channel FPNs, 3 steps each (a smoke test).
    """
    size = 64 if quick else 128
    shapes = ShapesSpec(
        num_train=8 if quick else 800,
        num_val=4 if quick else 100,
        image_size=size,
        num_classes=4,
        max_size=32 if quick else 64,
    )
    data = DataSpec(shapes=shapes)
    fpn = 16 if quick else 64

    def detector(backbone: Backbone) -> DetectorSpec:
        return DetectorSpec(
            arch="retinanet", backbone=backbone, fpn_channels=fpn, min_size=size, max_size=size
        )

    def train(iterations: int) -> TrainSpec:
        return TrainSpec(
            batch_size=4 if quick else 8,
            optim=OptimSpec(name="adamw", lr=2e-3),
            schedule=ScheduleSpec(
                iterations=iterations, warmup_iters=1 if quick else max(1, iterations // 10)
            ),
            eval_batch_size=8 if quick else 25,
            log_every=1 if quick else 10,
        )

    teacher_model, student_model = detector("resnet34"), detector("resnet18")
    student_train = train(3 if quick else 270)
    return {
        "teacher": JobSpec(
            kind="teacher", data=data, model=teacher_model, train=train(3 if quick else 360)
        ),
        "baseline": JobSpec(kind="baseline", data=data, model=student_model, train=student_train),
        "distill": JobSpec(
            kind="distill",
            data=data,
            model=student_model,
            teacher=TeacherSpec(
                checkpoint=str((out / "teacher" / "model.pt").resolve()), model=teacher_model
            ),
            fgd=FGDSpec(calibrate_ratio=1.0, temp=2.0, calibrate_temp=False),
            train=student_train,
            evaluate_teacher=False,  # the teacher run has just been evaluated
        ),
    }


def run_demo(out: Path, *, quick: bool = False) -> dict[str, RunOutcome]:
    """Write the specs, train the three networks, print and save the comparison."""
    out.mkdir(parents=True, exist_ok=True)
    specs = demo_specs(out, quick=quick)
    for name, spec in specs.items():
        dump_spec(spec, out / f"{name}.yaml")
    say(f"demo specs written to {out}/{{teacher,baseline,distill}}.yaml")
    outcomes: dict[str, RunOutcome] = {}
    for name, spec in specs.items():
        outcomes[name] = run_job_spec(spec, out / name, label=name)
    labels = {
        "teacher": f"teacher ({specs['teacher'].model.backbone})",
        "baseline": f"student ({specs['baseline'].model.backbone})",
        "distill": f"student + FGD ({specs['distill'].model.backbone})",
    }
    table = metrics_table(
        [(labels[name], o.metrics) for name, o in outcomes.items()],
        title="shapes val, COCO metrics",
        stats=DEMO_STATS,
        extra={"train time": [f"{o.train_seconds:.1f} s" for o in outcomes.values()]},
    )
    console.print(table)
    hp = outcomes["distill"].fgd_hparams
    if hp:
        say("FGD after calibration: " + ", ".join(f"{k} {v:.3g}" for k, v in hp.items()))
    summary = {
        name: {
            "metrics": o.metrics,
            "train_seconds": o.train_seconds,
            "steps": o.steps,
            "fgd_hparams": o.fgd_hparams,
            "out": str(o.out),
        }
        for name, o in outcomes.items()
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return outcomes
