"""`fgd eval` and `fgd export`: use a trained network outside the training run."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fgd_cli.console import CliError, console, print_metrics
from workers.spec import load_spec

if TYPE_CHECKING:
    from fgd_core.detectors import DetectorConfig
    from fgd_core.training import DataConfig

SPEC_SUFFIXES = (".yaml", ".yml", ".json")


def _read_weights_file(path: Path) -> dict[str, Any]:
    import torch

    if not path.is_file():
        raise CliError(f"{path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling fails in many ways
        raise CliError(f"{path}: cannot be read as torch weights: {exc}") from exc
    if not isinstance(obj, dict):
        raise CliError(f"{path}: not a checkpoint or a state dict")
    return obj


def _data_from_dir(root: Path, split: str) -> DataConfig:
    """A dataset root in the shapes layout: <split>/ and annotations/instances_<split>.json."""
    from fgd_core.training import DataConfig

    images, ann = root / split, root / "annotations" / f"instances_{split}.json"
    for path, ok in ((images, images.is_dir()), (ann, ann.is_file())):
        if not ok:
            raise CliError(
                f"--data {root}: {path} is missing (expected {split}/ and "
                f"annotations/instances_{split}.json, or a job spec file)"
            )
    train_ann = root / "annotations" / "instances_train.json"
    return DataConfig(
        train_images=str(root / "train"),
        train_ann=str(train_ann if train_ann.is_file() else ann),
        val_images=str(images),
        val_ann=str(ann),
    )


def evaluate_checkpoint(
    checkpoint: Path,
    *,
    data: Path | None,
    split: str = "val",
    overrides: dict[str, Any],
    device: str = "auto",
    batch_size: int = 8,
    max_batches: int | None = None,
    detections_out: Path | None = None,
    metrics_out: Path | None = None,
) -> dict[str, float]:
    """COCO metrics of the network in `checkpoint` on `data`'s `split`; prints a table.

    The architecture comes from the checkpoint's job (training checkpoints), else from the
    spec given as `data`, else from `overrides` (arch, backbone, ...), which also override the
    other two sources field by field.
    """
    from fgd_core.data import CocoDetection, build_eval_loader
    from fgd_core.detectors import DetectorConfig, build_detector_from_config, load_weights
    from fgd_core.evaluation import evaluate
    from fgd_core.training.checkpoint import job_from_dict
    from fgd_core.training.jobs import resolve_device
    from workers.convert import dataset_num_classes, detector_config, resolve_data

    state = _read_weights_file(checkpoint)
    det: DetectorConfig | None = None
    data_cfg: DataConfig | None = None
    if isinstance(state.get("job"), dict):
        job = job_from_dict(state["job"])
        det, data_cfg = job.model, job.data
    if data is not None and data.suffix.lower() in SPEC_SUFFIXES:
        spec = load_spec(data)
        data_cfg = resolve_data(spec.data)
        if det is None:
            det = detector_config(spec.model, dataset_num_classes(spec.data, data_cfg))
    elif data is not None:
        data_cfg = _data_from_dir(data.expanduser().resolve(), "val")
    if data_cfg is None:
        raise CliError(f"{checkpoint} holds no job configuration; give --data")
    if split == "train":
        data_cfg = dataclasses.replace(
            data_cfg, val_images=data_cfg.train_images, val_ann=data_cfg.train_ann
        )
    dataset = CocoDetection(data_cfg.val_images, data_cfg.val_ann, train=False)
    given = {k: v for k, v in overrides.items() if v is not None}
    if det is None:
        missing = [k for k in ("arch", "backbone") if k not in given]
        if missing:
            raise CliError(
                f"{checkpoint} is a plain state dict: give the architecture with "
                f"{' and '.join('--' + k for k in missing)} (or --data SPEC with a model section)"
            )
        det = DetectorConfig(**{"num_classes": dataset.num_classes, **given})
    elif given:
        det = dataclasses.replace(det, **given)
    if det.num_classes != dataset.num_classes:
        raise CliError(
            f"the model has {det.num_classes} classes but {data_cfg.val_ann} has "
            f"{dataset.num_classes} categories"
        )
    model = build_detector_from_config(det)
    load_weights(model, checkpoint, strict=True)
    torch_device = resolve_device(device)
    model.to(torch_device)
    loader = build_eval_loader(dataset, batch_size=batch_size)
    iou_types = ("bbox", "segm") if det.arch == "maskrcnn" and data_cfg.with_masks else ("bbox",)
    with console.status(f"evaluating {det.arch} {det.backbone} on {len(dataset)} images"):
        metrics, detections = evaluate(
            model,
            loader,
            dataset.coco_gt(),
            dataset.label_to_cat_id,
            device=torch_device,
            iou_types=iou_types,
            max_batches=max_batches,
        )
    print_metrics(metrics, title=f"{checkpoint}, {split} ({len(dataset)} images)")
    if detections_out is not None:
        detections_out.write_text(json.dumps(detections))
    if metrics_out is not None:
        metrics_out.write_text(json.dumps(metrics, indent=1))
    return metrics


def export_checkpoint(checkpoint: Path, out: Path) -> DetectorConfig:
    """Write the trained network of a training checkpoint as a plain torchvision state dict.

    The student alone: no FGD modules, no teacher, no optimizer. The state dict is loaded
    strictly into a freshly built model first, so the file always fits that architecture.
    """
    from fgd_core.detectors import build_detector_from_config, save_weights
    from fgd_core.training.checkpoint import job_from_dict, load_checkpoint

    try:
        state = load_checkpoint(checkpoint)
    except FileNotFoundError as exc:
        raise CliError(str(exc)) from None
    if not isinstance(state.get("job"), dict):
        raise CliError(f"{checkpoint} holds no job configuration; is it an fgd checkpoint?")
    det = job_from_dict(state["job"]).model
    model = build_detector_from_config(det)
    try:
        model.load_state_dict(state["model"], strict=True)
    except RuntimeError as exc:
        raise CliError(f"{checkpoint}: the weights do not fit {det.arch}: {exc}") from None
    save_weights(model, out)
    return det
