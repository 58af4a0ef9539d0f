"""Responses rendered without the model round trip say what the models would say.

``GET /jobs`` splices each stored spec into the page (``views.jobs_page_json``) and
``POST /jobs`` serializes its ``JobPublic`` itself; both must parse to exactly what
``JobsPublic`` / ``JobPublic`` of the same jobs give, on SQLite and PostgreSQL.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from test_service_support import Api, job_body, spec

from service import crud
from service.api.views import job_public
from service.models import Job, Token
from service.schemas import JobsPublic

pytest_plugins = ["test_service_support"]  # the store / api fixtures


def _expected(api: Api, ids: list[str], count: int) -> dict[str, Any]:
    with api.store.session() as session:
        jobs = [session.get_one(Job, job_id) for job_id in ids]
        page = JobsPublic(data=[job_public(j, api.results) for j in jobs], count=count)
        return page.model_dump(mode="json")


def test_a_page_of_jobs_is_what_the_models_give(api: Api) -> None:
    with api.store.session() as session:
        alice = session.scalar(select(Token).where(Token.name == "alice"))
        assert alice is not None
        alice.quota = 100
        session.commit()
    sweep = {"space": {"alpha": {"loguniform": [1e-5, 1e-3]}}, "num_samples": 2}
    ids = [
        api.submit(name="plain").json()["id"],
        api.submit(name='naïve «quoted» "name"', priority=5, idempotency_key="k1").json()["id"],
        api.post("/jobs", json=job_body(name="swept", spec=spec(sweep=sweep))).json()["id"],
        api.submit(name="cancelled").json()["id"],
        api.submit(name="failed", max_attempts=1).json()["id"],
    ]
    api.post(f"/jobs/{ids[3]}/cancel")
    with api.store.session() as session:
        swept = session.get_one(Job, ids[2])
        crud.mark_dispatched(session=session, job=swept, submission_id=f"fgd-{swept.id}-1")
        crud.mark_running(session=session, job=swept)
        best = {"name": "bbox_AP", "value": 0.41, "mode": "max", "run_id": "r2"}
        progress = {"trials_done": 1, "trials_running": 1, "best": best}
        crud.update_progress(
            session=session,
            job=swept,
            progress=progress,
            mlflow_experiment_id="3",
            mlflow_run_id="parent",
        )
        failed = session.get_one(Job, ids[4])
        crud.fail_queued(session=session, job=failed, reason='bad "spec"\nsecond line')

    page = api.get("/jobs").json()
    assert page == _expected(api, ids[::-1], 5)
    assert page["data"][2]["best_metric"]["value"] == 0.41
    assert page["data"][2]["mlflow"]["run_url"].endswith("/experiments/3/runs/parent")
    assert page["data"][0]["failures"][0]["reason"] == 'bad "spec"\nsecond line'
    assert page["data"][3]["name"] == 'naïve «quoted» "name"'

    filtered = api.get("/jobs", params={"state": "RUNNING"}).json()
    assert filtered == _expected(api, [ids[2]], 1)
    second = api.get("/jobs", params={"limit": 2, "offset": 2}).json()
    assert second == _expected(api, ids[::-1][2:4], 5)
    assert api.get("/jobs", params={"offset": 50}).json() == {"data": [], "count": 5}
    bobs = api.submit(who="bob", name="bobs").json()["id"]
    assert api.get("/jobs", who="bob").json() == _expected(api, [bobs], 1)
    assert api.get("/jobs", who="admin").json() == _expected(api, [bobs, *ids[::-1]], 6)


def test_a_submission_answers_what_the_model_gives(api: Api) -> None:
    created = api.submit(name="one", idempotency_key="same")
    assert created.status_code == 201 and created.headers["content-type"] == "application/json"
    job_id = created.json()["id"]
    assert created.json() == _expected(api, [job_id], 1)["data"][0]
    again = api.submit(name="one", idempotency_key="same")
    assert again.status_code == 200 and again.json() == created.json()
