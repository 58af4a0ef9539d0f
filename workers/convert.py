"""Job spec -> fgd_core configuration: the one place a spec becomes frozen dataclasses.

One function per conversion: `resolve_data` (DataSpec -> DataConfig, generating shapes data on
demand), `detector_config`, `fgd_config`, `train_config` and `job_config` (the whole job).
"""

from __future__ import annotations

import json
from pathlib import Path

from fgd_core.data import DatasetError, ShapesConfig, generate_shapes
from fgd_core.detectors import DetectorConfig
from fgd_core.training import (
    DataConfig,
    FGDConfig,
    JobConfig,
    OptimConfig,
    ScheduleConfig,
    TrainConfig,
)
from workers.spec import DataSpec, DetectorSpec, FGDSpec, JobSpec, SpecError, TrainSpec

__all__ = [
    "dataset_num_classes",
    "detector_config",
    "fgd_config",
    "job_config",
    "resolve_data",
    "train_config",
]


def resolve_data(spec: DataSpec) -> DataConfig:
    """Where the job's data is; shapes data is generated (once) when missing.

    Raises:
        SpecError: a COCO path does not exist (the message names the field and the path), or
            the shapes root holds something else.
    """
    if spec.shapes is not None:
        root = spec.shapes.resolved_root()
        try:
            ds = generate_shapes(root, ShapesConfig(**spec.shapes.generator_config()))
        except (DatasetError, ValueError) as exc:
            raise SpecError(f"data.shapes: {exc}") from exc
        paths = (ds.train_images, ds.train_ann, ds.val_images, ds.val_ann)
    else:
        assert spec.coco is not None
        coco = spec.coco
        checks = (
            ("train_images", coco.train_images, Path.is_dir, "folder"),
            ("train_ann", coco.train_ann, Path.is_file, "file"),
            ("val_images", coco.val_images, Path.is_dir, "folder"),
            ("val_ann", coco.val_ann, Path.is_file, "file"),
        )
        resolved = []
        for name, value, ok, what in checks:
            path = Path(value).expanduser().resolve()
            if not ok(path):
                state = "is not a " + what if path.exists() else "does not exist"
                raise SpecError(f"data.coco.{name}: {path} {state}")
            resolved.append(path)
        paths = tuple(resolved)  # type: ignore[assignment]
    train_images, train_ann, val_images, val_ann = (str(p) for p in paths)
    return DataConfig(
        train_images=train_images,
        train_ann=train_ann,
        val_images=val_images,
        val_ann=val_ann,
        hflip_prob=spec.hflip_prob,
        with_masks=spec.with_masks,
    )


def dataset_num_classes(spec: DataSpec, data: DataConfig) -> int:
    """Foreground classes of the dataset: shapes' num_classes, else the train JSON's categories."""
    if spec.shapes is not None:
        return spec.shapes.num_classes
    try:
        with open(data.train_ann) as f:
            categories = json.load(f).get("categories")
    except (OSError, ValueError, AttributeError) as exc:
        raise SpecError(f"data.coco.train_ann: cannot read {data.train_ann}: {exc}") from exc
    if not isinstance(categories, list) or not categories:
        raise SpecError(f"data.coco.train_ann: {data.train_ann} lists no categories")
    return len(categories)


def detector_config(spec: DetectorSpec, num_classes: int) -> DetectorConfig:
    """DetectorConfig of `spec`; `num_classes` is used where the spec leaves it None."""
    return DetectorConfig(
        arch=spec.arch,
        backbone=spec.backbone,
        num_classes=spec.num_classes if spec.num_classes is not None else num_classes,
        fpn_channels=spec.fpn_channels,
        min_size=tuple(spec.min_size) if isinstance(spec.min_size, list) else spec.min_size,
        max_size=spec.max_size,
        anchor_sizes=(
            tuple(tuple(level) for level in spec.anchor_sizes)
            if spec.anchor_sizes is not None
            else None
        ),
        aspect_ratios=tuple(spec.aspect_ratios),
        trainable_backbone_layers=spec.trainable_backbone_layers,
        norm=spec.norm,
        retinanet_box_loss=spec.retinanet_box_loss,
        box_head_dim=spec.box_head_dim,
        mask_head_channels=spec.mask_head_channels,
        score_thresh=spec.score_thresh,
        detections_per_img=spec.detections_per_img,
        image_mean=spec.image_mean,
        image_std=spec.image_std,
    )


