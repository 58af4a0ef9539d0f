"""Persistence: keyword-only functions over the SQLAlchemy models; each one commits its change.

The API uses the first half (create, read, list, cancel); the dispatcher the second (queue
order, state transitions, retries, progress, logs copied out of Ray).

Every state change goes through ``TRANSITIONS``; a job leaves QUEUED by being dispatched,
cancelled, or failed without a dispatch (``fail_queued``: it can never run).
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import Container, Sequence
from typing import Any
from typing import cast as cast_type

from sqlalchemy import (
    DateTime,
    Table,
    Text,
    bindparam,
    cast,
    func,
    select,
    text,
    type_coerce,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import set_committed_value

from service.models import (
    ACTIVE_STATES,
    FINAL_STATES,
    QUOTA_EXCEEDED,
    QUOTA_NEEDS_EVERY_SLOT,
    QUOTA_SLOTS,
    Job,
    JobCount,
    JobLog,
    JobState,
    Token,
    utcnow,
)
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
    one key make one job (the unique key's ``ON CONFLICT DO NOTHING``).

    The API's busiest write, kept lean: one ``INSERT`` statement, committed on its own, does
    it all. The database's trigger counts the job and checks the owner's quota in that same
    statement (migration 0003), so no lock outlives it; the new row is returned as a
    transient ``Job`` holding what was stored.

    Raises:
        QuotaExceeded: the owner already has ``quota`` unfinished jobs.
    """
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
    dialect = session.get_bind().dialect.name
    # An owner whose quota is small is always near it: its submissions take every slot at once
    # instead of trying one first (the quota's slots: migration 0003). SQLite always counts
    # exactly: one writer at a time.
    exclusive = dialect == "postgresql" and owner.quota < 4 * QUOTA_SLOTS
    new_id = None
    for every_slot in (True,) if exclusive else (False, True):
        try:
            new_id = _insert_job(session, dialect, values, every_slot=every_slot)
            break
        except IntegrityError as exc:
            session.rollback()
            message = str(exc.orig)
            if QUOTA_NEEDS_EVERY_SLOT in message and not every_slot:
                continue  # near the quota: count exactly
            if QUOTA_EXCEEDED not in message:
                raise
            active = count_active_jobs(session=session, owner_id=owner.id)
            session.commit()
            raise QuotaExceeded(owner, active) from None
    if new_id is None:  # the key is taken: this body again, or another one
        existing = _by_key(session, owner.id, key)
        session.commit()
        if existing is None:  # cannot happen: a job keeps its key
            raise RuntimeError(f"idempotency key {key!r} is taken, but by no job")
        return _replay(existing, request_hash), False
    job = Job(**values)
    set_committed_value(job, "owner", owner)  # known: the response needs no look-up
    return job, True


def _insert_job(
    session: Session, dialect: str, values: dict[str, Any], *, every_slot: bool
) -> str | None:
    """Insert the job (committed); its id, or None when its idempotency key was taken.

    Raises:
        IntegrityError: the insert trigger's ``QUOTA_EXCEEDED`` or ``QUOTA_NEEDS_EVERY_SLOT``.
    """
    if every_slot:  # a transaction: the setting lasts until its commit
        session.execute(_EVERY_SLOT)
        new_id = session.execute(_submission(dialect), values).scalar()
    else:  # one statement on a connection of its own, no transaction round trips around it
        new_id = _connection(session).execute(_submission(dialect), values).scalar()
    session.commit()
    return new_id


_EVERY_SLOT = text("SELECT set_config('fgd.quota_exclusive', 'on', true)")


def _connection(session: Session) -> Any:
    """The session's connection for single statements: in autocommit (each statement commits
    itself: no BEGIN and COMMIT round trips) unless the session has a transaction open."""
    if session.in_transaction():
        return session.connection()
    return session.connection(execution_options={"isolation_level": "AUTOCOMMIT"})


@functools.cache
def _submission(dialect: str) -> Any:
    """``INSERT`` a job unless its owner already used its idempotency key (then nothing is
    inserted and nothing returned); the insert's trigger enforces the quota (0003_job_counts).
    Built once per dialect: building a statement costs about what running it does."""
    module: Any = sqlite if dialect == "sqlite" else postgresql
    stmt = module.insert(_JOBS).on_conflict_do_nothing(
        index_elements=[_JOBS.c.owner_id, _JOBS.c.idempotency_key]
    )
    return stmt.returning(_JOBS.c.id)


def _by_key(session: Session, owner_id: int, key: str) -> Job | None:
    return session.scalar(select(Job).where(Job.owner_id == owner_id, Job.idempotency_key == key))


def _replay(existing: Job, request_hash: str) -> Job:
    if existing.request_hash != request_hash:
        raise IdempotencyConflict(existing)
    return existing


def count_active_jobs(*, session: Session, owner_id: int) -> int:
    """The owner's unfinished jobs (what the quota limits)."""
    return int(session.scalar(_ACTIVE_COUNT, {"owner_id": owner_id}) or 0)


_COUNTS = cast_type(Table, JobCount.__table__)
_ACTIVE_COUNT = select(func.coalesce(func.sum(_COUNTS.c.n), 0)).where(
    _COUNTS.c.owner_id == bindparam("owner_id"),
    _COUNTS.c.state.in_(sorted(state.value for state in ACTIVE_STATES)),
)


def get_job(*, session: Session, job_id: str, viewer: Token) -> Job | None:
    """The job if ``viewer`` may see it (its owner, or an admin); else None."""
    job = session.get(Job, job_id)
    if job is None or (job.owner_id != viewer.id and not viewer.admin):
        return None
    return job


