"""The efficacy benchmark end to end at its smoke scale: real Ray, a real MLflow server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    from workers.tracking_server import start_server

    home = tmp_path_factory.mktemp("efficacy_mlflow")
    server = start_server(
        f"sqlite:///{home / 'mlflow.db'}", str(home / "artifacts"), log_path=home / "mlflow.log"
    )
    yield server.uri
    server.stop()


def _run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "efficacy.py"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


@pytest.mark.timeout(1500)  # three runs of the benchmark, each about a minute on a quiet machine
def _teacher_downloads() -> set[Path]:
    """Teacher weights fetched by trials into the temp folder (theirs, or MLflow's default)."""
    tmp = Path(tempfile.gettempdir())
    return {*tmp.glob("fgd-teacher-*"), *tmp.glob("tmp*/state_dict.pt")}


def test_the_smoke_benchmark_writes_its_figures_and_reuses_the_teacher(mlflow_server, tmp_path):
    from workers.tracking import make_client

    env = {
        **os.environ,
        "FGD_HOME": str(tmp_path / "home"),
        "MLFLOW_TRACKING_URI": mlflow_server,
        "RAY_ADDRESS": "local",
    }
    out = tmp_path / "out"
    args = ["--scale", "smoke", "--seeds", "2", "--data-seed", "3", "--out", str(out)]
    downloads = _teacher_downloads()
    first = _run(args, env)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    result = json.loads((out / "efficacy.json").read_text())
    assert len(result["baseline_ap"]) == len(result["fgd_ap"]) == 2
    assert all(0.0 <= ap <= 1.0 for ap in [result["teacher_ap"], *result["baseline_ap"]])
    assert result["teacher_cached"] is False
    assert result["config"]["data_seed"] == 3
    assert result["config"]["students_job"]["data"]["shapes"]["seed"] == 3
    assert set(result["coco"]) == {"teacher", "baseline", "fgd"}
    assert "bbox_AP50" in result["coco"]["fgd"][0]
    assert [s for s, _ in result["history"]["distill"][0]] == [2, 4]  # eval_every 2 of 4 steps
    for name in ("efficacy.md", "ap_by_model.png", "ap_vs_step.png", "efficacy_job.yaml"):
        assert (out / name).stat().st_size > 0

    client = make_client(mlflow_server)
    parent = result["mlflow"]["parent_run_id"]
    logged = {a.path for a in client.list_artifacts(parent, "efficacy")}
    assert "efficacy/efficacy.json" in logged and "efficacy/ap_vs_step.png" in logged
    children = client.search_runs(
        [result["mlflow"]["experiment_id"]],
        filter_string=f"tags.`mlflow.parentRunId` = '{parent}'",
    )
    assert sorted(r.data.params["kind"] for r in children) == [
        "baseline",
        "baseline",
        "distill",
        "distill",
    ]
    assert {a.path for a in client.list_artifacts(parent, "report")} >= {"report/distillation.json"}
    # The FGD students share the teacher's features through the feature cache: one folder,
    # at most one entry per (training image, flip), and the hit rate logged with the losses.
    (features,) = (tmp_path / "home" / "cache" / "teacher-features").iterdir()
    assert 0 < len(list(features.glob("*.npy"))) <= 2 * 24
    distilled = [r for r in children if r.data.params["kind"] == "distill"]
    assert all("train/teacher_cache_hit_rate" in r.data.metrics for r in distilled)
    # Each FGD trial fetched the teacher from MLflow into a folder of its own, gone with it.
    assert _teacher_downloads() == downloads

    # The same data seed and configuration again: the teacher comes from the cache.
    again = _run([*args[:-1], str(tmp_path / "again")], env)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert json.loads((tmp_path / "again" / "efficacy.json").read_text())["teacher_cached"]

    # The sweep example: ASHA over the five hyperparameters against the default weights.
    search = _run([*args, "--search", "2"], env)
    assert search.returncode == 0, search.stdout[-3000:] + search.stderr[-3000:]
    found = json.loads((out / "search.json").read_text())
    assert found["trials"] == 2 and found["default_fgd_ap_seed0"] == result["fgd_ap"][0]
    assert set(found["space"]["space"]) == {"alpha", "beta", "gamma", "lambda", "temp"}
    plots = {a.path for a in client.list_artifacts(found["mlflow"]["parent_run_id"], "plots")}
    assert "plots/metric_vs_params.png" in plots

    # The self-contained job the benchmark writes is a valid spec with its teacher trained first.
    from workers.spec import load_spec

    job = load_spec(out / "efficacy_job.yaml")
    assert job.teacher is not None and job.teacher.train
    assert job.sweep is not None and job.sweep.grid["kind"] == ["distill", "baseline"]


def test_teacher_iterations_change_the_teacher_job_and_its_cache_key():
    import efficacy

    default = efficacy.parse_args(["--scale", "cpu"])
    longer = efficacy.parse_args(["--scale", "cpu", "--teacher-iterations", "1200"])
    jobs = [efficacy.teacher_job(efficacy.scale_of(a), 4) for a in (default, longer)]
    assert [j.train.schedule.iterations for j in jobs] == [1000, 1200]
    assert efficacy.teacher_key(jobs[0]) != efficacy.teacher_key(jobs[1])
    assert efficacy.scale_of(longer).student_train == efficacy.scale_of(default).student_train
    with pytest.raises(SystemExit):
        efficacy.parse_args(["--teacher-iterations", "0"])
