"""Route tests: auth, tenants, quota, idempotency, validation, pagination, cancel, health."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from fastapi.testclient import TestClient
from sqlalchemy import insert, select
from test_service_support import Api, job_body, spec

from service import crud
from service.auth import hash_token
from service.core.config import Settings
from service.db import Store
from service.main import create_app
from service.models import Job, JobState, Token

pytest_plugins = ["test_service_support"]  # the store / api fixtures


def test_no_token_is_401_with_bearer_challenge(api: Api) -> None:
    for method, url in (("get", "/jobs"), ("post", "/jobs"), ("get", "/jobs/x/logs")):
        r = getattr(api.client, method)(url)
        assert r.status_code == 401, url
        assert r.headers["WWW-Authenticate"].startswith("Bearer")
    r = api.client.get("/jobs", headers={"Authorization": "Bearer fgd_not-a-real-token"})
    assert r.status_code == 401
    assert "invalid_token" in r.headers["WWW-Authenticate"]
    assert api.client.get("/healthz").status_code == 200


def test_submit_and_read(api: Api) -> None:
    r = api.submit(priority=5)
    assert r.status_code == 201, r.text
    job = r.json()
    assert job["state"] == "QUEUED" and job["owner"] == "alice" and job["priority"] == 5
    assert job["spec"]["teacher"]["train"] is True and job["progress"]["trials_done"] == 0
    assert job["mlflow"]["tracking_uri"] == "http://mlflow.test:5000"
    got = api.get(f"/jobs/{job['id']}").json()
    assert got["id"] == job["id"] and got["created_at"] == job["created_at"]


def test_bad_spec_is_422_naming_the_field(api: Api) -> None:
    bad = spec(train={"schedule": {"iterations": 0}})
    r = api.post("/jobs", json=job_body(spec=bad))
    assert r.status_code == 422
    fields = [e["field"] for e in r.json()["detail"]]
    assert "body.spec.train.schedule.iterations" in fields
    assert "body.spec.train.schedule.iterations" in r.json()["message"]
    r = api.post("/jobs", json=job_body(spec=spec(kind="teacher")))  # teacher on a teacher job
    assert r.status_code == 422 and r.json()["detail"][0]["field"] == "body.spec.teacher"
    r = api.post("/jobs", json=job_body(spec=spec(fgd={"lambda": -1})))
    assert r.json()["detail"][0]["field"] == "body.spec.fgd.lambda"
    for junk in (b"{not json", b"[]", b"\xff\xfe"):
        r = api.post("/jobs", content=junk, headers={"Content-Type": "application/json"})
        assert r.status_code == 422, junk


def test_data_paths_outside_the_roots_are_422(api: Api) -> None:
    root = api.data_root
    coco = {
        "train_images": f"{root}/coco/train",
        "train_ann": "/etc/passwd",
        "val_images": f"{root}/coco/val",
        "val_ann": f"{root}/coco/val.json",
    }
    r = api.post("/jobs", json=job_body(spec=spec(data={"coco": coco})))
    assert r.status_code == 422
    assert r.json()["detail"][0]["field"] == "body.spec.data.coco.train_ann"
    assert "/etc/passwd" in r.json()["message"]
    coco["train_ann"] = f"{root}/coco/../../escape.json"
    r = api.post("/jobs", json=job_body(spec=spec(data={"coco": coco})))
    assert r.json()["detail"][0]["field"] == "body.spec.data.coco.train_ann"
    coco["train_ann"] = f"{root}/coco/train.json"
    teacher = {"checkpoint": "runs/teacher.pt"}  # relative: refused
    r = api.post("/jobs", json=job_body(spec=spec(data={"coco": coco}, teacher=teacher)))
    assert r.json()["detail"][0]["field"] == "body.spec.teacher.checkpoint"
    teacher = {"checkpoint": f"{root}/teacher.pt"}
    r = api.post("/jobs", json=job_body(spec=spec(data={"coco": coco}, teacher=teacher)))
    assert r.status_code == 201, r.text
    grid = {"grid": {"teacher.checkpoint": [f"{root}/a.pt", "/tmp/b.pt"]}}
    r = api.post("/jobs", json=job_body(spec=spec(teacher=teacher, sweep=grid)))
    assert r.json()["detail"][0]["field"] == "body.spec.sweep.grid.teacher.checkpoint[1]"


def test_body_too_large_is_413(api: Api) -> None:
    body = job_body(name="x" * 100)
    body["spec"]["fgd"] = {"levels": ["P3"] * 20_000}
    r = api.post("/jobs", json=body)
    assert r.status_code == 413
    assert "64000 bytes" in r.json()["detail"]
    blob = json.dumps(body).encode()
    chunks = (blob[i : i + 4096] for i in range(0, len(blob), 4096))  # no Content-Length
    r = api.post("/jobs", content=chunks, headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and "64000 bytes" in r.json()["detail"]


def test_other_tenants_job_is_404_admin_sees_all(api: Api) -> None:
    job_id = api.submit("alice").json()["id"]
    api.submit("bob")
    assert api.get(f"/jobs/{job_id}", "bob").status_code == 404
    assert api.post(f"/jobs/{job_id}/cancel", "bob").status_code == 404
    assert api.get(f"/jobs/{job_id}/logs", "bob").status_code == 404
    assert api.get(f"/jobs/{job_id}/trials", "bob").status_code == 404
    assert api.get("/jobs", "bob").json()["count"] == 1
    assert api.get(f"/jobs/{job_id}", "admin").status_code == 200
    listed = api.get("/jobs", "admin").json()
    assert listed["count"] == 2 and {j["owner"] for j in listed["data"]} == {"alice", "bob"}


def test_quota_is_429_and_frees_up_on_cancel(api: Api) -> None:
    ids = [api.submit(name=f"j{i}").json()["id"] for i in range(3)]
    r = api.submit(name="one too many")
    assert r.status_code == 429
    assert "3 unfinished jobs" in r.json()["detail"] and "alice" in r.json()["detail"]
    assert api.submit("bob").status_code == 201  # quotas are per token
    assert api.post(f"/jobs/{ids[0]}/cancel").json()["state"] == "CANCELLED"
    assert api.submit(name="fits again").status_code == 201


def test_idempotency_same_body_same_job_other_body_409(api: Api) -> None:
    first = api.submit(idempotency_key="k1")
    assert first.status_code == 201
    again = api.submit(idempotency_key="k1")
    assert again.status_code == 200 and again.json()["id"] == first.json()["id"]
    explicit = api.submit(idempotency_key="k1", priority=0, max_attempts=2)  # defaults spelled
    assert explicit.status_code == 200
    other = api.submit(idempotency_key="k1", priority=9)
    assert other.status_code == 409 and first.json()["id"] in other.json()["detail"]
    assert api.submit("bob", idempotency_key="k1").status_code == 201  # keys are per owner


def test_concurrent_same_key_makes_one_job(api: Api) -> None:
    barrier = threading.Barrier(10)

    def send(_: int) -> tuple[int, str]:
        barrier.wait()
        r = api.submit(idempotency_key="burst")
        return r.status_code, r.json().get("id", r.text)

    with ThreadPoolExecutor(10) as pool:
        answers = list(pool.map(send, range(10)))
    assert {code for code, _ in answers} <= {200, 201}, answers
    assert sorted(code for code, _ in answers).count(201) == 1
    assert len({job_id for _, job_id in answers}) == 1
    with api.store.session() as session:
        assert len(session.scalars(select(Job)).all()) == 1


def test_pagination_and_state_filter(api: Api) -> None:
    with api.store.session() as session:
        owner = session.scalar(select(Token).where(Token.name == "alice"))
        assert owner is not None
        owner.quota = 100
        session.commit()
    ids = [api.submit(name=f"j{i}").json()["id"] for i in range(7)]
    api.post(f"/jobs/{ids[1]}/cancel")
    api.post(f"/jobs/{ids[4]}/cancel")
    page = api.get("/jobs", params={"limit": 3, "offset": 0}).json()
    assert page["count"] == 7 and [j["id"] for j in page["data"]] == ids[::-1][:3]
    last = api.get("/jobs", params={"limit": 3, "offset": 6}).json()
    assert [j["id"] for j in last["data"]] == [ids[0]]
    cancelled = api.get("/jobs", params={"state": "CANCELLED"}).json()
    assert cancelled["count"] == 2 and {j["id"] for j in cancelled["data"]} == {ids[1], ids[4]}
    assert api.get("/jobs", params={"state": "BOGUS"}).status_code == 422
    assert api.get("/jobs", params={"limit": 0}).json()["detail"][0]["field"] == "query.limit"


def test_one_page_of_ten_thousand_jobs_is_fast(api: Api) -> None:
    with api.store.session() as session:
        owner_id = session.scalar(select(Token.id).where(Token.name == "alice"))
        other_id = session.scalar(select(Token.id).where(Token.name == "bob"))
        rows = [
            {
                "id": f"{i:08d}-0000-4000-8000-000000000000",
                "owner_id": owner_id if i % 2 else other_id,
                "name": f"bulk{i}",
                "priority": 0,
                "request_hash": "0" * 64,
                "spec": {"kind": "baseline"},
                "spec_hash": "0" * 64,
                "state": "SUCCEEDED" if i % 3 else "FAILED",
                "attempt": 1,
                "max_attempts": 2,
                "failures": [],
            }
            for i in range(10_000)
        ]
        session.execute(insert(Job), rows)
        session.commit()
    api.get("/jobs", params={"limit": 100})  # warm up
    started = time.perf_counter()
    page = api.get("/jobs", params={"limit": 100, "offset": 2000})
    filtered = api.get("/jobs", params={"limit": 100, "state": "FAILED"})
    elapsed = time.perf_counter() - started
    assert page.json()["count"] == 5000 and len(page.json()["data"]) == 100
    assert filtered.json()["count"] == len([i for i in range(1, 10_000, 2) if i % 3 == 0])
    assert elapsed < 1.0, f"two pages took {elapsed:.2f}s"


def test_cancel_queued_running_and_finished(api: Api) -> None:
    queued = api.submit(name="q").json()["id"]
    r = api.post(f"/jobs/{queued}/cancel")
    assert r.status_code == 200 and r.json()["state"] == "CANCELLED"
    assert api.post(f"/jobs/{queued}/cancel").json()["state"] == "CANCELLED"  # idempotent
    running = api.submit(name="r").json()["id"]
    with api.store.session() as session:
        job = session.get(Job, running)
        assert job is not None
        crud.mark_dispatched(session=session, job=job, submission_id=f"fgd-{running}-1")
        crud.mark_running(session=session, job=job)
    r = api.post(f"/jobs/{running}/cancel")
    assert r.json()["state"] == "CANCELLING"
    assert api.dispatcher.stopped == [f"fgd-{running}-1"]
    assert api.get(f"/jobs/{running}").json()["state"] == "CANCELLING"
    with api.store.session() as session:
        job = session.get(Job, running)
        assert job is not None
        crud.mark_finished(session=session, job=job, state=JobState.CANCELLED)
    done = api.submit(name="d").json()["id"]
    with api.store.session() as session:
        job = session.get(Job, done)
        assert job is not None
        crud.mark_dispatched(session=session, job=job, submission_id="s")
        crud.mark_finished(session=session, job=job, state=JobState.SUCCEEDED)
    r = api.post(f"/jobs/{done}/cancel")
    assert r.status_code == 409 and "SUCCEEDED" in r.json()["detail"]


def test_readyz_503_when_database_unreachable(tmp_path) -> None:  # type: ignore[no-untyped-def]
    for url in (
        f"sqlite:///{tmp_path}/missing/dir/and/file.db",
        "postgresql+psycopg://postgres@127.0.0.1:1/test",
    ):
        settings = Settings(DATABASE_URL=url, DATA_ROOTS=[tmp_path])
        store = Store.from_url(url)
        if url.startswith("sqlite"):
            (tmp_path / "missing" / "dir" / "and").rmdir()  # make_engine made the folder
        app = create_app(settings, store=store, migrate=False)
        with TestClient(app) as client:
            assert client.get("/healthz").status_code == 200
            r = client.get("/readyz")
            assert r.status_code == 503, url
            assert r.json()["status"] == "unavailable"


def test_readyz_ok_and_openapi_has_examples(api: Api) -> None:
    assert api.client.get("/readyz").json()["status"] == "ok"
    schema = api.client.get("/openapi.json").json()
    assert schema["components"]["schemas"]["JobCreate"]["examples"]
    assert {"/jobs", "/jobs/{job_id}/logs", "/compare", "/readyz"} <= set(schema["paths"])
    assert "HTTPBearer" in schema["components"]["securitySchemes"]


def test_tokens_store_only_the_hash(api: Api) -> None:
    with api.store.session() as session:
        row = session.scalar(select(Token).where(Token.name == "alice"))
        assert row is not None
        assert row.token_hash == hash_token(api.tokens["alice"]) and len(row.token_hash) == 64
        assert api.tokens["alice"] not in str([row.name, row.token_hash])


def test_startup_objects_are_kept_out_of_the_cyclic_collector(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """What is alive after startup is frozen (full collections skip it), and thawed on stop."""
    import gc

    url = f"sqlite:///{tmp_path}/jobs.db"
    store = Store.from_url(url)
    app = create_app(Settings(DATABASE_URL=url, DATA_ROOTS=[tmp_path]), store=store)
    before = gc.get_freeze_count()
    with TestClient(app) as client:
        assert client.get("/healthz").status_code == 200
        assert gc.get_freeze_count() > max(before, 10_000)
    assert gc.get_freeze_count() == 0
