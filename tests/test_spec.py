"""Job spec (workers/spec.py) and its conversion to fgd_core configs (workers/convert.py)."""

from __future__ import annotations

import json
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from workers.spec import (
    DataSpec,
    DetectorSpec,
    FGDSpec,
    JobSpec,
    ScheduleSpec,
    ShapesSpec,
    SpecError,
    TeacherSpec,
    TrainSpec,
    dump_spec,
    format_validation_error,
    load_spec,
    parse_spec,
)

ROOT = Path(__file__).resolve().parents[1]
TINY_SHAPES = {"num_train": 8, "num_val": 4, "image_size": 64, "max_size": 32}


def _error(data: dict) -> str:
    with pytest.raises(SpecError) as info:
        parse_spec(data, source="job.yaml")
    return str(info.value)


# --- the models -------------------------------------------------------------------------------


def test_import_keeps_torch_out():
    code = (
        "import sys, workers.spec, workers.spec as s; s.JobSpec(kind='teacher'); "
        "bad = [m for m in ('torch', 'torchvision', 'fgd_core', 'ray', 'mlflow') "
        "if m in sys.modules]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_defaults_validate_and_mirror_fgd_core():
    from fgd_core.data import ShapesConfig
    from fgd_core.training import FGDConfig, OptimConfig, ScheduleConfig, TrainConfig
    from workers.convert import fgd_config, train_config

    spec = JobSpec(kind="teacher")
    assert spec.data.shapes == ShapesSpec() and spec.data.coco is None
    assert spec.teacher is None and spec.model.num_classes is None
    # Every default equals the dataclass default, so an empty section means the same thing.
    assert train_config(TrainSpec()) == TrainConfig()
    assert train_config(TrainSpec()).optim == OptimConfig()
    assert train_config(TrainSpec()).schedule == ScheduleConfig()
    assert fgd_config(FGDSpec()) == FGDConfig()
    assert ShapesConfig(**ShapesSpec().generator_config()) == ShapesConfig()
    JobSpec(kind="baseline")
    JobSpec(kind="distill", teacher=TeacherSpec(train=True))


def test_detector_defaults_and_literals_match_fgd_core():
    from fgd_core.detectors import ARCHITECTURES, BACKBONES, NORM_LAYERS, DetectorConfig
    from fgd_core.detectors.factory import RETINANET_BOX_LOSSES
    from workers.convert import detector_config

    fields = DetectorSpec.model_fields
    assert set(typing.get_args(fields["arch"].annotation)) == set(ARCHITECTURES)
    assert set(typing.get_args(fields["backbone"].annotation)) == set(BACKBONES)
    assert set(typing.get_args(fields["norm"].annotation)) == set(NORM_LAYERS)
    assert set(typing.get_args(fields["retinanet_box_loss"].annotation)) == set(
        RETINANET_BOX_LOSSES
    )
    spec = DetectorSpec()
    expected = DetectorConfig(arch=spec.arch, backbone=spec.backbone, num_classes=3)
    assert detector_config(spec, 3) == expected
    assert detector_config(DetectorSpec(num_classes=5), 3).num_classes == 5
    cfg = detector_config(DetectorSpec(min_size=[96, 128], anchor_sizes=[[8, 10]] * 5), 3)
    assert cfg.min_size == (96, 128) and cfg.anchor_sizes == ((8.0, 10.0),) * 5


def test_every_config_field_has_a_spec_field():
    from dataclasses import fields

    from fgd_core.data import ShapesConfig
    from fgd_core.detectors import DetectorConfig
    from fgd_core.training import DataConfig, FGDConfig, OptimConfig, ScheduleConfig, TrainConfig
    from workers.spec import CocoSpec, OptimSpec

    def names(cls):
        return {f.name for f in fields(cls)}

    assert names(ShapesConfig) == set(ShapesSpec.model_fields) - {"root"}
    assert names(DetectorConfig) - {"detector_kwargs"} == set(DetectorSpec.model_fields)
    assert names(FGDConfig) == set(FGDSpec.model_fields)
    assert names(OptimConfig) == set(OptimSpec.model_fields)
    assert names(ScheduleConfig) == set(ScheduleSpec.model_fields)
    assert names(TrainConfig) == set(TrainSpec.model_fields)
    assert names(DataConfig) - {"hflip_prob", "with_masks"} == set(CocoSpec.model_fields)


def test_lambda_alias_in_and_out():
    assert FGDSpec.model_validate({"lambda": 2e-6}).lambda_ == 2e-6
    assert FGDSpec(lambda_=3e-6).lambda_ == 3e-6  # by name, from Python
    dumped = FGDSpec(lambda_=3e-6).model_dump()
    assert dumped["lambda"] == 3e-6 and "lambda_" not in dumped
    assert json.loads(FGDSpec().model_dump_json())["lambda"] == 5e-6
    assert FGDSpec().hparams == {
        "alpha": 1e-3,
        "beta": 5e-4,
        "gamma": 5e-4,
        "lambda": 5e-6,
        "temp": 0.5,
    }
    schema = JobSpec.model_json_schema()
    assert "lambda" in schema["$defs"]["FGDSpec"]["properties"]


@pytest.mark.parametrize("suffix", [".yaml", ".yml", ".json"])
def test_round_trip_files(tmp_path, suffix):
    spec = parse_spec(
        {
            "kind": "distill",
            "data": {
                "coco": {"train_images": "a", "train_ann": "b", "val_images": "c", "val_ann": "d"}
            },
            "model": {"backbone": "resnet18", "min_size": [96, 128], "num_classes": 3},
            "teacher": {"mlflow_uri": "models:/teacher/2", "model": {"backbone": "resnet34"}},
            "fgd": {"lambda": 1e-5, "levels": ["P3", "P4"], "calibrate_ratio": 1.0},
            "train": {"clip_grad_norm": None, "schedule": {"iterations": 10, "warmup_iters": 0}},
            "baseline": True,
        }
    )
    path = dump_spec(spec, tmp_path / f"job{suffix}")
    text = path.read_text()
    assert "lambda:" in text or '"lambda"' in text
    assert "lambda_" not in text
    again = load_spec(path)
    assert again == spec
    assert again.train.clip_grad_norm is None  # null survives (not replaced by the default)


def test_data_defaults_to_shapes_and_root_hash(tmp_path, monkeypatch):
    monkeypatch.setenv("FGD_HOME", str(tmp_path / "home"))
    data = DataSpec()
    assert data.source == "shapes"
    root = data.shapes.resolved_root()
    assert root.parent == tmp_path / "home" / "data"
    assert root.name == f"shapes-{data.shapes.config_hash()}"
    other = ShapesSpec(seed=1)
    assert other.config_hash() != data.shapes.config_hash()
    assert ShapesSpec(root="/x").config_hash() == data.shapes.config_hash()
    assert ShapesSpec(root=str(tmp_path / "d")).resolved_root() == tmp_path / "d"


# --- errors name the field ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "data, expected",
    [
        (
            {"kind": "teacher", "train": {"schedule": {"iterations": 0}}},
            "job.yaml: train.schedule.iterations: Input should be greater than or equal to 1",
        ),
        ({"kind": "teacher", "fgd": {"temp": 0}}, "fgd.temp: Input should be greater than 0"),
        ({"kind": "teacher", "fgd": {"alpha": -1}}, "fgd.alpha: Input should be greater"),
        ({"kind": "distill"}, "job.yaml: teacher: a distill job needs a teacher"),
        ({"kind": "teacher", "teacher": {"train": True}}, "teacher: only distill jobs"),
        ({"kind": "baseline", "baseline": True}, "baseline: baseline: true is only for distill"),
        ({"kind": "teacher", "epochs": 3}, "epochs: Extra inputs are not permitted"),
        ({"kind": "teacher", "model": {"arch": "yolo"}}, "model.arch: Input should be"),
        ({"kind": "teacher", "model": {"backbone": "vgg"}}, "model.backbone: Input should be"),
        ({"kind": "teacher", "model": {"min_size": [0]}}, "model.min_size[0]: Input should be"),
        (
            {"kind": "teacher", "train": {"schedule": {"iterations": 10}}},
            "train.schedule: warmup_iters (50) must be < iterations (10)",
        ),
        ({"kind": "teacher", "train": {"batch_size": 0}}, "train.batch_size: Input should be"),
        ({"kind": "teacher", "train": {"device": "gpu"}}, "train.device: device must be"),
        ({"kind": "bogus"}, "kind: Input should be 'teacher', 'baseline' or 'distill'"),
        ({}, "kind: Field required"),
        (
            {
                "kind": "teacher",
                "data": {
                    "shapes": {},
                    "coco": {
                        "train_images": "a",
                        "train_ann": "b",
                        "val_images": "c",
                        "val_ann": "d",
                    },
                },
            },
            "data: give exactly one of 'shapes' or 'coco', not both",
        ),
        (
            {"kind": "teacher", "data": {"coco": {"train_images": "a"}}},
            "data.coco.train_ann: Field",
        ),
        ({"kind": "teacher", "data": {"shapes": {"max_size": 200}}}, "data.shapes: max_size"),
        (
            {"kind": "distill", "teacher": {"checkpoint": "t.pt", "train": True}},
            "teacher: give exactly one of checkpoint, mlflow_uri or train: true "
            "(got checkpoint, train)",
        ),
        ({"kind": "distill", "teacher": {}}, "teacher: give exactly one of"),
        (
            {"kind": "distill", "teacher": {"mlflow_uri": "s3://x"}},
            "teacher.mlflow_uri: mlflow_uri",
        ),
        (
            {"kind": "distill", "teacher": {"checkpoint": "t.pt", "training": {}}},
            "teacher: training (the teacher's schedule) needs train: true",
        ),
        ({"kind": "teacher", "fgd": {"levels": ["P3", "X"]}}, "fgd.levels: levels must be"),
    ],
)
def test_errors_name_the_field(data, expected):
    assert expected in _error(data)


