"""SQLAlchemy models of the job store: tokens, jobs, job logs (same code on SQLite and PostgreSQL).

The schema itself is owned by the Alembic migrations in ``service/migrations``; a test checks
that they and these models agree.
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite keeps no zone: stored as UTC)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime; use datetime.now(UTC)")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class JobState(StrEnum):
    QUEUED = "QUEUED"  # stored, waiting for the dispatcher
    DISPATCHED = "DISPATCHED"  # submitted to Ray as a Ray Job, not yet running
    RUNNING = "RUNNING"
    CANCELLING = "CANCELLING"  # cancel asked while on Ray; the dispatcher stops it
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"


FINAL_STATES = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})
ACTIVE_STATES = frozenset(set(JobState) - FINAL_STATES)  # count against a token's quota


class Base(DeclarativeBase):
    pass


class Token(Base):
    """An API token: only its SHA-256 is stored (tokens are long random strings)."""

    __tablename__ = "tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(200))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    admin: Mapped[bool] = mapped_column(Boolean, default=False)
    quota: Mapped[int] = mapped_column(Integer)  # concurrent non-final jobs
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class Job(Base):
    """One submitted job (a JobSpec, maybe a sweep) and its life on Ray."""

    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("owner_id", "idempotency_key", name="uq_jobs_owner_idempotency_key"),
        Index("ix_jobs_owner_state_created", "owner_id", "state", "created_at"),
        Index("ix_jobs_owner_created", "owner_id", "created_at"),
        Index("ix_jobs_created", "created_at"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    owner_id: Mapped[int] = mapped_column(ForeignKey("tokens.id"))
    name: Mapped[str] = mapped_column(String(200))
    priority: Mapped[int] = mapped_column(Integer, default=0)
    idempotency_key: Mapped[str | None] = mapped_column(String(200), nullable=True)
    request_hash: Mapped[str] = mapped_column(String(64))  # canonical JobCreate body
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    spec_hash: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16), default=JobState.QUEUED)
    attempt: Mapped[int] = mapped_column(Integer, default=0)  # attempts dispatched so far
    max_attempts: Mapped[int] = mapped_column(Integer, default=2)
    submission_id: Mapped[str | None] = mapped_column(String(200), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)  # why it failed / stopped
    progress: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    mlflow_experiment_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    mlflow_run_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    failures: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)

    owner: Mapped[Token] = relationship(lazy="joined", innerjoin=True)

    @property
    def is_final(self) -> bool:
        return self.state in FINAL_STATES


# The dispatch queue's order (crud.queued_jobs: priority high to low, then oldest first): the
# next jobs are the index's first entries, however many are queued. Serves ``state = ...``
# and ``state IN (...)`` look-ups too.
Index("ix_jobs_queue", Job.state, Job.priority.desc(), Job.created_at, Job.id)


class JobCount(Base):
    """How many jobs each owner has in each state, the sum of ``QUOTA_SLOTS`` shards: kept by
    the database itself, by triggers on ``jobs`` (migration 0003), whatever writes the jobs.

    A page of jobs reads its total here instead of counting thousands of rows, and a
    submission checks its owner's quota here, in the same statement that inserts it: the
    insert trigger raises ``QUOTA_EXCEEDED`` when the owner's unfinished jobs would exceed the
    token's quota (and, on PostgreSQL, ``QUOTA_NEEDS_EVERY_SLOT`` near it: submit again with
    ``fgd.quota_exclusive`` set; see the migration).
    """

    __tablename__ = "job_counts"

    owner_id: Mapped[int] = mapped_column(
        ForeignKey("tokens.id", ondelete="CASCADE"), primary_key=True
    )
    state: Mapped[str] = mapped_column(String(16), primary_key=True)
    shard: Mapped[int] = mapped_column(Integer, primary_key=True)
    n: Mapped[int] = mapped_column(Integer)


QUOTA_SLOTS = 16  # submissions of one owner in flight at once without waiting (PostgreSQL)
QUOTA_EXCEEDED = "fgd: quota exceeded"  # the insert trigger's errors
QUOTA_NEEDS_EVERY_SLOT = "fgd: quota needs every slot"


class JobLog(Base):
    """A chunk of a job's log, copied out of Ray; ``id`` orders chunks across attempts."""

    __tablename__ = "job_logs"
    __table_args__ = (
        UniqueConstraint("job_id", "attempt", "seq", name="uq_job_logs_job_attempt_seq"),
        Index("ix_job_logs_job_id", "job_id", "id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    attempt: Mapped[int] = mapped_column(Integer)
    seq: Mapped[int] = mapped_column(Integer)
    text: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
