"""Persistence: keyword-only functions over the SQLAlchemy models; each one commits its change.

The API uses the first half (create, read, list, cancel); the dispatcher the second (queue
order, state transitions, retries, progress, logs copied out of Ray).

Every state change goes through ``TRANSITIONS``; a job leaves QUEUED by being dispatched,
cancelled, or failed without a dispatch (``fail_queued``: it can never run).
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import Sequence
from typing import Any
from typing import cast as cast_type

from sqlalchemy import Select, Table, Text, bindparam, cast, func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import set_committed_value

from service.models import ACTIVE_STATES, FINAL_STATES, Job, JobLog, JobState, Token, utcnow
from service.schemas import JobCreate, canonical_hash

S = JobState
_JOBS = cast_type(Table, Job.__table__)  # for Core statements: no ORM machinery per execution
_TOKENS = cast_type(Table, Token.__table__)
TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    S.QUEUED: frozenset({S.DISPATCHED, S.CANCELLED, S.FAILED}),
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

    The API's busiest write, kept lean: statements built once, the new row inserted with one
    Core ``INSERT`` (no unit of work for one row) and returned as a transient ``Job`` holding
    what was stored.

    Raises:
        QuotaExceeded: the owner already has ``quota`` unfinished jobs.
    """
    # Everything the insert needs is computed before the owner's lock is taken: the lock is
    # held only across round trips to the database, never while this thread waits for the GIL
    # to run Python (which, under load, is what made submissions queue behind each other).
    request_hash = job_in.request_hash()
    key = job_in.idempotency_key
    spec = job_in.spec.to_dict()
    spec_hash = canonical_hash(spec)
    now = utcnow()
    values: dict[str, Any] = {
        "id": str(uuid.uuid4()),
        "owner_id": owner.id,
        "name": job_in.name,
        "priority": job_in.priority,
        "idempotency_key": key,
        "request_hash": request_hash,
        "spec": spec,
        "spec_hash": spec_hash,
        "state": JobState.QUEUED.value,
        "attempt": 0,
        "max_attempts": job_in.max_attempts,
        "submission_id": None,
        "created_at": now,
        "updated_at": now,
        "started_at": None,
        "finished_at": None,
        "error": None,
        "progress": None,
        "mlflow_experiment_id": None,
        "mlflow_run_id": None,
        "failures": [],
    }
    # Serialize this owner's submissions: quota counts and key lookups see each other.
    locked = lock_row(session, Token, owner.id, returning="quota")
    # The unfinished jobs and the job with this key, if any, in one round trip.
    active, existing_id = session.execute(_ACTIVE_AND_KEY, {"owner_id": owner.id, "key": key}).one()
    if existing_id is not None:
        existing = session.get_one(Job, existing_id)
        session.commit()  # release the lock; nothing was written
        return _replay(existing, request_hash), False
    if active >= locked:
        session.rollback()
        raise QuotaExceeded(owner, active)
    try:
        session.execute(_INSERT_JOB, values)
        session.commit()
    except IntegrityError:
        session.rollback()
        if key is None:
            raise
        raced = _by_key(session, owner.id, key)
        if raced is None:
            raise
        return _replay(raced, request_hash), False
    job = Job(**values)
    set_committed_value(job, "owner", owner)  # known: the response needs no look-up
    return job, True


def _active_query(owner_id: Any) -> Select[int]:
    return select(func.count()).where(Job.owner_id == owner_id, Job.state.in_(ACTIVE_STATES))


# The submission's statements, built once (building one costs about what running it does).
_ACTIVE_AND_KEY = select(
    _active_query(bindparam("owner_id")).scalar_subquery(),
    select(Job.id)
    .where(Job.owner_id == bindparam("owner_id"), Job.idempotency_key == bindparam("key"))
    .scalar_subquery(),
)
_INSERT_JOB = insert(_JOBS)


def _by_key(session: Session, owner_id: int, key: str) -> Job | None:
    return session.scalar(select(Job).where(Job.owner_id == owner_id, Job.idempotency_key == key))


def _replay(existing: Job, request_hash: str) -> Job:
    if existing.request_hash != request_hash:
        raise IdempotencyConflict(existing)
    return existing


def count_active_jobs(*, session: Session, owner_id: int) -> int:
    """The owner's unfinished jobs (what the quota limits)."""
    return int(session.scalar(_active_query(owner_id)) or 0)


def get_job(*, session: Session, job_id: str, viewer: Token) -> Job | None:
    """The job if ``viewer`` may see it (its owner, or an admin); else None."""
    job = session.get(Job, job_id)
    if job is None or (job.owner_id != viewer.id and not viewer.admin):
        return None
    return job


# What a page of jobs reads: JobPublic's fields, the JSON columns as their stored text.
_LISTING = (
    *(
        _JOBS.c[name]
        for name in (
            "id",
            "name",
            "priority",
            "idempotency_key",
            "state",
            "attempt",
            "max_attempts",
            "submission_id",
            "created_at",
            "started_at",
            "finished_at",
            "error",
            "mlflow_experiment_id",
            "mlflow_run_id",
            "spec_hash",
        )
    ),
    _TOKENS.c.name.label("owner"),
    cast(_JOBS.c.progress, Text).label("progress"),
    cast(_JOBS.c.failures, Text).label("failures"),
    cast(_JOBS.c.spec, Text).label("spec"),
)


