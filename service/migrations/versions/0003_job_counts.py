"""Job counts per owner and state, kept by triggers; the quota checked by the insert trigger.

``job_counts`` holds how many jobs each owner has in each state, spread over ``SHARDS`` rows
(the count is their sum). Triggers on ``jobs`` keep it exact on every insert, delete and change
of state or owner, whoever writes. A page of jobs reads its total there (a sum over a few rows,
not a count over all the owner's jobs), and a submission is one ``INSERT``: its trigger counts
the job and, when that takes the owner past the token's quota, raises ``fgd: quota exceeded``
and the insert is undone.

Submissions of one owner must not wait for each other's commits: a commit waits for its WAL to
reach the disk, and a row they all updated (one counter per owner) would line them up, one
flush each. So each submission takes one of ``SHARDS`` slots of its owner (a transaction-level
advisory lock, a free one if any) and counts itself in that slot's counter row; the others run
alongside in other slots. A submission that sees fewer unfinished jobs than the quota by at
least the number of slots is safe whatever the others in flight do (they hold the other slots,
``SHARDS - 1`` at most). Nearer the quota the trigger raises ``fgd: quota needs every slot``,
and ``service.crud`` submits again with ``fgd.quota_exclusive`` set: that insert takes every
slot of the owner, in order, then counts exactly. Slots are taken in one order and a fast
submission waits for a slot only while it holds none: no deadlock. Moves between states update
two counter rows (random shards), in (owner, state, shard) order. SQLite runs one writer at a
time and always counts exactly.

Revision ID: 0003_job_counts
Revises: 0002_queue_index
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003_job_counts"
down_revision = "0002_queue_index"
branch_labels = None
depends_on = None

SHARDS = 16  # service.models.QUOTA_SLOTS
_ACTIVE = "('QUEUED', 'DISPATCHED', 'RUNNING', 'CANCELLING')"  # models.ACTIVE_STATES

# Count ``delta`` jobs of OWNER in STATE in SHARD (inline in each trigger: PL/pgSQL keeps the
# plans of its own statements, not of the SQL functions it calls).
_PG_ADD = """
        INSERT INTO job_counts AS c (owner_id, state, shard, n) VALUES ({owner}, {state}, {shard}, {delta})
            ON CONFLICT (owner_id, state, shard) DO UPDATE SET n = c.n + excluded.n;"""


def _add(owner: str, state: str, shard: str, delta: int) -> str:
    return _PG_ADD.format(owner=owner, state=state, shard=shard, delta=delta)


_PG_MOVE = f"""
CREATE FUNCTION fgd_job_moved() RETURNS trigger
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    shards CONSTANT integer := {SHARDS};
    gone integer := floor(random() * shards);
    came integer := floor(random() * shards);
BEGIN
    IF TG_OP = 'DELETE' THEN{_add("OLD.owner_id", "OLD.state", "gone", -1)}
    ELSIF (NEW.owner_id, NEW.state, came) < (OLD.owner_id, OLD.state, gone) THEN{_add("NEW.owner_id", "NEW.state", "came", 1)}{_add("OLD.owner_id", "OLD.state", "gone", -1)}
    ELSE{_add("OLD.owner_id", "OLD.state", "gone", -1)}{_add("NEW.owner_id", "NEW.state", "came", 1)}
    END IF;
    RETURN NULL;
END
$$
"""

_PG_INSERT = f"""
CREATE FUNCTION fgd_job_inserted() RETURNS trigger
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    shards CONSTANT integer := {SHARDS};
    space integer := ('x' || substr(md5(current_schema() || '/fgd_quota'), 1, 8))::bit(32)::integer;
    exclusive boolean := coalesce(current_setting('fgd.quota_exclusive', true), '') = 'on';
    slot integer;
    first integer := floor(random() * shards);
    active bigint;
    allowed integer;
