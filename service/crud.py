"""Persistence: keyword-only functions over the SQLAlchemy models; each one commits its change.

The API uses the first half (create, read, list, cancel); the dispatcher the second (queue
order, state transitions, retries, progress, logs copied out of Ray).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service.models import ACTIVE_STATES, FINAL_STATES, Job, JobLog, JobState, Token, utcnow
from service.schemas import JobCreate, canonical_hash

S = JobState
TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    S.QUEUED: frozenset({S.DISPATCHED, S.CANCELLED}),
    S.DISPATCHED: frozenset({S.RUNNING, S.SUCCEEDED, S.FAILED, S.QUEUED, S.CANCELLING}),
    S.RUNNING: frozenset({S.SUCCEEDED, S.FAILED, S.QUEUED, S.CANCELLING}),
    S.CANCELLING: frozenset({S.CANCELLED, S.SUCCEEDED, S.FAILED}),
    S.SUCCEEDED: frozenset(),
    S.FAILED: frozenset(),
    S.CANCELLED: frozenset(),
}
ON_RAY = (S.DISPATCHED, S.RUNNING, S.CANCELLING)


class QuotaExceeded(Exception):
    def __init__(self, token: Token, active: int) -> None:
        self.token_name, self.active, self.quota = token.name, active, token.quota
        super().__init__(
            f"quota exceeded: token {token.name!r} has {active} unfinished jobs (queued or "
            f"running) of {token.quota} allowed; cancel one or wait for one to finish"
        )


class IdempotencyConflict(Exception):
    def __init__(self, job: Job) -> None:
        self.job_id = job.id
        super().__init__(
            f"idempotency key {job.idempotency_key!r} was already used for job {job.id} "
            "with a different body"
        )


class InvalidTransition(Exception):
    pass


# --- the API side -----------------------------------------------------------------------------


def create_job(*, session: Session, owner: Token, job_in: JobCreate) -> tuple[Job, bool]:
    """Store a new QUEUED job; returns ``(job, created)``.

    With an idempotency key already used by ``owner``: the same body returns the stored job
    (``created`` False), another body raises ``IdempotencyConflict``. Concurrent requests with
    one key make one job: the owner's token row is locked (PostgreSQL; SQLite serializes
    writers), and the unique constraint backs that up.

    Raises:
        QuotaExceeded: the owner already has ``quota`` unfinished jobs.
    """
    request_hash = job_in.request_hash()
    # Serialize this owner's submissions: quota counts and key lookups see each other.
    lock_row(session, Token, owner.id)
    locked = session.execute(select(Token.quota).where(Token.id == owner.id)).scalar_one()
    if job_in.idempotency_key is not None:
        existing = _by_key(session, owner.id, job_in.idempotency_key)
        if existing is not None:
            session.commit()  # release the lock; nothing was written
            return _replay(existing, request_hash), False
    active = count_active_jobs(session=session, owner_id=owner.id)
    if active >= locked:
        session.rollback()
        raise QuotaExceeded(owner, active)
    spec = job_in.spec.to_dict()
    job = Job(
        id=str(uuid.uuid4()),
        owner_id=owner.id,
        name=job_in.name,
        priority=job_in.priority,
        idempotency_key=job_in.idempotency_key,
        request_hash=request_hash,
        spec=spec,
        spec_hash=canonical_hash(spec),
        state=JobState.QUEUED,
        attempt=0,
        max_attempts=job_in.max_attempts,
        failures=[],
    )
    session.add(job)
    try:
        session.commit()
    except IntegrityError:
        session.rollback()
        if job_in.idempotency_key is None:
            raise
        existing = _by_key(session, owner.id, job_in.idempotency_key)
        if existing is None:
            raise
        return _replay(existing, request_hash), False
    return job, True


def _by_key(session: Session, owner_id: int, key: str) -> Job | None:
    return session.scalar(select(Job).where(Job.owner_id == owner_id, Job.idempotency_key == key))


def _replay(existing: Job, request_hash: str) -> Job:
    if existing.request_hash != request_hash:
        raise IdempotencyConflict(existing)
    return existing


def count_active_jobs(*, session: Session, owner_id: int) -> int:
    """The owner's unfinished jobs (what the quota limits)."""
    query = select(func.count()).where(Job.owner_id == owner_id, Job.state.in_(ACTIVE_STATES))
    return int(session.scalar(query) or 0)


def get_job(*, session: Session, job_id: str, viewer: Token) -> Job | None:
    """The job if ``viewer`` may see it (its owner, or an admin); else None."""
    job = session.get(Job, job_id)
    if job is None or (job.owner_id != viewer.id and not viewer.admin):
        return None
    return job


def list_jobs(
    *,
    session: Session,
    viewer: Token,
    state: JobState | None = None,
    limit: int = 100,
    offset: int = 0,
) -> tuple[list[Job], int]:
    """One page of the jobs ``viewer`` may see, newest first, and the total count."""
    where = []
    if not viewer.admin:
        where.append(Job.owner_id == viewer.id)
    if state is not None:
        where.append(Job.state == state)
    count = session.scalar(select(func.count()).select_from(Job).where(*where)) or 0
    page = session.scalars(
        select(Job)
        .where(*where)
        .order_by(Job.created_at.desc(), Job.id.desc())
        .limit(limit)
        .offset(offset)
    ).all()
    return list(page), int(count)


