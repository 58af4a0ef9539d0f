"""The dispatch queue's order as an index: state, priority high to low, then oldest first.

Replaces ``ix_jobs_state_priority_created`` (state, priority, created_at), whose ascending
priority made every dispatch pass sort all queued jobs to find the next few.

Revision ID: 0002_queue_index
Revises: 0001_initial
Create Date: 2025-06-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002_queue_index"
down_revision = "0001_initial"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index(
        "ix_jobs_queue",
        "jobs",
        ["state", sa.text("priority DESC"), "created_at", "id"],
    )
    op.drop_index("ix_jobs_state_priority_created", table_name="jobs")


def downgrade() -> None:
    op.create_index("ix_jobs_state_priority_created", "jobs", ["state", "priority", "created_at"])
    op.drop_index("ix_jobs_queue", table_name="jobs")
