"""Token commands for the ``fgd`` CLI (``fgd token create``): no printing, values returned."""

from __future__ import annotations

from service.auth import create_token
from service.core.config import Settings
from service.db import Store


def create(
    name: str, *, admin: bool = False, quota: int | None = None, database_url: str | None = None
) -> str:
    """Create a token in the service's store (migrated first); return the plain token.

    Args:
        name: who or what the token is for (shown in job listings).
        admin: an admin token sees and cancels every job.
        quota: concurrent non-final jobs allowed; default ``FGD_DEFAULT_QUOTA``.
        database_url: default ``FGD_DATABASE_URL`` (SQLite under ``$FGD_HOME/service``).
    """
    settings = Settings()
    store = Store.from_url(database_url or settings.DATABASE_URL)
    try:
        store.migrate()
        with store.session() as session:
            plain, _ = create_token(
                session, name, admin=admin, quota=quota or settings.DEFAULT_QUOTA
            )
        return plain
    finally:
        store.dispose()
