"""Engine, sessions and migrations of the job store.

SQLite (the embedded default) runs in WAL mode with pysqlite's own transaction handling: a
SELECT holds no lock, a transaction begins at the first write. Writers that must not race
(a cancel, failing a queued job) start with a no-op ``UPDATE`` of the row they guard
(``service.crud.lock_row``): on SQLite that takes the database write lock before anything is
read (waiting up to busy_timeout, never failing on a stale snapshot); on PostgreSQL (READ
COMMITTED) it locks that row. The same code serializes on both. A submission needs no such
lock: its one ``INSERT`` counts the job and checks the quota in the database's own trigger
(migration 0003).
"""

from __future__ import annotations

import contextlib
import fcntl
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
_MIGRATION_LOCK = 7_261_451  # pg_advisory_xact_lock key: one migrator at a time
POOL_SIZE = 10  # connections kept open per API process (PostgreSQL)
POOL_OVERFLOW = 10  # more, opened under a burst and closed after: 20 at most per process


def make_engine(url: str, *, connect_timeout: float = 5.0) -> Engine:
    """An engine for ``url`` (SQLite file or PostgreSQL via psycopg 3)."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database
        if database and database != ":memory:" and not database.startswith("file:"):
            Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url, connect_args={"check_same_thread": False, "timeout": connect_timeout + 25}
        )
        event.listen(engine, "connect", _sqlite_connect)
        return engine
    connect_args: dict[str, Any] = {}
    if parsed.get_backend_name() == "postgresql":
        connect_args["connect_timeout"] = max(1, int(connect_timeout))
        # Sessions in UTC: timestamps come back in UTC, as the API shows them, with nothing
        # to convert (a page of jobs reads hundreds). Options in the URL are kept.
        options = parsed.query.get("options", "")
        options = " ".join(options) if isinstance(options, tuple) else options
        connect_args["options"] = f"{options} -c TimeZone=UTC".strip()
    # A request holds a connection only while one of its steps runs on a worker thread (see
    # service.api.deps), so a few per process serve many requests; past POOL_SIZE + POOL_OVERFLOW
    # a step waits for one. Twice SQLAlchemy's default pool: a busy API does not open and close
    # them by the hundred (each a new PostgreSQL backend), and a few workers stay well within
    # PostgreSQL's default max_connections (100).
    return create_engine(
        url,
        pool_pre_ping=True,
        pool_size=POOL_SIZE,
        max_overflow=POOL_OVERFLOW,
        connect_args=connect_args,
    )


def _sqlite_connect(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


class Store:
    """The job store: one engine and its session factory (injected into routes by deps)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.sessions = sessionmaker(engine, expire_on_commit=False)

    @classmethod
    def from_url(cls, url: str) -> Store:
        return cls(make_engine(url))

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session, rolled back if the block raises; commit explicitly."""
        with self.sessions() as session:
            try:
                yield session
            except BaseException:
                session.rollback()
                raise

    def ping(self) -> None:
        """``SELECT 1``; raises when the database is unreachable."""
        with self.engine.connect() as conn:
            conn.execute(text("SELECT 1"))

    def migrate(self) -> None:
        """``alembic upgrade head`` on this engine (serialized across processes on PostgreSQL)."""
        migrate(self.engine)

    def dispose(self) -> None:
        self.engine.dispose()


_PG_TRY_LOCK = (
    "SELECT pg_try_advisory_lock(('x' || substr(md5("
    "current_schema() || '/' || %s), 1, 16))::bit(64)::bigint)"
)


class LeaderLock:
    """At most one holder among all processes on the store (one dispatch loop per service,
    however many API workers run it).

    PostgreSQL: a session-level advisory lock on a connection of its own, taken off the pool
    (it dies with the process, and so does the lock). SQLite: an exclusive ``flock`` on a file
    beside the database; an in-memory database has one process, which always holds it.
    ``acquire`` never blocks: call it again each tick, the follower takes over once the holder
    is gone, and a holder whose connection broke learns that it holds nothing.
    """

    def __init__(self, store: Store, name: str) -> None:
        self.store, self.name = store, name
        self._conn: Any = None  # PostgreSQL: the DBAPI connection holding the lock
        self._file: Any = None  # SQLite: the open, locked file
        self.held = False

    def acquire(self) -> bool:
        """Whether this process holds the lock now (taking it if free)."""
        if self.store.dialect == "postgresql":
            self.held = self._acquire_pg()
        elif self.store.dialect == "sqlite":
            self.held = self._acquire_file()
        else:
            self.held = True
        return self.held

    def release(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()  # the session ends, and its advisory lock with it
            self._conn = None
        if self._file is not None:
            self._file.close()  # closing the file drops the flock
            self._file = None
        self.held = False

    def _acquire_pg(self) -> bool:
        if self._conn is not None:
            try:  # still ours while the connection lives
                self._query("SELECT 1")
                return True
            except Exception:
                self.release()
        fairy = self.store.engine.raw_connection()
        fairy.detach()  # never handed back to the pool with the lock on it
        self._conn = fairy.dbapi_connection
        try:
            self._conn.rollback()
            # Advisory locks are per database: the key names the schema too (tests and
            # services may share a database, one schema each).
            got = bool(self._query(_PG_TRY_LOCK, self.name))
        except Exception:
            self.release()
            raise
        if not got:
            self.release()
        return got

    def _query(self, sql: str, *params: object) -> Any:
        """One value, the transaction ended at once (the lock is the session's, not its)."""
        with self._conn.cursor() as cur:
            cur.execute(sql, params)
            row = cur.fetchone()
        self._conn.commit()
        return row[0] if row else None

    def _acquire_file(self) -> bool:
        if self._file is not None:
            return True
        database = self.store.engine.url.database
        if not database or database == ":memory:" or database.startswith("file:"):
            return True
        path = Path(database).expanduser().with_name(Path(database).name + f".{self.name}.lock")
        handle = path.open("a")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            return False
        self._file = handle
        return True


def alembic_config() -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    return cfg


def migrate(engine: Engine, revision: str = "head") -> None:
    """Upgrade the schema to ``revision`` programmatically (no alembic.ini needed)."""
    cfg = alembic_config()
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text(f"SELECT pg_advisory_xact_lock({_MIGRATION_LOCK})"))
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)
