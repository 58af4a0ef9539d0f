"""One training job end to end: data, models, teacher check, training, evaluation.

`run_job` is what the CLI and the Ray trainable both call; it returns values and reports
through callbacks, and never writes files.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fgd_core.data import CocoDetection, build_eval_loader, build_train_loader
from fgd_core.detectors import build_detector_from_config, load_weights
from fgd_core.distill import DetectorModule, Distiller, fpn_channels
from fgd_core.evaluation import evaluate
from fgd_core.losses import calibrate
from fgd_core.teacher_cache import TeacherFeatureCache, cache_key, cache_root, file_digest
from fgd_core.training.checkpoint import rng_state, set_rng_state
from fgd_core.training.config import JobConfig
from fgd_core.training.loop import Callbacks, autocast, autocast_dtype, train_loop

__all__ = ["Callbacks", "JobResult", "resolve_device", "run_job"]


@dataclass
class JobResult:
    metrics: dict[str, float]  # final COCO metrics of the trained network (bbox_AP, ...)
    history: list[tuple[int, dict[str, float]]]  # (step, metrics) of every evaluation
    detections: list[dict[str, Any]]  # COCO results of the final evaluation
    teacher_metrics: dict[str, float] | None  # distill: the teacher on val before training
    model_state: dict[str, Tensor]  # plain state dict of the trained network (student alone)
    steps: int  # steps completed
    train_seconds: float  # wall time of the training steps
    fgd_hparams: dict[str, float] | None  # distill: weights and temp in force at the end
    stopped_early: bool = False


def resolve_device(name: str) -> torch.device:
    """ "auto" is CUDA when available, else CPU; anything else as torch reads it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _iou_types(job: JobConfig) -> tuple[str, ...]:
    return ("bbox", "segm") if job.model.arch == "maskrcnn" else ("bbox",)


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)


def _calibrate_on_first_batch(distiller: Distiller, loader: Any, job: JobConfig) -> None:
    """Scale the FGD weights (and propose a temperature) on the first training batch.

    Runs the student once without gradients, under training's autocast; its BatchNorm buffers
    and the random state are restored afterwards, so the run itself is identical to one without
    calibration.
    """
    cfg = distiller.config
    device = resolve_device(job.train.device)
    amp_context, _ = autocast(device, job.train)
    images, targets = next(iter(loader))
    images = [img.to(device) for img in images]
    targets = [
        {k: v.to(device) if isinstance(v, Tensor) else v for k, v in t.items()} for t in targets
    ]
    buffers = {k: v.clone() for k, v in distiller.student.state_dict().items()}
    rng = rng_state()
    distiller.train(True)
    try:
        with torch.no_grad(), amp_context:
            batch = distiller.features(images, targets)
            detection = float(sum(float(v) for v in batch.detection.values()))
            result = calibrate(
                distiller.fgd,
                batch.student,
                batch.teacher,
                batch.boxes,
                batch.input_hw,
                detection,
                ratio=float(cfg.calibrate_ratio or 1.0),
                base_weights=cfg.hparams,
                temp=None if cfg.calibrate_temp else cfg.temp,
                image_sizes=batch.image_sizes,
            )
    finally:
        distiller.student.load_state_dict(buffers)
        set_rng_state(rng)
    distiller.fgd.set_hparams(**result.hparams)


def open_teacher_cache(job: JobConfig, distiller: Distiller) -> TeacherFeatureCache:
    """The teacher feature cache of this job's teacher, input transform, levels and data."""
    assert job.teacher is not None and job.teacher_weights is not None
    transform: Any = distiller.student.transform
    key = cache_key(
        {
            "teacher_weights": file_digest(job.teacher_weights),
            "teacher": dataclasses.asdict(job.teacher),
            "transform": {
                "min_size": list(transform.min_size),
                "max_size": transform.max_size,
                "image_mean": list(transform.image_mean),
                "image_std": list(transform.image_std),
                "size_divisible": transform.size_divisible,
            },
            "levels": list(distiller.levels.items()),
            # Features computed under autocast are rounded to its dtype.
            "autocast": str(autocast_dtype(resolve_device(job.train.device), job.train)),
            "train_images": str(Path(job.data.train_images).resolve()),
            "train_ann": file_digest(job.data.train_ann),
        }
    )
    channels = [fpn_channels(distiller.teacher)] * len(distiller.levels)
    return TeacherFeatureCache(cache_root() / key, channels)


