"""The `fgd` command: torch-free help, data, train -> eval -> export, errors, demo."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from fgd_cli.main import app

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()

TINY_MODEL = {"arch": "retinanet", "fpn_channels": 16, "min_size": 64, "max_size": 64}
TINY_TRAIN = {
    "batch_size": 4,
    "eval_batch_size": 4,
    "log_every": 1,
    "schedule": {"iterations": 2, "warmup_iters": 1},
}


def invoke(*args: str, env: dict[str, str] | None = None):
    return runner.invoke(app, [str(a) for a in args], env=env)


def ok(result) -> str:
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result.output


def write_spec(path: Path, spec: dict) -> Path:
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.fixture(scope="module")
def shapes_data(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("data") / "shapes"
    return {
        "shapes": {
            "root": str(root),
            "num_train": 8,
            "num_val": 4,
            "image_size": 64,
            "max_size": 32,
        }
    }


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory, shapes_data) -> Path:
    """`fgd train teacher` on a tiny spec, once for the module."""
    tmp = tmp_path_factory.mktemp("teacher")
    spec = write_spec(
        tmp / "teacher.yaml",
        {
            "kind": "teacher",
            "data": shapes_data,
            "model": {**TINY_MODEL, "backbone": "resnet34"},
            "train": TINY_TRAIN,
        },
    )
    out = tmp / "run"
    output = ok(invoke("train", "teacher", spec, "--out", out))
    assert "AP50" in output and "outputs in" in output
    return out


# --- help and laziness ----------------------------------------------------------------------------


def test_import_and_help_are_torch_free_and_fast():
    code = (
        "import sys, time; t = time.perf_counter()\n"
        "import fgd_cli.main\n"
        "assert 'torch' not in sys.modules and 'fgd_core' not in sys.modules\n"
        "sys.argv = ['fgd', '--help']\n"
        "try:\n    fgd_cli.main.app()\nexcept SystemExit as e:\n    assert e.code == 0, e.code\n"
        "bad = [m for m in ('torch', 'torchvision', 'fgd_core', 'pydantic', 'ray', 'mlflow')"
        " if m in sys.modules]\n"
        "assert not bad, bad\n"
        "print('elapsed', time.perf_counter() - t)\n"
    )
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert "train" in proc.stdout and "demo" in proc.stdout
    assert time.perf_counter() - t0 < 10  # generous for a loaded CI box; ~0.2 s locally


def test_subcommand_help():
    for args in (["train", "--help"], ["train", "distill", "--help"], ["eval", "--help"]):
        assert "Usage" in ok(invoke(*args))


# --- data -------------------------------------------------------------------------------------------


def test_data_shapes(tmp_path):
    out = tmp_path / "shapes"
    args = ["data", "shapes", "--out", out, "--num-train", 6, "--num-val", 4, "--size", 48]
    output = ok(invoke(*args, "--num-classes", 3, "--seed", 2))
    assert str(out / "annotations" / "instances_train.json") in output
    ann = json.loads((out / "annotations" / "instances_val.json").read_text())
    assert len(ann["images"]) == 4 and len(ann["categories"]) == 3
    assert len(list((out / "train").glob("*.png"))) == 6
    # Same config again: reused; another config on the same folder: a clear error.
    ok(invoke(*args, "--num-classes", 3, "--seed", 2))
    result = invoke(*args, "--num-classes", 3, "--seed", 3)
    assert result.exit_code == 1 and "different config" in result.output


# --- train, eval, export ------------------------------------------------------------------------


def test_train_teacher_writes_the_run_files(teacher_run):
    for name in ("checkpoint.pt", "model.pt", "metrics.json", "detections_val.json", "spec.yaml"):
        assert (teacher_run / name).is_file(), name
    record = json.loads((teacher_run / "metrics.json").read_text())
    assert record["kind"] == "teacher" and record["steps"] == 2
    assert 0.0 <= record["metrics"]["bbox_AP"] <= 1.0
    assert isinstance(json.loads((teacher_run / "detections_val.json").read_text()), list)
    from workers.spec import load_spec

    assert load_spec(teacher_run / "spec.yaml").kind == "teacher"


def test_eval_checkpoint_and_plain_weights(teacher_run, shapes_data, tmp_path):
    data_root = shapes_data["shapes"]["root"]
    metrics_file = tmp_path / "m.json"
    out = ok(
        invoke("eval", teacher_run / "checkpoint.pt", "--data", data_root, "--json", metrics_file)
    )
    assert "AP50" in out
    from_ckpt = json.loads(metrics_file.read_text())
    # The run's own final evaluation saw the same model on the same images.
    record = json.loads((teacher_run / "metrics.json").read_text())
    assert from_ckpt["bbox_AP"] == pytest.approx(record["metrics"]["bbox_AP"], abs=1e-6)
    ok(invoke("eval", teacher_run / "checkpoint.pt"))  # --data defaults to the run's data

    # A plain state dict needs the architecture: from a spec, or from options.
    ok(invoke("eval", teacher_run / "model.pt", "--data", teacher_run / "spec.yaml"))
    result = invoke("eval", teacher_run / "model.pt", "--data", data_root)
    assert result.exit_code == 1 and "--arch and --backbone" in result.output
    args = ["--arch", "retinanet", "--backbone", "resnet34", "--fpn-channels", 16]
    ok(
        invoke(
            "eval",
            teacher_run / "model.pt",
            "--data",
            data_root,
            *args,
            "--min-size",
            64,
            "--max-size",
            64,
        )
    )
    # The wrong architecture is a clear error, not a random model.
    result = invoke(
        "eval",
        teacher_run / "model.pt",
        "--data",
        data_root,
        "--arch",
        "retinanet",
        "--backbone",
        "resnet18",
    )
    assert result.exit_code == 1 and "does not fit" in result.output


def test_export_loads_strictly_into_a_fresh_model(teacher_run, tmp_path):
    import torch

    from fgd_core.detectors import build_detector_from_config, load_weights
    from fgd_core.training.checkpoint import job_from_dict, load_checkpoint

    out = tmp_path / "teacher_export.pt"
    assert "wrote" in ok(invoke("export", teacher_run / "checkpoint.pt", "--out", out))
    exported = torch.load(out, weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in exported.values())
    config = job_from_dict(load_checkpoint(teacher_run / "checkpoint.pt")["job"]).model
    model = build_detector_from_config(config)
    assert set(load_weights(model, out, strict=True)) == set(model.state_dict())
    trained = torch.load(teacher_run / "model.pt", weights_only=True)
    assert trained.keys() == exported.keys()
    assert all(torch.equal(trained[k], exported[k]) for k in trained)


def test_distill_from_checkpoint_then_export_student_alone(teacher_run, shapes_data, tmp_path):
    import torch

    from fgd_core.detectors import DetectorConfig, build_detector_from_config, load_weights

    spec = write_spec(
        tmp_path / "distill.yaml",
        {
            "kind": "distill",
            "data": shapes_data,
            "model": {**TINY_MODEL, "backbone": "resnet18"},
            "teacher": {
                "checkpoint": str(teacher_run / "model.pt"),
                "model": {**TINY_MODEL, "backbone": "resnet34"},
            },
            "fgd": {"calibrate_ratio": 1.0, "temp": 2.0, "lambda": 1e-5},
            "train": TINY_TRAIN,
        },
    )
    out = tmp_path / "run"
    output = ok(invoke("train", "distill", spec, "--out", out))
    assert "teacher" in output and "FGD hyperparameters" in output
    record = json.loads((out / "metrics.json").read_text())
    assert record["teacher_metrics"] is not None and set(record["fgd_hparams"]) == {
        "alpha",
        "beta",
        "gamma",
        "lambda",
        "temp",
    }
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert "fgd" in ckpt  # the FGD modules are in the checkpoint (for resume) ...
    ok(invoke("export", out / "checkpoint.pt", "--out", tmp_path / "student.pt"))
    exported = torch.load(tmp_path / "student.pt", weights_only=True)
    assert not any(k.startswith(("fgd", "teacher")) for k in exported)  # ... not in the export
    student = build_detector_from_config(
        DetectorConfig(num_classes=4, backbone="resnet18", **TINY_MODEL)
    )
    load_weights(student, tmp_path / "student.pt", strict=True)

    # Resuming from the finished checkpoint runs no more steps and reports the same run.
    ok(invoke("train", "distill", spec, "--out", out, "--resume", out / "checkpoint.pt"))
    # A teacher checkpoint cannot resume this job (it has no teacher phase).
    result = invoke(
        "train", "distill", spec, "--out", tmp_path / "x", "--resume", teacher_run / "checkpoint.pt"
    )
    assert result.exit_code == 1 and "teacher checkpoint" in result.output


def test_distill_trains_its_teacher_first_and_a_baseline(shapes_data, tmp_path):
    spec = write_spec(
        tmp_path / "distill.yaml",
        {
            "kind": "distill",
            "baseline": True,
            "data": shapes_data,
            "model": {**TINY_MODEL, "backbone": "resnet18"},
            "teacher": {
                "train": True,
                "model": {**TINY_MODEL, "backbone": "resnet18"},
                "training": {**TINY_TRAIN, "schedule": {"iterations": 1, "warmup_iters": 0}},
            },
            "fgd": {"calibrate_ratio": 1.0, "inherit": True},
            "train": TINY_TRAIN,
            "evaluate_teacher": False,
        },
    )
    out = tmp_path / "run"
    output = ok(invoke("train", "distill", spec, "--out", out))
    assert "baseline" in output
    teacher = json.loads((out / "teacher" / "metrics.json").read_text())
    assert teacher["kind"] == "teacher" and teacher["steps"] == 1
    assert json.loads((out / "baseline" / "metrics.json").read_text())["kind"] == "baseline"
    assert json.loads((out / "metrics.json").read_text())["kind"] == "distill"
    # A second run reuses the finished teacher.
    again = ok(invoke("train", "distill", spec, "--out", out))
    assert "teacher: reusing the completed run" in again


# --- user errors: a message naming the field, exit 1, no traceback ---------------------------


def test_bad_spec_names_the_field(tmp_path):
    spec = write_spec(
        tmp_path / "bad.yaml", {"kind": "teacher", "train": {"schedule": {"iterations": 0}}}
    )
    result = invoke("train", "teacher", spec)
    assert result.exit_code == 1
    assert "train.schedule.iterations: Input should be greater than or equal to 1" in result.output
    assert "bad.yaml" in result.output and "Traceback" not in result.output


def test_bad_spec_in_a_subprocess_has_no_traceback(tmp_path):
    spec = tmp_path / "bad.json"
    spec.write_text(json.dumps({"kind": "distill", "fgd": {"temp": 0}}))
    proc = subprocess.run(
        [sys.executable, "-m", "fgd_cli.main", "train", "distill", str(spec)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 1
    assert "fgd.temp: Input should be greater than 0" in proc.stderr
    assert "teacher: a distill job needs a teacher" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


def test_wrong_kind_and_unsupported_teacher_source(tmp_path):
    spec = write_spec(tmp_path / "t.yaml", {"kind": "teacher"})
    result = invoke("train", "distill", spec)
    assert result.exit_code == 1 and "kind is 'teacher'; run it with `fgd train teacher`" in (
        result.output
    )
    mlflow = write_spec(
        tmp_path / "m.yaml", {"kind": "distill", "teacher": {"mlflow_uri": "models:/t/1"}}
    )
    result = invoke("train", "distill", mlflow)
    assert result.exit_code == 1 and "teacher.mlflow_uri: not supported from the CLI" in (
        result.output
    )


def test_missing_files_are_clear_errors(tmp_path):
    result = invoke("train", "teacher", tmp_path / "nope.yaml")
    assert result.exit_code == 1 and "nope.yaml: cannot read" in result.output
    result = invoke("eval", tmp_path / "nope.pt")
    assert result.exit_code == 1 and "does not exist" in result.output
    result = invoke("export", tmp_path / "nope.pt", "--out", tmp_path / "x.pt")
    assert result.exit_code == 1 and "does not exist" in result.output
    coco = {
        "train_images": str(tmp_path),
        "train_ann": str(tmp_path / "missing.json"),
        "val_images": str(tmp_path),
        "val_ann": str(tmp_path / "missing.json"),
    }
    spec = write_spec(tmp_path / "c.yaml", {"kind": "teacher", "data": {"coco": coco}})
    result = invoke("train", "teacher", spec)
    assert result.exit_code == 1 and "data.coco.train_ann:" in result.output
    assert "missing.json does not exist" in result.output


# --- demo -----------------------------------------------------------------------------------------


def test_demo_quick(tmp_path):
    out = tmp_path / "demo"
    output = ok(
        invoke("demo", "--local", "--quick", "--out", out, env={"FGD_HOME": str(tmp_path / "home")})
    )
    assert "student + FGD" in output and "train time" in output
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) == {"teacher", "baseline", "distill"}
    from workers.spec import load_spec

    specs = {name: load_spec(out / f"{name}.yaml") for name in summary}
    assert specs["distill"].teacher.checkpoint == str((out / "teacher" / "model.pt").resolve())
    assert specs["distill"].fgd.calibrate_ratio == 1.0
    assert (tmp_path / "home" / "data").is_dir()  # shapes data generated under FGD_HOME


def test_sweep_example_is_a_valid_spec_with_a_sweep():
    import yaml
    from typer.testing import CliRunner

    from fgd_cli.main import app
    from workers.spec import JobSpec

    result = CliRunner().invoke(app, ["sweep", "--example"])
    assert result.exit_code == 0, result.output
    spec = JobSpec.model_validate(yaml.safe_load(result.output))
    assert spec.sweep is not None and spec.sweep.scheduler == "asha"
    assert spec.teacher is not None and spec.teacher.train


def test_token_create_prints_a_token_the_store_accepts(tmp_path):
    from typer.testing import CliRunner

    from fgd_cli.main import app
    from service.auth import verify_token
    from service.db import Store

    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    result = CliRunner().invoke(app, ["token", "create", "alice", "--database-url", url])
    assert result.exit_code == 0, result.output
    token = result.output.strip()
    store = Store.from_url(url)
    try:
        with store.session() as session:
            row = verify_token(session, token)
            assert row is not None and row.name == "alice" and not row.admin
            assert verify_token(session, token + "x") is None
    finally:
        store.dispose()
