"""Job counts kept by the database (migration 0003), the quota they enforce, and the caches of
the hot routes (tokens, resolved data paths), on SQLite and PostgreSQL."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from sqlalchemy import func, select
from test_service_support import job_body, make_owner, submit_at_once

from service import crud, validation
from service.auth import TokenCache, create_token, revoke_token
from service.db import Store
from service.models import QUOTA_SLOTS, Job, JobCount, JobState, Token
from service.schemas import JobCreate

pytest_plugins = ["test_service_support"]  # the store / api fixtures


def _submit(store: Store, owner: Token, **body: object) -> tuple[Job, bool]:
    with store.session() as session:
        job_in = JobCreate.model_validate(job_body(**body))
        return crud.create_job(session=session, owner=owner, job_in=job_in)


def _counted(store: Store) -> dict[tuple[int, str], int]:
    with store.session() as session:
        kept = session.execute(
            select(JobCount.owner_id, JobCount.state, func.sum(JobCount.n)).group_by(
                JobCount.owner_id, JobCount.state
            )
        )
        return {(owner, state): int(n) for owner, state, n in kept if n}


def _actual(store: Store) -> dict[tuple[int, str], int]:
    with store.session() as session:
        rows = session.execute(
            select(Job.owner_id, Job.state, func.count()).group_by(Job.owner_id, Job.state)
        )
        return {(owner, state): int(n) for owner, state, n in rows}


def test_counts_follow_every_insert_move_and_delete(store: Store) -> None:
    alice, bob = make_owner(store), make_owner(store, "bob")
    ids = [_submit(store, alice, name=f"a{i}")[0].id for i in range(5)]
    _submit(store, bob, name="b")
    with store.session() as session:
        done = session.get_one(Job, ids[0])
        crud.mark_dispatched(session=session, job=done, submission_id="fgd-done-1")
        crud.mark_running(session=session, job=done)
        crud.mark_finished(session=session, job=done, state=JobState.SUCCEEDED)
        crud.request_cancel(session=session, job=session.get_one(Job, ids[1]))
        retried = session.get_one(Job, ids[2])
        crud.mark_dispatched(session=session, job=retried, submission_id="fgd-retried-1")
        crud.record_failure(session=session, job=retried, reason="worker lost")  # queued again
        session.delete(session.get_one(Job, ids[3]))
        session.commit()
        session.get_one(Job, ids[4]).owner_id = bob.id
        session.commit()
    assert (
        _counted(store)
        == _actual(store)
        == {
            (alice.id, "SUCCEEDED"): 1,
            (alice.id, "CANCELLED"): 1,
            (alice.id, "QUEUED"): 1,
            (bob.id, "QUEUED"): 2,
        }
    )
    with store.session() as session:
        assert crud.count_active_jobs(session=session, owner_id=alice.id) == 1
        assert crud.count_active_jobs(session=session, owner_id=bob.id) == 2
        page, _, count = crud.list_jobs(session=session, viewer=alice, state=JobState.QUEUED)
        assert count == 1 and [job_id for job_id, _ in page] == [ids[2]]


def test_a_replay_at_the_quota_returns_its_job(store: Store) -> None:
    owner = make_owner(store, quota=1)
    first, created = _submit(store, owner, idempotency_key="k")
    again, created_again = _submit(store, owner, idempotency_key="k")
    assert created and not created_again and again.id == first.id
    with pytest.raises(crud.QuotaExceeded, match="1 unfinished jobs"):
        _submit(store, owner, idempotency_key="other")
    assert _counted(store) == {(owner.id, "QUEUED"): 1}


def test_concurrent_creates_stop_at_a_large_quota(store: Store) -> None:
    """A quota large enough that submissions first try one slot each (PostgreSQL): near the
    quota they count again holding every slot, and exactly the quota gets in."""
    quota = 4 * QUOTA_SLOTS + 6
    owner = make_owner(store, quota=quota)
    with store.session() as session:  # quota - 6 unfinished jobs already
        job_in = JobCreate.model_validate(job_body())
        for _ in range(quota - 6):
            crud.create_job(session=session, owner=owner, job_in=job_in)
    outcomes = submit_at_once(store, owner, 16)
    assert outcomes.count("ok") == 6 and outcomes.count("quota") == 10
    assert _counted(store) == _actual(store) == {(owner.id, "QUEUED"): quota}


def test_token_cache_keeps_a_live_token_for_its_ttl(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    with store.session() as session:
        plain, row = create_token(session, "cached")
    tokens = TokenCache(store, ttl=30.0)
    assert tokens.cached(plain) is None
    found = tokens.verify(plain)
    assert found is not None and found.id == row.id
    cached = tokens.cached(plain)
    assert cached is not None and cached.id == row.id
    with store.session() as session:
        assert revoke_token(session, row.id)
    assert tokens.cached(plain) is not None  # revoked, but within the ttl
    now = time.monotonic()
    monkeypatch.setattr("service.cache.time.monotonic", lambda: now + 31.0)
    assert tokens.cached(plain) is None
    assert tokens.verify(plain) is None  # looked up again: refused, and not cached
    assert tokens.verify("fgd_unknown") is None and tokens.cached("fgd_unknown") is None
    assert TokenCache(store, ttl=0).verify(plain) is None


def test_resolved_paths_are_kept_for_a_while(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, outside = tmp_path / "data", tmp_path / "elsewhere"
    root.mkdir()
    outside.mkdir()
    link = root / "link"
    link.symlink_to(root / "inside")
    roots = [root.resolve()]
    assert validation._allowed(str(link / "ann.json"), roots)
    link.unlink()
    link.symlink_to(outside)  # now it leads out
    assert validation._allowed(str(link / "ann.json"), roots)  # the resolution is kept
    now = time.monotonic()
    later = now + validation.RESOLVED_SECONDS + 1
    monkeypatch.setattr("service.cache.time.monotonic", lambda: later)
    assert not validation._allowed(str(link / "ann.json"), roots)
    assert not validation._allowed(str(root / ".." / "elsewhere" / "x"), roots)
    assert not validation._allowed("relative/x", roots)
    assert validation._allowed(str(root), roots)