def run_job(
    job: JobConfig,
    *,
    callbacks: Callbacks | None = None,
    resume: dict[str, Any] | None = None,
) -> JobResult:
    """Train the job's network (teacher, baseline student or FGD student) and evaluate it.

    Args:
        job: the whole configuration.
        callbacks: metrics, evaluations, checkpoints and progress go there.
        resume: a checkpoint state written by an earlier run of the same job.
    """
    cb = callbacks or Callbacks()
    device = resolve_device(job.train.device)
    train_set = CocoDetection(
        job.data.train_images,
        job.data.train_ann,
        train=True,
        hflip_prob=job.data.hflip_prob,
        with_masks=job.data.with_masks,
        seed=job.train.seed,
    )
    val_set = CocoDetection(
        job.data.val_images, job.data.val_ann, train=False, with_masks=job.data.with_masks
    )
    for role, cfg in (("model", job.model), ("teacher", job.teacher)):
        if cfg is not None and cfg.num_classes != train_set.num_classes:
            raise ValueError(
                f"{role}.num_classes is {cfg.num_classes} but the dataset has "
                f"{train_set.num_classes} categories"
            )
    loader = build_train_loader(
        train_set,
        batch_size=job.train.batch_size,
        seed=job.train.seed,
        num_workers=job.train.num_workers,
    )
    val_loader = build_eval_loader(
        val_set, batch_size=job.train.eval_batch_size, num_workers=job.train.num_workers
    )
    coco_gt = val_set.coco_gt()
    iou_types = _iou_types(job)

    # The student is built first from the seed, so a baseline and an FGD student of the same
    # seed start from identical weights; the random stream of training is reseeded afterwards.
    _seed_everything(job.train.seed)
    model = build_detector_from_config(job.model)
    module: nn.Module
    teacher_metrics = None
    if job.kind == "distill":
        assert job.teacher is not None and job.teacher_weights is not None
        teacher = build_detector_from_config(job.teacher)
        load_weights(teacher, job.teacher_weights, strict=True)
        module = Distiller(model, teacher, job.fgd)
        if job.fgd.teacher_cache:
            module.teacher_cache = open_teacher_cache(job, module)
    else:
        module = DetectorModule(model)
    module.to(device)
    _seed_everything(job.train.seed + 1)

    if isinstance(module, Distiller) and job.evaluate_teacher and resume is None:
        teacher_metrics, _ = evaluate(
            module.teacher,
            val_loader,
            coco_gt,
            val_set.label_to_cat_id,
            device=device,
            iou_types=("bbox",),
            max_batches=job.train.eval_max_batches,
        )
        if cb.on_teacher_evaluation:
            cb.on_teacher_evaluation(teacher_metrics)
        _seed_everything(job.train.seed + 1)
    if isinstance(module, Distiller) and job.fgd.calibrate_ratio is not None and resume is None:
        _calibrate_on_first_batch(module, loader, job)

    last_detections: list[dict[str, Any]] = []

    def run_eval(step: int) -> dict[str, float]:
        nonlocal last_detections
        metrics, last_detections = evaluate(
            model,
            val_loader,
            coco_gt,
            val_set.label_to_cat_id,
            device=device,
            iou_types=iou_types,
            max_batches=job.train.eval_max_batches,
        )
        return metrics

    def extra_state() -> dict[str, Any]:
        out: dict[str, Any] = {"job": job.to_dict()}
        if isinstance(module, Distiller):
            out["fgd_hparams"] = module.fgd.hparams
        return out

    if resume is not None and isinstance(module, Distiller) and "fgd_hparams" in resume:
        module.fgd.set_hparams(**resume["fgd_hparams"])
    if isinstance(module, Distiller) and module.teacher_cache is not None:
        cache = module.teacher_cache
        cb_metrics = cb.on_metrics

        def on_metrics(step: int, metrics: dict[str, float]) -> None:
            stats = cache.stats
            seen = stats.hits + stats.misses
            metrics = {**metrics, "teacher_cache_hit_rate": stats.hits / seen if seen else 0.0}
            if cb_metrics:
                cb_metrics(step, metrics)

        cb = dataclasses.replace(cb, on_metrics=on_metrics)
    loop = train_loop(
        module,
        loader,
        job.train,
        device=device,
        callbacks=cb,
        evaluate=run_eval,
        resume=resume,
        extra_state=extra_state,
    )
    final = loop.history[-1][1] if loop.history else run_eval(loop.steps)
    return JobResult(
        metrics=final,
        history=loop.history,
        detections=last_detections,
        teacher_metrics=teacher_metrics,
        model_state={k: v.detach().cpu() for k, v in model.state_dict().items()},
        steps=loop.steps,
        train_seconds=loop.train_seconds,
        fgd_hparams=module.fgd.hparams if isinstance(module, Distiller) else None,
        stopped_early=loop.stopped_early,
    )


def module_parameters(module: nn.Module) -> Sequence[nn.Parameter]:
    """Parameters the optimizer gets for `module` (for inspection and tests)."""
    return list(module.trainable_parameters())  # type: ignore[operator]