@pytest.mark.parametrize(
    "uri",
    [
        "runs:/0a1b2c3d4e/teacher/state_dict.pt",
        "models:/shapes-teacher/3",
        "models:/shapes-teacher@champion",
        "models:/m-0123abcd",
    ],
)
def test_mlflow_uri_shapes(uri):
    assert TeacherSpec(mlflow_uri=uri).source == "mlflow_uri"


def test_format_validation_error_lists_every_error():
    with pytest.raises(ValidationError) as info:
        JobSpec.model_validate({"kind": "teacher", "fgd": {"temp": -1, "beta": -1}})
    text = format_validation_error(info.value)
    assert text.splitlines() == [
        "fgd.beta: Input should be greater than or equal to 0",
        "fgd.temp: Input should be greater than 0",
    ]


def test_load_spec_file_errors(tmp_path):
    bad = tmp_path / "job.yaml"
    bad.write_text("kind: teacher\ntrain:\n  schedule:\n    iterations: 0\n")
    with pytest.raises(SpecError, match=r"job\.yaml: train\.schedule\.iterations: Input"):
        load_spec(bad)
    broken = tmp_path / "broken.json"
    broken.write_text("{kind")
    with pytest.raises(SpecError, match=r"broken\.json: not valid JSON"):
        load_spec(broken)
    with pytest.raises(SpecError, match="unknown spec format"):
        load_spec(tmp_path / "job.toml")
    with pytest.raises(SpecError, match="cannot read"):
        load_spec(tmp_path / "missing.yaml")
    listing = tmp_path / "list.yaml"
    listing.write_text(yaml.safe_dump([1, 2]))
    with pytest.raises(SpecError, match="must be a mapping"):
        load_spec(listing)