JobVersion = tuple[str, Any]  # (id, updated_at): a job's row as it was at that moment


def list_jobs(
    *,
    session: Session,
    viewer: Token,
    state: JobState | None = None,
    limit: int = 100,
    offset: int = 0,
    known: Container[JobVersion] = (),
) -> tuple[list[JobVersion], dict[str, dict[str, Any]], int]:
    """One page of the jobs ``viewer`` may see, newest first: ``(page, rows, count)``.

    ``page`` lists the page's jobs as ``(id, updated_at)``: every change of a job moves its
    ``updated_at``, so the pair names one version of its row. ``rows`` holds the rows of the
    versions not in ``known`` (what the caller has not rendered already), by id: plain dicts,
    not ORM objects, with ``JobPublic``'s fields (``owner`` is the owner's name) and
    ``progress``, ``failures`` and ``spec`` as their stored JSON text (``progress`` may be
    ``"null"``), for ``service.api.views.JobsRenderer``. A job changed between the two reads
    comes in ``rows`` as it is now, under its new ``updated_at``. ``count`` is the sum of the
    ``job_counts`` rows the filter selects (read with the page, in one snapshot).
    """
    dialect = session.get_bind().dialect.name
    count_stmt, page_stmt = _listing_statements(dialect, not viewer.admin, state is not None)
    params = {"owner_id": viewer.id, "state": state, "limit": limit, "offset": offset}
    connection = _connection(session)
    found = connection.execute(page_stmt, params).all()
    if not found:
        return [], {}, int(connection.execute(count_stmt, params).scalar_one())
    page = [(job_id, version) for _, job_id, version in found]
    missing = [job_id for job_id, version in page if (job_id, version) not in known]
    rows: dict[str, dict[str, Any]] = {}
    if missing:
        result = connection.execute(_rows_statement(dialect), {"ids": missing})
        keys = list(result.keys())
        for values in result.all():
            row = dict(zip(keys, values, strict=True))
            rows[row["id"]] = row
    return page, rows, int(found[0][0])


# What a listed job's row holds: JobPublic's fields, the JSON columns as their stored text.
_LISTED = (
    "id",
    "name",
    "priority",
    "idempotency_key",
    "state",
    "attempt",
    "max_attempts",
    "submission_id",
    "created_at",
    "updated_at",
    "started_at",
    "finished_at",
    "error",
    "mlflow_experiment_id",
    "mlflow_run_id",
    "spec_hash",
)
_TIMESTAMPS = frozenset({"created_at", "updated_at", "started_at", "finished_at"})


def _column(dialect: str, name: str) -> Any:
    """A job's column as a page reads it. On PostgreSQL timestamps are read as they come
    (sessions are in UTC, see service.db), without ``UTCDateTime``'s conversion of each."""
    if dialect == "postgresql" and name in _TIMESTAMPS:
        return type_coerce(_JOBS.c[name], DateTime(timezone=True)).label(name)
    return _JOBS.c[name]


@functools.cache
def _listing_statements(dialect: str, by_owner: bool, by_state: bool) -> tuple[Any, Any]:
    """The count and page statements of a listing (built once per kind of filter). The page
    reads ``(count, id, updated_at)`` of each job on it; the count comes from ``job_counts``,
    in the same statement: one round trip, one snapshot."""
    jobs, counts = _JOBS.c, _COUNTS.c
    where, counted = [], []
    if by_owner:
        where.append(jobs.owner_id == bindparam("owner_id"))
        counted.append(counts.owner_id == bindparam("owner_id"))
    if by_state:
        where.append(jobs.state == bindparam("state"))
        counted.append(counts.state == bindparam("state"))
    count = select(func.coalesce(func.sum(counts.n), 0)).where(*counted)
    page = (
        select(count.scalar_subquery().label("total"), jobs.id, _column(dialect, "updated_at"))
        .where(*where)
        .order_by(jobs.created_at.desc(), jobs.id.desc())
        .limit(bindparam("limit"))
        .offset(bindparam("offset"))
    )
    return count, page


@functools.cache
def _rows_statement(dialect: str) -> Any:
    """The listed rows of the jobs ``ids`` (an expanding parameter)."""
    return (
        select(
            *(_column(dialect, name) for name in _LISTED),
            _TOKENS.c.name.label("owner"),
            cast(_JOBS.c.progress, Text).label("progress"),
            cast(_JOBS.c.failures, Text).label("failures"),
            cast(_JOBS.c.spec, Text).label("spec"),
        )
        .select_from(_JOBS.join(_TOKENS, _TOKENS.c.id == _JOBS.c.owner_id))
        .where(_JOBS.c.id.in_(bindparam("ids", expanding=True)))
    )


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


def lock_row(session: Session, model: type[Token] | type[Job], row_id: object) -> None:
    """Lock ``row_id`` for the rest of the transaction with a no-op UPDATE (see service.db).

    On SQLite the session's current transaction is ended first, so the write lock is the first
    thing the new transaction takes; on PostgreSQL (READ COMMITTED: each statement sees what was
    committed before it) the lock joins the current transaction, one round trip less.
    """
    if session.get_bind().dialect.name == "sqlite":
        session.commit()
    session.execute(_lock_statement(model), {"row_id": row_id})


@functools.cache
def _lock_statement(model: type[Token] | type[Job]) -> Any:
    """The lock's Core UPDATE, built once per table (``onupdate`` columns still apply)."""
    table = cast_type(Table, model.__table__)
    return update(table).where(table.c.id == bindparam("row_id")).values(id=table.c.id)


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