BEGIN
    IF NEW.state NOT IN {_ACTIVE} THEN{_add("NEW.owner_id", "NEW.state", "first", 1)}
        RETURN NULL;
    END IF;
    IF exclusive THEN  -- every slot, in order: no submission of this owner is in flight
        FOR i IN 0 .. shards - 1 LOOP
            PERFORM pg_advisory_xact_lock(space, NEW.owner_id * shards + i);
        END LOOP;
        slot := first;
    ELSE  -- a free slot if there is one, else wait for the first one tried
        FOR i IN 0 .. shards - 1 LOOP
            IF pg_try_advisory_xact_lock(space, NEW.owner_id * shards + (first + i) % shards) THEN
                slot := (first + i) % shards;
                EXIT;
            END IF;
        END LOOP;
        IF slot IS NULL THEN
            PERFORM pg_advisory_xact_lock(space, NEW.owner_id * shards + first);
            slot := first;
        END IF;
    END IF;
    {_add("NEW.owner_id", "NEW.state", "slot", 1).strip()}
    SELECT quota INTO allowed FROM tokens WHERE id = NEW.owner_id;
    SELECT coalesce(sum(n), 0) INTO active FROM job_counts
        WHERE owner_id = NEW.owner_id AND state IN {_ACTIVE};
    IF active > allowed THEN
        RAISE EXCEPTION 'fgd: quota exceeded (% unfinished jobs of % allowed)',
            active - 1, allowed USING ERRCODE = 'check_violation';
    END IF;
    IF NOT exclusive AND active + shards - 1 > allowed THEN
        RAISE EXCEPTION 'fgd: quota needs every slot (% unfinished jobs of % allowed)',
            active - 1, allowed USING ERRCODE = 'check_violation';
    END IF;
    RETURN NULL;
END
$$
"""

_PG_TRIGGERS = (
    "CREATE TRIGGER fgd_job_inserted AFTER INSERT ON jobs "
    "FOR EACH ROW EXECUTE FUNCTION fgd_job_inserted()",
    "CREATE TRIGGER fgd_job_deleted AFTER DELETE ON jobs "
    "FOR EACH ROW EXECUTE FUNCTION fgd_job_moved()",
    "CREATE TRIGGER fgd_job_moved AFTER UPDATE OF owner_id, state ON jobs "
    "FOR EACH ROW WHEN (OLD.owner_id IS DISTINCT FROM NEW.owner_id "
    "OR OLD.state IS DISTINCT FROM NEW.state) EXECUTE FUNCTION fgd_job_moved()",
)

_SQLITE_ADD = (
    "INSERT INTO job_counts (owner_id, state, shard, n) VALUES (NEW.owner_id, NEW.state, 0, 1) "
    "ON CONFLICT (owner_id, state, shard) DO UPDATE SET n = n + 1;"
)
_SQLITE_REMOVE = (
    "UPDATE job_counts SET n = n - 1 "
    "WHERE owner_id = OLD.owner_id AND state = OLD.state AND shard = 0;"
)
_SQLITE_TRIGGERS = (
    f"""CREATE TRIGGER fgd_job_inserted AFTER INSERT ON jobs BEGIN
    {_SQLITE_ADD}
    SELECT RAISE(ABORT, 'fgd: quota exceeded') WHERE NEW.state IN {_ACTIVE}
        AND (SELECT sum(n) FROM job_counts WHERE owner_id = NEW.owner_id AND state IN {_ACTIVE})
            > (SELECT quota FROM tokens WHERE id = NEW.owner_id);
END""",
    f"""CREATE TRIGGER fgd_job_moved AFTER UPDATE OF owner_id, state ON jobs
WHEN OLD.owner_id IS NOT NEW.owner_id OR OLD.state IS NOT NEW.state BEGIN
    {_SQLITE_REMOVE}
    {_SQLITE_ADD}
END""",
    f"""CREATE TRIGGER fgd_job_deleted AFTER DELETE ON jobs BEGIN
    {_SQLITE_REMOVE}
END""",
)


def upgrade() -> None:
    op.create_table(
        "job_counts",
        sa.Column(
            "owner_id",
            sa.Integer(),
            sa.ForeignKey("tokens.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("state", sa.String(16), primary_key=True),
        sa.Column("shard", sa.Integer(), primary_key=True),
        sa.Column("n", sa.Integer(), nullable=False),
    )
    dialect = op.get_bind().dialect.name
    if dialect == "postgresql":
        op.execute("LOCK TABLE jobs IN SHARE MODE")  # no job moves until the triggers exist
        for statement in (_PG_MOVE, _PG_INSERT, *_PG_TRIGGERS):
            op.execute(statement)
    elif dialect == "sqlite":
        for statement in _SQLITE_TRIGGERS:
            op.execute(statement)
    else:
        raise NotImplementedError("job counts need triggers, written for PostgreSQL and SQLite")
    op.execute(
        "INSERT INTO job_counts (owner_id, state, shard, n) "
        "SELECT owner_id, state, 0, count(*) FROM jobs GROUP BY owner_id, state"
    )


def downgrade() -> None:
    for name in ("fgd_job_inserted", "fgd_job_deleted", "fgd_job_moved"):
        op.execute(f"DROP TRIGGER {name} ON jobs" if _pg() else f"DROP TRIGGER {name}")
    if _pg():
        op.execute("DROP FUNCTION fgd_job_inserted()")
        op.execute("DROP FUNCTION fgd_job_moved()")
    op.drop_table("job_counts")


def _pg() -> bool:
    return op.get_bind().dialect.name == "postgresql"