def test_teacher_and_baseline_jobs_derive_from_a_distill_job():
    spec = JobSpec(
        kind="distill",
        model=DetectorSpec(backbone="resnet18"),
        teacher=TeacherSpec(
            train=True,
            model=DetectorSpec(backbone="resnet34"),
            training=TrainSpec(schedule=ScheduleSpec(iterations=100, warmup_iters=0)),
        ),
        baseline=True,
    )
    teacher = spec.teacher_job()
    assert teacher.kind == "teacher" and teacher.model.backbone == "resnet34"
    assert teacher.train.schedule.iterations == 100 and teacher.data == spec.data
    baseline = spec.baseline_job()
    assert baseline.kind == "baseline" and baseline.model == spec.model
    assert baseline.train == spec.train


# --- conversion -------------------------------------------------------------------------------------


def test_convert_generates_shapes_and_fills_num_classes(tmp_path, monkeypatch):
    from fgd_core.training import JobConfig
    from workers.convert import job_config

    monkeypatch.setenv("FGD_HOME", str(tmp_path / "home"))
    spec = parse_spec(
        {
            "kind": "teacher",
            "data": {"shapes": {**TINY_SHAPES, "num_classes": 3}, "hflip_prob": 0.25},
            "model": {"backbone": "resnet18", "fpn_channels": 16, "min_size": 64},
            "fgd": {"lambda": 1e-5},
        }
    )
    job = job_config(spec)
    assert isinstance(job, JobConfig)
    root = spec.data.shapes.resolved_root()
    assert root.is_relative_to(tmp_path / "home")
    assert Path(job.data.train_ann) == root / "annotations" / "instances_train.json"
    assert Path(job.data.val_images).is_dir() and job.data.hflip_prob == 0.25
    assert job.model.num_classes == 3 and job.fgd.lambda_ == 1e-5
    assert job.teacher is None and job.teacher_weights is None
    assert job_config(spec) == job  # the second call finds the data already there


