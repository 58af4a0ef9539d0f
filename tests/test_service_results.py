"""Trials, leaderboards and comparisons read from MLflow: a fake client, then a real server."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from test_service_support import Api, fake_run, job_body, settings_for, spec

from service import crud
from service.auth import create_token
from service.db import Store
from service.main import create_app
from service.models import Job, JobState
from service.results import ResultsReader

pytest_plugins = ["test_service_support"]  # the store / api fixtures

SWEEP = {"space": {"alpha": {"loguniform": [1e-5, 1e-3]}}, "metric": "bbox_AP", "num_samples": 3}


def _job_with_run(api: Api, parent: str, state: JobState = JobState.SUCCEEDED, **body: Any) -> str:
    job_id = api.post("/jobs", json=job_body(spec=spec(sweep=SWEEP), **body)).json()["id"]
    with api.store.session() as session:
        job = session.get(Job, job_id)
        assert job is not None
        crud.update_progress(
            session=session, job=job, mlflow_experiment_id="1", mlflow_run_id=parent
        )
        if state == JobState.QUEUED:
            return job_id
        crud.mark_dispatched(session=session, job=job, submission_id="s")
        if state == JobState.RUNNING:
            crud.mark_running(session=session, job=job)
        else:
            crud.mark_finished(session=session, job=job, state=state)
    return job_id


def test_trials_results_and_compare_from_a_fake_client(api: Api) -> None:
    api.results.runs += [
        fake_run("p1", "a", 0.30),
        fake_run("p1", "b", None, "FAILED"),
        fake_run("p1", "c", 0.41),
    ]
    api.results.runs += [fake_run("p2", "d", 0.25)]
    empty = api.submit().json()["id"]
    assert api.get(f"/jobs/{empty}/trials").json() == []
    assert api.get(f"/jobs/{empty}/results").status_code == 404
    running = _job_with_run(api, "p1", JobState.RUNNING, name="running")
    assert len(api.get(f"/jobs/{running}/trials").json()) == 3
    r = api.get(f"/jobs/{running}/results")
    assert r.status_code == 404 and "RUNNING" in r.json()["detail"]
    done = _job_with_run(api, "p1", name="done")
    trials = api.get(f"/jobs/{done}/trials").json()
    assert [t["run_id"] for t in trials] == ["a", "b", "c"]
    assert trials[0]["params"] == {"alpha": "1e-4"} and trials[1]["status"] == "FAILED"
    board = api.get(f"/jobs/{done}/results").json()
    assert board["metric"] == "bbox_AP" and board["mode"] == "max"
    assert board["report"] is None  # no baseline trained alongside
    assert [(row["rank"], row["trial"]["run_id"]) for row in board["rows"]] == [
        (1, "c"),
        (2, "a"),
        (None, "b"),
    ]
    job = api.get(f"/jobs/{done}").json()
    assert job["mlflow"]["run_url"] == "http://mlflow.test:5000/#/experiments/1/runs/p1"
    other = _job_with_run(api, "p2", name="other")
    cmp = api.get("/compare", params=[("job", done), ("job", other)]).json()["jobs"]
    assert [(e["job_id"], e["best"]["value"], e["trials"]) for e in cmp] == [
        (done, 0.41, 3),
        (other, 0.25, 1),
    ]
    bobs = _job_with_run(api, "p2", name="bobs", state=JobState.QUEUED)
    assert api.get("/compare", params=[("job", done), ("job", bobs)], who="bob").status_code == 404
    assert api.get("/compare").status_code == 422


def test_mlflow_unreachable_is_503(api: Api) -> None:
    def broken(uri: str) -> Any:
        raise ConnectionError("refused")

    api.client.app.state.results = ResultsReader(  # type: ignore[attr-defined]
        tracking_uri="http://127.0.0.1:1", client_factory=broken
    )
    job_id = _job_with_run(api, "p1")
    r = api.get(f"/jobs/{job_id}/trials")
    assert r.status_code == 503


@pytest.mark.slow
def test_trials_and_results_from_a_real_mlflow_server(tmp_path: Path) -> None:
    from workers.distill_report import distillation_report, log_distillation_report
    from workers.tracking import (
        create_parent_run,
        finish_run,
        get_or_create_experiment,
        log_metrics,
        make_client,
        open_trial_run,
    )
    from workers.tracking_server import start_server

    server = start_server(
        f"sqlite:///{tmp_path / 'mlflow.db'}",
        tmp_path / "artifacts",
        log_path=tmp_path / "server.log",
        port=0,
    )
    try:
        client = make_client(server.uri)
        exp = get_or_create_experiment(client, "service-test")
        parent = create_parent_run(client, exp, name="sweep", params={"kind": "distill"})
        for key, ap in (("t0", 0.2), ("t1", 0.5), ("t2", 0.35)):
            run = open_trial_run(client, exp, parent, key, name=key, params={"alpha": ap / 100})
            log_metrics(client, run, {"bbox_AP": ap / 2}, step=1)
            log_metrics(client, run, {"bbox_AP": ap}, step=2)
            finish_run(client, run)
        rows = [
            {"kind": "baseline", "train.seed": 0, "bbox_AP": 0.25},
            {"kind": "distill", "train.seed": 0, "bbox_AP": 0.5, "mlflow_run_id": "r"},
        ]
        report = distillation_report(rows, teacher=0.55, group_keys=["train.seed"])
        assert report is not None
        log_distillation_report(client, parent, report)
        finish_run(client, parent)

        data = tmp_path / "data"
        data.mkdir()
        store = Store.from_url(f"sqlite:///{tmp_path / 'jobs.db'}")
        app = create_app(
            settings_for(str(store.engine.url), data),
            store=store,
            results=ResultsReader(tracking_uri=server.uri),
        )
        with TestClient(app) as http:
            with store.session() as session:
                plain, _ = create_token(session, "alice")
            headers = {"Authorization": f"Bearer {plain}"}
            job_id = http.post("/jobs", json=job_body(spec=spec(sweep=SWEEP)), headers=headers)
            job_id = job_id.json()["id"]
            with store.session() as session:
                job = session.get(Job, job_id)
                assert job is not None
                crud.update_progress(
                    session=session, job=job, mlflow_experiment_id=exp, mlflow_run_id=parent
                )
                crud.mark_dispatched(session=session, job=job, submission_id="s")
                crud.mark_finished(session=session, job=job, state=JobState.SUCCEEDED)
            trials = http.get(f"/jobs/{job_id}/trials", headers=headers).json()
            assert [t["trial_key"] for t in trials] == ["t0", "t1", "t2"]
            assert trials[1]["metrics"]["bbox_AP"] == pytest.approx(0.5)
            assert trials[1]["params"]["alpha"] == "0.005" and trials[1]["status"] == "FINISHED"
            board = http.get(f"/jobs/{job_id}/results", headers=headers).json()
            assert [r["trial"]["trial_key"] for r in board["rows"]] == ["t1", "t2", "t0"]
            assert [r["rank"] for r in board["rows"]] == [1, 2, 3]
            shown = board["report"]
            assert shown["teacher"] == pytest.approx(0.55)
            assert shown["gap_closed"] == pytest.approx(0.25 / 0.30)
            assert shown["pairs"][0]["group"] == {"train.seed": 0}
            links = http.get(f"/jobs/{job_id}", headers=headers).json()["mlflow"]
            assert links["run_url"] == f"{server.uri}/#/experiments/{exp}/runs/{parent}"
    finally:
        server.stop()