def fgd_config(spec: FGDSpec) -> FGDConfig:
    """FGDConfig of `spec` (``lambda`` -> ``lambda_``)."""
    return FGDConfig(
        alpha=spec.alpha,
        beta=spec.beta,
        gamma=spec.gamma,
        lambda_=spec.lambda_,
        temp=spec.temp,
        levels=tuple(spec.levels) if spec.levels is not None else None,
        box_frame=spec.box_frame,
        inherit=spec.inherit,
        calibrate_ratio=spec.calibrate_ratio,
        calibrate_temp=spec.calibrate_temp,
        compile=spec.compile,
        teacher_cache=spec.teacher_cache,
    )


def train_config(spec: TrainSpec) -> TrainConfig:
    """TrainConfig of `spec`, with its OptimConfig and ScheduleConfig."""
    o, s = spec.optim, spec.schedule
    return TrainConfig(
        batch_size=spec.batch_size,
        world_size=spec.world_size,
        optim=OptimConfig(
            name=o.name,
            lr=o.lr,
            base_lr=o.base_lr,
            base_batch_size=o.base_batch_size,
            momentum=o.momentum,
            weight_decay=o.weight_decay,
        ),
        schedule=ScheduleConfig(
            iterations=s.iterations,
            warmup_iters=s.warmup_iters,
            warmup_factor=s.warmup_factor,
            policy=s.policy,
            milestones=tuple(s.milestones),
            step_gamma=s.step_gamma,
            min_lr_factor=s.min_lr_factor,
        ),
        clip_grad_norm=spec.clip_grad_norm,
        amp=spec.amp,
        cpu_bf16=spec.cpu_bf16,
        seed=spec.seed,
        eval_every=spec.eval_every,
        checkpoint_every=spec.checkpoint_every,
        log_every=spec.log_every,
        eval_max_batches=spec.eval_max_batches,
        eval_batch_size=spec.eval_batch_size,
        num_workers=spec.num_workers,
        device=spec.device,
    )


def job_config(spec: JobSpec, *, teacher_weights: str | None = None) -> JobConfig:
    """The JobConfig of `spec`; resolves the data (generating shapes data when missing).

    Args:
        teacher_weights: distill jobs: local file of the teacher's weights; default the spec's
            ``teacher.checkpoint``. Needed for ``teacher.mlflow_uri`` and ``teacher.train``
            (their resolution is the caller's: download, or train the teacher first).

    Raises:
        SpecError: missing data or teacher weights, or num_classes not matching the dataset.
    """
    data = resolve_data(spec.data)
    classes = dataset_num_classes(spec.data, data)
    models = [("model", spec.model)]
    if spec.teacher is not None:
        models.append(("teacher.model", spec.teacher.model))
    for where, det in models:
        if det.num_classes is not None and det.num_classes != classes:
            raise SpecError(
                f"{where}.num_classes: {det.num_classes} does not match the dataset's "
                f"{classes} categories (leave it null to take the dataset's)"
            )
    teacher = None
    if spec.kind == "distill":
        assert spec.teacher is not None
        teacher = detector_config(spec.teacher.model, classes)
        where = "teacher weights"
        if teacher_weights is None:
            if spec.teacher.checkpoint is None:
                raise SpecError(
                    f"teacher.{spec.teacher.source}: the teacher's weights must be resolved to a "
                    "local file first (pass teacher_weights)"
                )
            teacher_weights, where = spec.teacher.checkpoint, "teacher.checkpoint"
        path = Path(teacher_weights).expanduser().resolve()
        if not path.is_file():
            raise SpecError(f"{where}: {path} does not exist")
        teacher_weights = str(path)
    return JobConfig(
        kind=spec.kind,
        data=data,
        model=detector_config(spec.model, classes),
        train=train_config(spec.train),
        teacher=teacher,
        teacher_weights=teacher_weights if spec.kind == "distill" else None,
        fgd=fgd_config(spec.fgd),
        evaluate_teacher=spec.evaluate_teacher,
    )
