"""The dispatch pass against the in-process dispatcher: order, limits, retries, cancel, logs."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from test_service_support import Api, FakeClient, fake_run, job_body, spec

from service import crud
from service.dispatch import DispatchState, InProcessDispatcher, submission_id
from service.loop import DispatchLoop, MlflowRunLocator
from service.models import Job
from service.results import ResultsReader
from service.scheduler import PassReport, dispatch_once

pytest_plugins = ["test_service_support"]  # the store / api fixtures


def _pass(api: Api, max_concurrent: int = 2, **kw: Any) -> PassReport:
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


def test_a_job_whose_stored_spec_no_longer_validates_fails_from_the_queue(api: Api) -> None:
    bad = api.submit(name="bad", priority=5).json()["id"]
    good = api.submit(name="good").json()["id"]
    with api.store.session() as session:
        job = session.get(Job, bad)
        assert job is not None
        job.spec = {**job.spec, "model": {**job.spec["model"], "backbone": "resnet7"}}
        session.commit()
    report = _pass(api)  # the bad job does not stall the queue
    assert report.finished == [bad] and report.submitted == [good]
    failed = api.get(f"/jobs/{bad}").json()
    assert failed["state"] == "FAILED" and failed["attempt"] == 0
    assert failed["submission_id"] is None and "model.backbone" in failed["error"]
    assert failed["failures"][0]["reason"] == failed["error"]
    assert submission_id(bad, 1) not in api.dispatcher.submitted
    assert _pass(api).finished == []  # settled: not looked at again


def test_unfit_jobs_fail_from_the_queue_without_a_submission(api: Api) -> None:
    api.dispatcher.capacity = {"CPU": 4.0, "GPU": 0.0}
    sweep = {"space": {"alpha": {"uniform": [0.0, 1.0]}}, "resources": {"cpu": 8, "gpu": 0}}
    big = api.post("/jobs", json=job_body(spec=spec(sweep=sweep))).json()["id"]
    report = _pass(api, fail_unfit=True)
    assert report.finished == [big] and report.submitted == [] and not api.dispatcher.submitted
    job = api.get(f"/jobs/{big}").json()
    assert (job["state"], job["attempt"], job["submission_id"]) == ("FAILED", 0, None)
    assert "CPU 8" in job["error"] and job["failures"][0]["attempt"] == 1


class _TaggedClient(FakeClient):
    """A fake MLflow client that also finds parent runs by their ``fgd.job_id`` tag."""

    def __init__(self, runs: list[Any], parents: dict[str, str]) -> None:
        super().__init__(runs)
        self.parents = parents  # job id -> run id

    def search_experiments(self) -> list[Any]:
        return [SimpleNamespace(experiment_id="7")]

    def search_runs(self, experiment_ids: list[str], filter_string: str = "", **kw: Any) -> Any:
        if filter_string.startswith("tags.`fgd.job_id`"):
            job_id = filter_string.split("= '")[1].rstrip("'")
            run = self.parents.get(job_id)
            info = SimpleNamespace(experiment_id=experiment_ids[0], run_id=run)
            return [] if run is None else [SimpleNamespace(info=info)]
        return super().search_runs(experiment_ids, filter_string, **kw)


def test_the_run_locator_uses_the_readers_client(api: Api) -> None:
    parents: dict[str, str] = {}
    made: list[str] = []
    runs = [fake_run("parent-1", "t", 0.25)]

    def factory(uri: str) -> _TaggedClient:
        made.append(uri)
        return _TaggedClient(runs, parents)

    results = ResultsReader(tracking_uri="http://mlflow.test:5000", client_factory=factory)
    job_id = api.submit().json()["id"]
    locate = MlflowRunLocator(results)
    assert locate(job_id) is None and made == ["http://mlflow.test:5000"]
    parents[job_id] = "parent-1"
    _pass(api, results=results, locate=locate)  # submitted
    _pass(api, results=results, locate=locate)  # on Ray: located, then its progress read
    job = api.get(f"/jobs/{job_id}").json()
    assert job["mlflow"]["experiment_id"] == "7" and job["mlflow"]["run_id"] == "parent-1"
    assert job["best_metric"]["value"] == 0.25
    assert made.count("http://mlflow.test:5000") == 2


def test_one_dispatch_loop_leads_however_many_workers_run_one(api: Api) -> None:
    first, second = (
        DispatchLoop(store=api.store, dispatcher=api.dispatcher, max_concurrent=5, interval=1.0)
        for _ in range(2)
    )
    try:
        job_id = api.submit().json()["id"]
        assert first.step() is not None and first.reconciled is not None  # leads
        assert second.step() is None and second.reconciled is None  # waits
        assert list(api.dispatcher.submitted) == [submission_id(job_id, 1)]
        assert first.step() is not None  # still leads
        first.leader.release()  # its worker stopped
        assert second.step() is not None and second.reconciled is not None  # took over
        assert first.step() is None and first.reconciled is None
        assert list(api.dispatcher.submitted) == [submission_id(job_id, 1)]
    finally:
        first.leader.release()
        second.leader.release()
