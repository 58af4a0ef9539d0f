"""Sweeps on real Ray and a real MLflow server: ASHA, retries from checkpoints, resume, nodes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from workers.spec import JobSpec

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _fresh_ray_auth_state():
    """Forget Ray auth tokens cached in this process by earlier tests (other clusters)."""
    import ray  # noqa: F401
    from ray._private.authentication_test_utils import reset_auth_token_state

    reset_auth_token_state()
    yield


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """FGD_HOME, a tiny dataset, a teacher file and a real MLflow server for this module."""
    from sweep_helpers import make_teacher

    from workers.tracking_server import start_server

    home = tmp_path_factory.mktemp("fgd_home")
    data = home / "data" / "shapes-tiny"
    teacher = make_teacher(data, home / "teacher.pt")
    server = start_server(
        f"sqlite:///{home / 'mlflow.db'}", str(home / "artifacts"), log_path=home / "mlflow.log"
    )
    yield {"home": home, "data": data, "teacher": teacher, "uri": server.uri}
    server.stop()


@pytest.fixture
def local_ray():
    """The runtime `fgd sweep` starts without RAY_ADDRESS, on 2 CPUs."""
    import ray

    from workers.sweep import start_local_ray

    start_local_ray(num_cpus=2, object_store_memory=150 * 1024**2)
    yield
    ray.shutdown()


def test_local_runtime_collects_no_metrics(local_ray):
    """The local runtime's GCS hands every node the system config without Ray's metrics."""
    import base64
    import json

    import psutil

    from workers.sweep import LOCAL_RAY_SYSTEM_CONFIG

    gcs = next(p for p in psutil.Process().children(recursive=True) if p.name() == "gcs_server")
    encoded = next(a for a in gcs.cmdline() if a.startswith("--config_list="))
    config = json.loads(base64.b64decode(encoded.split("=", 1)[1]))
    assert config["enable_metrics_collection"] is False and config["event_stats"] is False
    assert LOCAL_RAY_SYSTEM_CONFIG.items() <= config.items()


def _client(uri):
    from workers.tracking import make_client

    return make_client(uri)


def _children(uri, experiment_id, parent):
    from workers.tracking import list_trial_runs

    return list_trial_runs(_client(uri), experiment_id, parent)


def test_asha_sweep_stops_trials_early_and_logs_nested_runs(env, local_ray, tmp_path):
    from sweep_helpers import tiny_job

    from workers.sweep import run_sweep

    # Trials run in grid order, two at a time: the last two, with huge FGD weights, reach each
    # rung behind the first two and are the ones ASHA stops.
    sweep = {
        "space": {"alpha": {"grid": [1e-6, 1e-5, 10.0, 100.0]}},
        "scheduler": "asha",
        "asha": {"grace_period": 1, "reduction_factor": 2},
        "max_concurrent_trials": 2,
        "metric": "train/loss",
        "mode": "min",
    }
    spec = JobSpec.model_validate(tiny_job(env["data"], env["teacher"], sweep=sweep))
    result = run_sweep(spec, name="asha", tracking_uri=env["uri"], storage_path=str(tmp_path))
    assert len(result.rows) == 4
    steps = [r.metrics.get("step") for r in result.rows]
    assert min(steps) < 6 <= max(steps), steps  # at least one trial stopped early
    client = _client(env["uri"])
    for row in result.rows:  # a stopped trial is KILLED in MLflow, not FAILED
        assert row.run_status == ("FINISHED" if row.metrics["step"] == 6 else "KILLED"), row
        if row.run_status == "FINISHED":  # the final checkpoint, the weights, the COCO files
            files = {
                f.path
                for folder in ("checkpoint", "model", "coco")
                for f in client.list_artifacts(row.mlflow_run_id, folder)
            }
            assert {"checkpoint/state.pt", "model/state_dict.pt"} <= files, files
            assert "coco/metrics_val.json" in files, files
    runs = _children(env["uri"], result.experiment_id, result.parent_run_id)
    assert len(runs) == 4
    for run in runs:
        assert "alpha" in run.data.params and "beta" in run.data.params
        assert "train/loss" in run.data.metrics
    parent = _client(env["uri"]).get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED"
    artifacts = {a.path for a in _client(env["uri"]).list_artifacts(result.parent_run_id)}
    assert "plots" in artifacts and any(a.startswith("leaderboard") for a in artifacts)
    assert result.registered_model is not None


def test_trial_stopped_by_asha_at_its_last_report_is_finished(env, local_ray, tmp_path):
    """ASHA stops every trial that reaches a rung behind the others, the last report included:
    a trial stopped there has trained to the end, so it is FINISHED with its files."""
    from sweep_helpers import tiny_job

    from workers.sweep import run_sweep

    # One trial at a time, one rung (grace 4 = the 4th and last report): the first trial has
    # the rung to itself and goes on; the later ones, with a far larger FGD loss, are stopped.
    sweep = {
        "space": {"alpha": {"grid": [1e-6, 1.0, 2.0]}},
        "scheduler": "asha",
        "asha": {"grace_period": 4, "reduction_factor": 2},
        "max_concurrent_trials": 1,
        "metric": "train/loss",
        "mode": "min",
    }
    job = tiny_job(env["data"], env["teacher"], sweep=sweep, iterations=4, eval_every=1)
    result = run_sweep(
        JobSpec.model_validate(job),
        name="asha-last",
        tracking_uri=env["uri"],
        storage_path=str(tmp_path),
    )
    client = _client(env["uri"])
    assert [r.metrics["step"] for r in result.rows] == [4, 4, 4]
    for row in result.rows:
        assert row.run_status == "FINISHED", row
        files = {f.path for f in client.list_artifacts(row.mlflow_run_id, "model")}
        assert "model/state_dict.pt" in files, (row, files)
        assert row.metrics.get("bbox_AP") is not None


def _sweep_with_fault(env, tmp_path, at: str, name: str):
    """A one-trial sweep (one retry allowed) whose trial raises once at step ``at``; returns
    the result and the marker the fault left."""
    import ray
    from sweep_helpers import tiny_job

    from workers.sweep import run_sweep

    marker = tmp_path / "fault-fired"
    ray.init(
        num_cpus=2,
        object_store_memory=150 * 1024**2,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"FGD_FAULT_AT_STEP": at, "FGD_FAULT_MARKER": str(marker)}},
    )
    try:
        sweep = {"num_samples": 1, "max_failures": 1}
        spec = JobSpec.model_validate(tiny_job(env["data"], None, sweep=sweep))
        result = run_sweep(
            spec, name=name, tracking_uri=env["uri"], storage_path=str(tmp_path / "tune")
        )
    finally:
        ray.shutdown()
    return result, marker


def test_failed_trial_retries_from_its_checkpoint_in_one_run(env, tmp_path):
    result, marker = _sweep_with_fault(env, tmp_path, "3", "retry")
    assert marker.exists()  # the fault fired
    (row,) = result.rows
    assert row.status == "TERMINATED" and row.metrics["step"] == 6
    runs = _children(env["uri"], result.experiment_id, result.parent_run_id)
    assert len(runs) == 1  # the retry continued its own run
    history = _client(env["uri"]).get_metric_history(runs[0].info.run_id, "train/loss")
    steps = [m.step for m in history]
    assert steps.count(1) == 1 and steps.count(2) == 1  # no restart from step 1
    assert max(steps) == 6


def test_trial_failing_after_its_last_report_is_not_trained_again(env, tmp_path):
    """Tune's last checkpoint of a finished trial holds no weights, only its final report and
    where its final state lives in MLflow; a retry from it reports again without training."""
    import json

    result, marker = _sweep_with_fault(env, tmp_path, "end", "complete")
    storage = tmp_path / "tune"
    assert marker.exists()  # the trial failed after its last report
    (row,) = result.rows
    assert row.status == "TERMINATED" and row.metrics["step"] == 6
    assert row.run_status == "FINISHED"
    runs = _children(env["uri"], result.experiment_id, result.parent_run_id)
    assert len(runs) == 1
    history = _client(env["uri"]).get_metric_history(runs[0].info.run_id, "train/loss")
    assert sorted(m.step for m in history) == sorted({m.step for m in history})  # logged once
    last = max(storage.glob("complete/*/checkpoint_*"))
    assert sorted(p.name for p in last.iterdir()) == ["trial.json"]
    meta = json.loads((last / "trial.json").read_text())
    assert meta["complete"] and meta["report"]["step"] == 6
    assert meta["final_checkpoint"] == f"runs:/{row.mlflow_run_id}/checkpoint/state.pt"
    files = {f.path for f in _client(env["uri"]).list_artifacts(row.mlflow_run_id, "checkpoint")}
    assert files == {"checkpoint/state.pt"}


RAY = str(Path(sys.executable).parent / "ray")


def _ray_head(port: int) -> None:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    subprocess.run(
        [
            RAY,
            "start",
            "--head",
            f"--port={port}",
            "--num-cpus=2",
            "--include-dashboard=false",
            "--object-store-memory=150000000",
        ],
        check=True,
        env=env,
        capture_output=True,
    )


def test_sweep_resumes_after_its_driver_is_killed(env, tmp_path):
    from sweep_helpers import tiny_job

    port = 6391
    _ray_head(port)
    address = f"127.0.0.1:{port}"
    try:
        sweep = {
            "space": {"alpha": {"choice": [1e-5, 1e-4, 1e-3]}},
            "num_samples": 3,
            "max_concurrent_trials": 1,
        }
        spec_path = tmp_path / "spec.json"
        spec = JobSpec.model_validate(
            tiny_job(env["data"], env["teacher"], sweep=sweep, iterations=8)
        )
        spec_path.write_text(spec.model_dump_json(by_alias=True))
        storage = tmp_path / "tune"
        code = (
            "import sys; from workers.spec import load_spec; from workers.sweep import run_sweep\n"
            f"run_sweep(load_spec({str(spec_path)!r}), name='resume', tracking_uri={env['uri']!r},"
            f" storage_path={str(storage)!r}, ray_address={address!r},"
            " resume='--resume' in sys.argv)\n"
        )
        driver = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, start_new_session=True)
        deadline = time.time() + 240
        while time.time() < deadline and not list(storage.glob("resume/*/checkpoint_*")):
            time.sleep(1)
        assert list(storage.glob("resume/*/checkpoint_*")), "no checkpoint before the kill"
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
        done = subprocess.run([sys.executable, "-c", code, "--resume"], cwd=ROOT, timeout=600)
        assert done.returncode == 0
        from workers.sweep import SWEEP_TAG
        from workers.tracking import get_or_create_experiment

        client = _client(env["uri"])
        exp = get_or_create_experiment(client, "fgd")
        parents = client.search_runs([exp], filter_string=f"tags.`{SWEEP_TAG}` = 'resume'")
        assert len(parents) == 1  # the restored driver continued the same parent run
        assert parents[0].info.status == "FINISHED"
        runs = _children(env["uri"], exp, parents[0].info.run_id)
        assert len(runs) == 3
        assert all(r.info.status == "FINISHED" for r in runs)
    finally:
        subprocess.run([RAY, "stop", "--force"], capture_output=True)


def test_multi_node_cluster_places_trials_on_several_nodes(env, tmp_path):
    import ray
    from ray.cluster_utils import Cluster
    from sweep_helpers import tiny_job

    from workers.sweep import run_sweep

    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 0,
            "object_store_memory": 100 * 1024**2,
            "include_dashboard": False,
        },
    )
    for _ in range(2):
        cluster.add_node(num_cpus=1, object_store_memory=100 * 1024**2)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        sweep = {"space": {"temp": {"grid": [1.0, 2.0]}}, "max_concurrent_trials": 2}
        spec = JobSpec.model_validate(
            tiny_job(env["data"], env["teacher"], sweep=sweep, iterations=4)
        )
        result = run_sweep(
            spec, name="nodes", tracking_uri=env["uri"], storage_path=str(tmp_path / "tune")
        )
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert len({r.node_id for r in result.rows}) == 2  # one trial on each worker node
    runs = _children(env["uri"], result.experiment_id, result.parent_run_id)
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)


def test_a_distill_job_with_a_baseline_reports_both_students_side_by_side(env, local_ray, tmp_path):
    import json

    from sweep_helpers import tiny_job

    from workers.distill_report import REPORT_JSON
    from workers.tracking import download_run_artifact

    job = tiny_job(
        env["data"], env["teacher"], sweep={"grid": {"train.seed": [0, 1]}}, iterations=2
    )
    job.update(baseline=True, evaluate_teacher=True)
    spec = JobSpec.model_validate(job)
    result = run_sweep_named(spec, "with-baseline", env, tmp_path)
    kinds = sorted((r.config["kind"], r.config["train.seed"]) for r in result.rows)
    assert kinds == [("baseline", 0), ("baseline", 1), ("distill", 0), ("distill", 1)]
    assert result.best is not None and result.best.config["kind"] == "distill"
    report = result.report
    assert report is not None and len(report["pairs"]) == 2
    assert report["teacher"] is not None  # measured by the FGD trials before training
    by_kind = {
        (r.config["kind"], r.config["train.seed"]): r.metrics["bbox_AP"] for r in result.rows
    }
    assert (
        report["pairs"][0]["baseline"]
        == by_kind[("baseline", report["pairs"][0]["group"]["train.seed"])]
    )
    client = _client(env["uri"])
    logged = json.loads(
        download_run_artifact(
            f"runs:/{result.parent_run_id}/{REPORT_JSON}", client=client
        ).read_text()
    )
    assert logged["pairs"] == report["pairs"]
    assert "report_baseline_mean" in client.get_run(result.parent_run_id).data.metrics

    # With a search over FGD's weights the baseline gets its own sweep, paired all the same.
    job["sweep"] = {"space": {"alpha": {"choice": [1e-5, 1e-4]}}, "num_samples": 2}
    job["evaluate_teacher"] = False
    searched = run_sweep_named(JobSpec.model_validate(job), "searched", env, tmp_path)
    assert all("kind" not in r.config for r in searched.rows)
    assert searched.report is not None
    (pair,) = searched.report["pairs"]
    assert pair["fgd_trials"] == 2
    assert searched.report["teacher"] is None  # nobody evaluated the teacher here


def run_sweep_named(spec, name, env, tmp_path):
    from workers.sweep import run_sweep

    return run_sweep(spec, name=name, tracking_uri=env["uri"], storage_path=str(tmp_path))


def test_pbt_exploits_the_better_trial_and_logs_the_values_in_force(env, local_ray, tmp_path):
    from sweep_helpers import tiny_job

    from workers.sweep import run_sweep

    # Two trials; alpha 1e3 makes FGD's loss dwarf the other's, so PBT has the weaker trial
    # exploit the stronger one (its checkpoint and config, then perturbed) at every evaluation.
    sweep = {
        "space": {"alpha": {"choice": [1e-6, 1e3]}},
        "search": "grid",
        "scheduler": "pbt",
        "pbt": {"perturbation_interval": 1, "quantile_fraction": 0.5},
        "max_concurrent_trials": 2,
        "metric": "train/loss",
        "mode": "min",
    }
    spec = JobSpec.model_validate(tiny_job(env["data"], env["teacher"], sweep=sweep))
    result = run_sweep(spec, name="pbt", tracking_uri=env["uri"], storage_path=str(tmp_path))
    assert len(result.rows) == 2
    for row in result.rows:
        assert row.metrics["step"] == 6, row.metrics  # exploitation continues, never restarts
        # The value in force is the one PBT chose last, not the starting one.
        assert row.metrics["hp/alpha"] == pytest.approx(row.config["alpha"]), row

    policy = (tmp_path / "pbt" / "pbt_global.txt").read_text().strip().splitlines()
    assert policy, "PBT exploited no trial"
    runs = _children(env["uri"], result.experiment_id, result.parent_run_id)
    assert len(runs) == 2  # an exploiting trial keeps its own run
    client = _client(env["uri"])
    for run in runs:
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "hp/alpha")]
        assert steps and steps == sorted(steps)
