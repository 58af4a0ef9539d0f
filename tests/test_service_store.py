"""The job store on SQLite and PostgreSQL: migrations, queue order, transitions, logs, tokens."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import select
from test_service_support import job_body, make_owner, submit_at_once

from service import cli_tokens, crud
from service.auth import create_token, revoke_token, verify_token
from service.db import Store
from service.models import Base, Job, JobState, Token
from service.schemas import JobCreate

pytest_plugins = ["test_service_support"]  # the store / api fixtures


def _create(store: Store, owner: Token, **over: object) -> Job:
    with store.session() as session:
        job, created = crud.create_job(
            session=session, owner=owner, job_in=JobCreate.model_validate(job_body(**over))
        )
        assert created
        return job


def test_migrations_match_the_models(store: Store) -> None:
    store.migrate()  # a second upgrade is a no-op
    with store.engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True})
        assert compare_metadata(ctx, Base.metadata) == []
        assert ctx.get_current_revision() == "0003_job_counts"


def test_queue_order_priority_then_age(store: Store) -> None:
    owner = make_owner(store)
    jobs = [_create(store, owner, name=n, priority=p) for n, p in (("a", 0), ("b", 5), ("c", 0))]
    with store.session() as session:
        base = datetime(2025, 1, 1, tzinfo=UTC)
        for i, job in enumerate(jobs):
            session.get(Job, job.id).created_at = base + timedelta(seconds=i)  # type: ignore[union-attr]
        session.commit()
        assert [j.name for j in crud.queued_jobs(session=session, limit=10)] == ["b", "a", "c"]
        assert [j.name for j in crud.queued_jobs(session=session, limit=1)] == ["b"]
        got = session.get(Job, jobs[0].id)
        assert got is not None and got.created_at == base and got.created_at.tzinfo is not None


def test_dispatch_retry_and_final_states(store: Store) -> None:
    owner = make_owner(store)
    job = _create(store, owner, max_attempts=2)
    with store.session() as session:
        job = session.get(Job, job.id)  # type: ignore[assignment]
        crud.mark_dispatched(session=session, job=job, submission_id=f"fgd-{job.id}-1")
        assert (job.state, job.attempt) == (JobState.DISPATCHED, 1)
        crud.mark_running(session=session, job=job)
        crud.record_failure(session=session, job=job, reason="node died")
        assert job.state == JobState.QUEUED and job.submission_id is None
        crud.mark_dispatched(session=session, job=job, submission_id=f"fgd-{job.id}-2")
        crud.record_failure(session=session, job=job, reason="OOM")
        assert job.state == JobState.FAILED and job.attempt == 2 and job.finished_at is not None
        assert [f["reason"] for f in job.failures] == ["node died", "OOM"]
        assert job.error == "OOM"
        with pytest.raises(crud.InvalidTransition):
            crud.mark_running(session=session, job=job)
        crud.update_progress(
            session=session,
            job=job,
            progress={"trials_done": 3, "best": {"name": "bbox_AP", "value": 0.4}},
            mlflow_experiment_id="1",
            mlflow_run_id="abc",
        )
    with store.session() as session:
        again = session.get(Job, job.id)
        assert again is not None and again.progress["trials_done"] == 3  # type: ignore[index]
        assert again.mlflow_run_id == "abc" and again.failures[1]["attempt"] == 2
        assert [j.id for j in crud.jobs_on_ray(session=session)] == []


def test_logs_append_in_order_across_attempts(store: Store) -> None:
    job = _create(store, make_owner(store))
    with store.session() as session:
        crud.append_logs(session=session, job_id=job.id, attempt=1, chunks=["a\n", "b\n"])
        crud.append_logs(session=session, job_id=job.id, attempt=1, chunks=["c\n", ""])
        crud.append_logs(session=session, job_id=job.id, attempt=2, chunks=["d\n"])
        rows = crud.read_logs(session=session, job_id=job.id)
        assert [(r.attempt, r.seq, r.text) for r in rows] == [
            (1, 0, "a\n"),
            (1, 1, "b\n"),
            (1, 2, "c\n"),
            (2, 0, "d\n"),
        ]
        assert [
            r.text for r in crud.read_logs(session=session, job_id=job.id, after_id=rows[1].id)
        ] == [
            "c\n",
            "d\n",
        ]


def test_concurrent_creates_with_one_key_make_one_job(store: Store) -> None:
    owner = make_owner(store, quota=5)
    body = JobCreate.model_validate(job_body(idempotency_key="same"))
    barrier = threading.Barrier(10)

    def create(_: int) -> tuple[str, bool]:
        barrier.wait()
        with store.session() as session:
            job, created = crud.create_job(session=session, owner=owner, job_in=body)
            return job.id, created

    with ThreadPoolExecutor(10) as pool:
        results = list(pool.map(create, range(10)))
    assert len({job_id for job_id, _ in results}) == 1
    assert [created for _, created in results].count(True) == 1


def test_concurrent_creates_respect_the_quota(store: Store) -> None:
    outcomes = submit_at_once(store, make_owner(store, quota=4), 8)
    assert outcomes.count("ok") == 4 and outcomes.count("quota") == 4


def test_tokens_verify_and_revoke(store: Store) -> None:
    with store.session() as session:
        plain, row = create_token(session, "ci", admin=True, quota=2)
        assert plain.startswith("fgd_") and len(plain) > 40
        found = verify_token(session, plain)
        assert found is not None and found.id == row.id and found.admin
        assert verify_token(session, plain + "x") is None
        assert verify_token(session, "not-even-prefixed") is None
        assert revoke_token(session, row.id) and not revoke_token(session, row.id)
        assert verify_token(session, plain) is None
        with pytest.raises(ValueError):
            create_token(session, "bad", quota=0)


def test_cli_hook_creates_a_token(store: Store, capsys: pytest.CaptureFixture[str]) -> None:
    plain = cli_tokens.create(
        "cli-user", quota=7, database_url=store.engine.url.render_as_string(hide_password=False)
    )
    assert capsys.readouterr() == ("", "")
    with store.session() as session:
        row = verify_token(session, plain)
        assert row is not None and (row.name, row.quota, row.admin) == ("cli-user", 7, False)
        assert session.scalar(select(Token.name).where(Token.id == row.id)) == "cli-user"


def test_a_queued_job_fails_without_a_dispatch(store: Store) -> None:
    owner = make_owner(store, quota=1)
    job = _create(store, owner)
    with store.session() as session:
        job = session.get(Job, job.id)  # type: ignore[assignment]
        crud.fail_queued(session=session, job=job, reason="spec: unknown backbone")
        assert (job.state, job.attempt, job.submission_id) == (JobState.FAILED, 0, None)
        assert job.error == "spec: unknown backbone" and job.finished_at is not None
        assert [(f["attempt"], f["reason"]) for f in job.failures] == [
            (1, "spec: unknown backbone")
        ]
        assert crud.queued_jobs(session=session, limit=10) == []
        assert crud.count_active_jobs(session=session, owner_id=owner.id) == 0
        with pytest.raises(crud.InvalidTransition):
            crud.fail_queued(session=session, job=job, reason="again")
    _create(store, owner, name="next")  # the failed job no longer counts against quota 1
    with store.session() as session:
        stored = session.get(Job, job.id)
        assert stored is not None and stored.state == JobState.FAILED
        assert stored.failures[0]["reason"] == "spec: unknown backbone"


def test_failing_a_queued_job_loses_to_a_cancel_that_came_first(store: Store) -> None:
    job = _create(store, make_owner(store))
    with store.session() as dispatcher_side, store.session() as api_side:
        stale = dispatcher_side.get(Job, job.id)  # read while QUEUED
        assert stale is not None and stale.state == JobState.QUEUED
        dispatcher_side.commit()
        crud.request_cancel(session=api_side, job=api_side.get_one(Job, job.id))
        with pytest.raises(crud.InvalidTransition):
            crud.fail_queued(session=dispatcher_side, job=stale, reason="unfit")
    with store.session() as session:
        stored = session.get(Job, job.id)
        assert stored is not None and stored.state == JobState.CANCELLED and stored.failures == []


def test_requeue_unstarted_gives_the_attempt_back(store: Store) -> None:
    job = _create(store, make_owner(store), max_attempts=1)
    with store.session() as session:
        job = session.get(Job, job.id)  # type: ignore[assignment]
        crud.mark_dispatched(session=session, job=job, submission_id=f"fgd-{job.id}-1")
        crud.requeue_unstarted(session=session, job=job, reason="the cluster never had it")
        assert (job.state, job.attempt, job.submission_id) == (JobState.QUEUED, 0, None)
        assert job.error == "the cluster never had it" and job.failures == []
        assert [j.id for j in crud.queued_jobs(session=session, limit=5)] == [job.id]
        # The same attempt is dispatched again: max_attempts=1 still allows it.
        crud.mark_dispatched(session=session, job=job, submission_id=f"fgd-{job.id}-1")
        assert job.attempt == 1
        crud.mark_running(session=session, job=job)
        with pytest.raises(crud.InvalidTransition):  # it started: that attempt is spent
            crud.requeue_unstarted(session=session, job=job, reason="lost")
        assert job.state == JobState.RUNNING
    with store.session() as session:
        stored = session.get(Job, job.id)
        assert stored is not None and (stored.state, stored.attempt) == (JobState.RUNNING, 1)