def request_cancel(*, session: Session, job: Job) -> Job:
    """QUEUED → CANCELLED at once; on Ray → CANCELLING (the dispatcher stops it).

    Cancelling a job already CANCELLING or CANCELLED is a no-op.

    Raises:
        InvalidTransition: the job already SUCCEEDED or FAILED.
    """
    lock_row(session, Job, job.id)
    session.refresh(job)
    if job.state in (S.CANCELLING, S.CANCELLED):
        session.rollback()
        return job
    if job.state == S.QUEUED:
        _move(job, S.CANCELLED, reason="cancelled before it was dispatched")
    else:
        _move(job, S.CANCELLING, reason="cancel requested")
    session.commit()
    return job


# --- the dispatcher side -----------------------------------------------------------------------


def queued_jobs(*, session: Session, limit: int) -> list[Job]:
    """The next jobs to dispatch: priority high to low, then oldest first."""
    query = (
        select(Job)
        .where(Job.state == S.QUEUED)
        .order_by(Job.priority.desc(), Job.created_at.asc(), Job.id.asc())
        .limit(limit)
    )
    return list(session.scalars(query).all())


def jobs_on_ray(*, session: Session) -> list[Job]:
    """Jobs the dispatcher watches: DISPATCHED, RUNNING or CANCELLING."""
    return list(session.scalars(select(Job).where(Job.state.in_(ON_RAY))).all())


def mark_dispatched(*, session: Session, job: Job, submission_id: str) -> Job:
    """QUEUED → DISPATCHED as attempt ``job.attempt + 1`` under Ray ``submission_id``."""
    _move(job, S.DISPATCHED)
    job.attempt += 1
    job.submission_id = submission_id
    session.commit()
    return job


def mark_running(*, session: Session, job: Job) -> Job:
    if job.state != S.RUNNING:
        _move(job, S.RUNNING)
        job.started_at = job.started_at or utcnow()
        session.commit()
    return job


def mark_finished(*, session: Session, job: Job, state: JobState, error: str | None = None) -> Job:
    """Into a final state (SUCCEEDED, FAILED or CANCELLED), with the reason if any."""
    if state not in FINAL_STATES:
        raise InvalidTransition(f"{state} is not a final state")
    _move(job, state, reason=error)
    session.commit()
    return job


def record_failure(*, session: Session, job: Job, reason: str) -> Job:
    """An attempt failed: back to QUEUED while attempts remain, else FAILED."""
    job.failures = [*job.failures, {"attempt": job.attempt, "reason": reason, "at": _now()}]
    if job.state != S.CANCELLING and job.attempt < job.max_attempts:
        _move(job, S.QUEUED, reason=reason)
        job.submission_id = None
    else:
        _move(job, S.FAILED, reason=reason)
    session.commit()
    return job


def update_progress(
    *,
    session: Session,
    job: Job,
    progress: dict[str, Any] | None = None,
    mlflow_experiment_id: str | None = None,
    mlflow_run_id: str | None = None,
) -> Job:
    if progress is not None:
        job.progress = progress
    job.mlflow_experiment_id = mlflow_experiment_id or job.mlflow_experiment_id
    job.mlflow_run_id = mlflow_run_id or job.mlflow_run_id
    session.commit()
    return job


def append_logs(
    *, session: Session, job_id: str, attempt: int, chunks: Sequence[str]
) -> list[JobLog]:
    """Append log chunks of one attempt (``seq`` continues from the last stored chunk)."""
    last = session.scalar(
        select(func.max(JobLog.seq)).where(JobLog.job_id == job_id, JobLog.attempt == attempt)
    )
    start = -1 if last is None else int(last)
    rows = [
        JobLog(job_id=job_id, attempt=attempt, seq=start + 1 + i, text=text)
        for i, text in enumerate(chunks)
        if text
    ]
    session.add_all(rows)
    session.commit()
    return rows


def read_logs(
    *, session: Session, job_id: str, after_id: int = 0, limit: int = 1000
) -> list[JobLog]:
    """Stored chunks with ``id > after_id``, in order."""
    query = (
        select(JobLog)
        .where(JobLog.job_id == job_id, JobLog.id > after_id)
        .order_by(JobLog.id)
        .limit(limit)
    )
    return list(session.scalars(query).all())


def lock_row(session: Session, model: type[Token] | type[Job], row_id: object) -> None:
    """Lock ``row_id`` for the rest of the transaction with a no-op UPDATE (see service.db).

    Ends the session's current transaction first, so on SQLite the write lock is the first
    thing the new transaction takes.
    """
    session.commit()
    stmt = update(model).where(model.id == row_id).values(id=model.id)
    session.execute(stmt.execution_options(synchronize_session=False))


def _move(job: Job, to: JobState, *, reason: str | None = None) -> None:
    current = JobState(job.state)
    if to not in TRANSITIONS[current]:
        raise InvalidTransition(f"job {job.id}: {current} → {to} is not allowed")
    job.state = to
    if reason is not None:
        job.error = reason
    if to in FINAL_STATES:
        job.finished_at = utcnow()


def _now() -> str:
    return utcnow().isoformat()
