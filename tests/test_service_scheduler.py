"""The dispatch pass against the in-process dispatcher: order, limits, retries, cancel, logs."""

from __future__ import annotations

from test_service_support import Api, fake_run, job_body, spec

from service import crud
from service.dispatch import DispatchState, InProcessDispatcher, submission_id
from service.models import Job
from service.scheduler import dispatch_once

pytest_plugins = ["test_service_support"]  # the store / api fixtures


def _pass(api: Api, max_concurrent: int = 2, **kw: object):  # type: ignore[no-untyped-def]
    return dispatch_once(
        store=api.store, dispatcher=api.dispatcher, max_concurrent=max_concurrent, **kw
    )


def _state(api: Api, job_id: str) -> str:
    return api.get(f"/jobs/{job_id}").json()["state"]


def test_submits_by_priority_within_the_limit_then_follows_ray(api: Api) -> None:
    low = api.submit(name="low", priority=0).json()["id"]
    high = api.submit(name="high", priority=7).json()["id"]
    mid = api.submit(name="mid", priority=3).json()["id"]
    report = _pass(api)
    assert report.submitted == [high, mid] and _state(api, low) == "QUEUED"
    sid = submission_id(high, 1)
    assert api.dispatcher.submitted[sid].spec["kind"] == "distill"
    assert api.dispatcher.submitted[sid].resources == {"CPU": 1.0, "GPU": 0.0}

    api.dispatcher.set_status(sid, DispatchState.RUNNING)
    api.dispatcher.add_logs(sid, "epoch 1\n")
    _pass(api)
    assert _state(api, high) == "RUNNING" and api.get(f"/jobs/{high}").json()["started_at"]
    api.dispatcher.add_logs(sid, "epoch 2\n")
    api.dispatcher.set_status(sid, DispatchState.SUCCEEDED)
    report = _pass(api)
    assert report.finished == [high] and report.submitted == [low]
    assert _state(api, high) == "SUCCEEDED"
    assert api.get(f"/jobs/{high}/logs").text == "epoch 1\nepoch 2\n"


def test_failed_attempt_is_retried_then_fails(api: Api) -> None:
    job_id = api.submit(max_attempts=2).json()["id"]
    _pass(api)
    api.dispatcher.set_status(submission_id(job_id, 1), DispatchState.FAILED, "CUDA OOM")
    report = _pass(api)  # requeued, and resubmitted in the same pass as attempt 2
    assert report.requeued == [job_id] and report.submitted == [job_id]
    api.dispatcher.set_status(submission_id(job_id, 2), DispatchState.FAILED, "CUDA OOM again")
    _pass(api)
    job = api.get(f"/jobs/{job_id}").json()
    assert job["state"] == "FAILED" and job["attempt"] == 2
    assert [f["reason"] for f in job["failures"]] == ["CUDA OOM", "CUDA OOM again"]


def test_cancel_of_a_running_job_ends_cancelled(api: Api) -> None:
    job_id = api.submit().json()["id"]
    _pass(api)
    api.dispatcher.set_status(submission_id(job_id, 1), DispatchState.RUNNING)
    _pass(api)
    assert api.post(f"/jobs/{job_id}/cancel").json()["state"] == "CANCELLING"
    _pass(api)  # the in-process dispatcher reports STOPPED after stop()
    assert _state(api, job_id) == "CANCELLED"


def test_jobs_wait_when_the_cluster_cannot_fit_them(api: Api) -> None:
    api.dispatcher.capacity = {"CPU": 4.0, "GPU": 0.0}
    sweep = {"space": {"alpha": {"uniform": [0.0, 1.0]}}, "resources": {"cpu": 1, "gpu": 1}}
    big = api.post("/jobs", json=job_body(spec=spec(sweep=sweep))).json()["id"]
    small = api.submit().json()["id"]
    report = _pass(api)
    assert report.waiting_for_resources == [big] and report.submitted == [small]


def test_progress_is_refreshed_from_mlflow(api: Api) -> None:
    api.results.runs += [
        fake_run("p", "a", 0.3),
        fake_run("p", "b", 0.5),
        fake_run("p", "c", None, "RUNNING"),
    ]
    job_id = api.submit().json()["id"]
    _pass(api)
    with api.store.session() as session:
        job = session.get(Job, job_id)
        assert job is not None
        crud.update_progress(session=session, job=job, mlflow_experiment_id="1", mlflow_run_id="p")
    _pass(api, results=api.results)
    job = api.get(f"/jobs/{job_id}").json()
    assert job["progress"]["trials_done"] == 2 and job["progress"]["trials_running"] == 1
    assert job["best_metric"] == {"name": "bbox_AP", "value": 0.5, "mode": "max", "run_id": "b"}


def test_in_process_dispatcher_is_a_dispatcher() -> None:
    from service.dispatch import Dispatcher

    assert isinstance(InProcessDispatcher(), Dispatcher)