def list_jobs(
    *,
    session: Session,
    viewer: Token,
    state: JobState | None = None,
    limit: int = 100,
    offset: int = 0,
) -> tuple[list[dict[str, Any]], int]:
    """One page of the jobs ``viewer`` may see, newest first, and the total count.

    Plain rows (dicts), not ORM objects: a page is read to be shown, and parsing every stored
    spec only to serialize it again was most of a page's cost. Each row has ``JobPublic``'s
    fields (``owner`` is the owner's name), with ``progress``, ``failures`` and ``spec`` as
    their stored JSON text (``progress`` may be ``"null"``); ``service.api.views.jobs_page_json``
    renders them.
    """
    count_stmt, page_stmt = _listing_statements(not viewer.admin, state is not None)
    params = {"owner_id": viewer.id, "state": state, "limit": limit, "offset": offset}
    count = session.scalar(count_stmt, params) or 0
    page = session.execute(page_stmt, params)
    keys = list(page.keys())
    return [dict(zip(keys, row, strict=True)) for row in page], int(count)


@functools.cache
def _listing_statements(by_owner: bool, by_state: bool) -> tuple[Any, Any]:
    """The count and page statements of a listing (built once per kind of filter)."""
    jobs = _JOBS.c
    where = []
    if by_owner:
        where.append(jobs.owner_id == bindparam("owner_id"))
    if by_state:
        where.append(jobs.state == bindparam("state"))
    count = select(func.count()).select_from(_JOBS).where(*where)
    page = (
        select(*_LISTING)
        .select_from(_JOBS.join(_TOKENS, _TOKENS.c.id == jobs.owner_id))
        .where(*where)
        .order_by(jobs.created_at.desc(), jobs.id.desc())
        .limit(bindparam("limit"))
        .offset(bindparam("offset"))
    )
    return count, page


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


def fail_queued(*, session: Session, job: Job, reason: str) -> Job:
    """QUEUED → FAILED without a dispatch: the job can never run (its stored spec no longer
    validates, or no node of the cluster fits one trial).

    ``reason`` becomes the job's ``error`` and a ``failures`` entry for the attempt that could
    not start (``job.attempt + 1``); ``attempt`` and ``submission_id`` stay as they are (nothing
    was dispatched). The row is locked and re-read first, so a cancel that won the race stands.

    Raises:
        InvalidTransition: the job is no longer QUEUED (cancelled meanwhile, say).
    """
    lock_row(session, Job, job.id)
    session.refresh(job)
    if job.state != S.QUEUED:
        session.rollback()
        raise InvalidTransition(f"job {job.id}: {job.state} → FAILED is not allowed here")
    failure = {"attempt": job.attempt + 1, "reason": reason, "at": _now()}
    job.failures = [*job.failures, failure]
    _move(job, S.FAILED, reason=reason)
    session.commit()
    return job


def requeue_unstarted(*, session: Session, job: Job, reason: str) -> Job:
    """DISPATCHED → QUEUED without spending the attempt: the cluster never had the submission.

    The attempt counter goes back by one and ``submission_id`` is cleared, so the next dispatch
    submits the same attempt under the same deterministic id; ``failures`` is untouched (no
    attempt failed), ``reason`` goes to ``error``.

    Raises:
        InvalidTransition: the job is not DISPATCHED (one that RUNNING has spent its attempt:
            ``record_failure``).
    """
    if job.state != S.DISPATCHED:
        raise InvalidTransition(f"job {job.id}: only a DISPATCHED job is requeued unstarted")
    _move(job, S.QUEUED, reason=reason)
    job.attempt = max(job.attempt - 1, 0)
    job.submission_id = None
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


def lock_row(
    session: Session, model: type[Token] | type[Job], row_id: object, *, returning: str = ""
) -> Any:
    """Lock ``row_id`` for the rest of the transaction with a no-op UPDATE (see service.db).

    On SQLite the session's current transaction is ended first, so the write lock is the first
    thing the new transaction takes; on PostgreSQL (READ COMMITTED: each statement sees what was
    committed before it) the lock joins the current transaction, one round trip less.

    Args:
        returning: the name of a column of the row to read in the same statement; its value
            is returned (else None).
    """
    if session.get_bind().dialect.name == "sqlite":
        session.commit()
    result = session.execute(_lock_statement(model, returning), {"row_id": row_id})
    return result.scalar_one() if returning else None


@functools.cache
def _lock_statement(model: type[Token] | type[Job], returning: str) -> Any:
    """The lock's Core UPDATE, built once per table (``onupdate`` columns still apply)."""
    table = cast_type(Table, model.__table__)
    stmt = update(table).where(table.c.id == bindparam("row_id")).values(id=table.c.id)
    return stmt.returning(table.c[returning]) if returning else stmt


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
