"""Restart safety and the app's dispatch loop, against the in-process dispatcher (fast).

The same paths on a real Ray head are in ``test_service_ray.py``.
"""

from __future__ import annotations

import time

from fastapi.testclient import TestClient
from test_service_support import Api, job_body, settings_for, spec

from service.auth import create_token
from service.dispatch import DispatchState, InProcessDispatcher, submission_id
from service.loop import reconcile
from service.main import create_app
from service.scheduler import dispatch_once

pytest_plugins = ["test_service_support"]  # the store / api fixtures
D = DispatchState


def _state(api: Api, job_id: str) -> dict:  # type: ignore[type-arg]
    return dict(api.get(f"/jobs/{job_id}", who="admin").json())


def test_reconcile_requeues_the_unstarted_fails_the_lost_and_adopts_the_running(api: Api) -> None:
    jobs = {name: api.submit(name=name).json()["id"] for name in ("sent", "lost", "alive")}
    dispatch_once(store=api.store, dispatcher=api.dispatcher, max_concurrent=5)
    for name in ("lost", "alive"):
        api.dispatcher.set_status(submission_id(jobs[name], 1), D.RUNNING)
    dispatch_once(store=api.store, dispatcher=api.dispatcher, max_concurrent=5)
    cancelled = api.submit(who="bob", name="cancelled").json()["id"]
    dispatch_once(store=api.store, dispatcher=api.dispatcher, max_concurrent=5)
    api.post(f"/jobs/{cancelled}/cancel", who="bob")
    assert [_state(api, j)["state"] for j in jobs.values()] == ["DISPATCHED", "RUNNING", "RUNNING"]

    # The service restarts against a cluster that only still runs "alive".
    ray = InProcessDispatcher()
    alive = submission_id(jobs["alive"], 1)
    ray.submit(api.dispatcher.submitted[alive])
    ray.set_status(alive, D.RUNNING)
    report = reconcile(store=api.store, dispatcher=ray)
    assert report.requeued == [jobs["sent"]] and report.lost == [jobs["lost"]]
    assert report.adopted == [jobs["alive"]] and report.cancelled == [cancelled]

    sent = _state(api, jobs["sent"])
    assert sent["state"] == "QUEUED" and sent["attempt"] == 0 and sent["failures"] == []
    lost = _state(api, jobs["lost"])  # max_attempts 2: retried, the loss on record
    assert lost["state"] == "QUEUED" and lost["attempt"] == 1
    assert "no longer knows" in lost["failures"][0]["reason"]
    assert _state(api, jobs["alive"])["state"] == "RUNNING"
    assert _state(api, cancelled)["state"] == "CANCELLED"

    report = dispatch_once(store=api.store, dispatcher=ray, max_concurrent=5)
    assert sorted(report.submitted) == sorted([jobs["sent"], jobs["lost"]])
    assert submission_id(jobs["sent"], 1) in ray.submitted  # the same attempt, not a new one
    assert submission_id(jobs["lost"], 2) in ray.submitted


def test_a_lost_running_job_out_of_attempts_fails_with_the_reason(api: Api) -> None:
    job_id = api.submit(max_attempts=1).json()["id"]
    dispatch_once(store=api.store, dispatcher=api.dispatcher, max_concurrent=1)
    api.dispatcher.set_status(submission_id(job_id, 1), D.RUNNING)
    dispatch_once(store=api.store, dispatcher=api.dispatcher, max_concurrent=1)
    reconcile(store=api.store, dispatcher=InProcessDispatcher())
    job = _state(api, job_id)
    assert job["state"] == "FAILED" and "no longer knows" in job["error"]


def test_unfit_jobs_fail_at_once_when_asked(api: Api) -> None:
    api.dispatcher.capacity = {"CPU": 4.0, "GPU": 0.0}
    sweep = {"space": {"alpha": {"uniform": [0.0, 1.0]}}, "resources": {"cpu": 1, "gpu": 1}}
    big = api.post("/jobs", json=job_body(spec=spec(sweep=sweep))).json()["id"]
    report = dispatch_once(
        store=api.store, dispatcher=api.dispatcher, max_concurrent=2, fail_unfit=True
    )
    assert report.finished == [big] and not api.dispatcher.submitted
    job = _state(api, big)
    assert job["state"] == "FAILED" and "GPU 1" in job["error"]
    assert job["failures"][0]["reason"] == job["error"]


def test_the_app_runs_the_loop_while_it_runs(api: Api) -> None:
    dispatcher = InProcessDispatcher()
    settings = settings_for(str(api.store.engine.url), api.data_root, DISPATCH_INTERVAL=0.05)
    app = create_app(
        settings,
        store=api.store,
        dispatcher=dispatcher,
        results=api.results,
        migrate=False,
        dispatch_loop=True,
    )
    with api.store.session() as session:
        token, _ = create_token(session, "looper", quota=3)
    with TestClient(app) as client:
        headers = {"Authorization": f"Bearer {token}"}
        job_id = client.post("/jobs", json=job_body(name="looped"), headers=headers).json()["id"]
        sid = submission_id(job_id, 1)
        deadline = time.monotonic() + 10
        while sid not in dispatcher.submitted and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sid in dispatcher.submitted
        dispatcher.add_logs(sid, "hello\n")
        dispatcher.set_status(sid, D.SUCCEEDED)
        while time.monotonic() < deadline:
            if client.get(f"/jobs/{job_id}", headers=headers).json()["state"] == "SUCCEEDED":
                break
            time.sleep(0.05)
        assert client.get(f"/jobs/{job_id}/logs", headers=headers).text == "hello\n"
        loop = app.state.dispatch_loop
        assert loop is not None and loop.reconciled is not None
    assert loop._task is None  # stopped with the app
