"""Alembic environment: runs on the connection handed in by ``service.db.migrate``.

Standalone use (``alembic -c ... upgrade head``) falls back to ``FGD_DATABASE_URL``.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy.engine import Connection

from service.models import Base

target_metadata = Base.metadata


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",  # ALTER via table copies
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


connection = context.config.attributes.get("connection")
if connection is not None:
    _run(connection)
else:
    from service.core.config import Settings
    from service.db import make_engine

    engine = make_engine(Settings().DATABASE_URL)
    with engine.begin() as conn:
        _run(conn)
    engine.dispose()