def test_convert_coco_reads_categories_and_names_missing_paths(tmp_path):
    from workers.convert import job_config

    (tmp_path / "images").mkdir()
    ann = tmp_path / "train.json"
    cats = [{"id": i, "name": f"c{i}"} for i in (1, 5, 9)]
    ann.write_text(json.dumps({"images": [], "annotations": [], "categories": cats}))
    coco = {
        "train_images": str(tmp_path / "images"),
        "train_ann": str(ann),
        "val_images": str(tmp_path / "images"),
        "val_ann": str(ann),
    }
    job = job_config(parse_spec({"kind": "baseline", "data": {"coco": coco}}))
    assert job.model.num_classes == 3

    missing = dict(coco, val_ann=str(tmp_path / "nope" / "val.json"))
    with pytest.raises(SpecError, match=r"data\.coco\.val_ann: .*nope/val\.json does not exist"):
        job_config(parse_spec({"kind": "baseline", "data": {"coco": missing}}))
    wrong = dict(coco, train_images=str(ann))
    with pytest.raises(SpecError, match=r"data\.coco\.train_images: .* is not a folder"):
        job_config(parse_spec({"kind": "baseline", "data": {"coco": wrong}}))
    with pytest.raises(SpecError, match=r"model\.num_classes: 7 does not match .* 3 categories"):
        job_config(
            parse_spec({"kind": "baseline", "data": {"coco": coco}, "model": {"num_classes": 7}})
        )


def test_convert_distill_teacher_weights(tmp_path):
    from workers.convert import job_config

    (tmp_path / "images").mkdir()
    ann = tmp_path / "train.json"
    ann.write_text(json.dumps({"categories": [{"id": 1, "name": "a"}]}))
    data = {
        "coco": {
            "train_images": str(tmp_path / "images"),
            "train_ann": str(ann),
            "val_images": str(tmp_path / "images"),
            "val_ann": str(ann),
        }
    }
    weights = tmp_path / "teacher.pt"
    spec = parse_spec(
        {
            "kind": "distill",
            "data": data,
            "teacher": {"checkpoint": str(weights), "model": {"backbone": "resnet34"}},
        }
    )
    with pytest.raises(SpecError, match=r"teacher\.checkpoint: .*teacher\.pt does not exist"):
        job_config(spec)
    weights.write_bytes(b"")
    job = job_config(spec)
    assert job.teacher_weights == str(weights) and job.teacher.backbone == "resnet34"
    assert job.teacher.num_classes == 1

    trained = parse_spec({"kind": "distill", "data": data, "teacher": {"train": True}})
    with pytest.raises(SpecError, match=r"teacher\.train: .* resolved to a local file"):
        job_config(trained)
    assert job_config(trained, teacher_weights=str(weights)).teacher_weights == str(weights)
