"""Builds the FastAPI app: ``uvicorn service.main:app`` (settings from the environment).

Torch-free by design: this process imports ``workers.spec`` and friends, never ``fgd_core``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from service.api import errors
from service.api.main import api_router
from service.core.config import Settings, get_settings
from service.db import Store
from service.dispatch import Dispatcher, InProcessDispatcher
from service.results import ResultsReader

DESCRIPTION = """\
Knowledge distillation of object detectors with FGD, as a service: submit a JobSpec (maybe a
sweep), follow its state and logs, and read its trials and leaderboard back from MLflow.

Every route but `/healthz` and `/readyz` needs `Authorization: Bearer <token>`.
"""


def create_app(
    settings: Settings | None = None,
    *,
    store: Store | None = None,
    dispatcher: Dispatcher | None = None,
    results: ResultsReader | None = None,
    migrate: bool = True,
) -> FastAPI:
    """The app; pieces not given are built from ``settings``.

    Args:
        migrate: run ``alembic upgrade head`` on the store at start-up.
    """
    settings = settings or get_settings()
    owns_store = store is None
    store = store or Store.from_url(settings.DATABASE_URL)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if migrate:
            await run_in_threadpool(store.migrate)
        yield
        if owns_store:
            store.dispose()

    app = FastAPI(
        title="FGD service",
        description=DESCRIPTION,
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.store = store
    app.state.dispatcher = dispatcher or InProcessDispatcher()
    app.state.results = results or ResultsReader(tracking_uri=settings.MLFLOW_TRACKING_URI)
    errors.install(app, max_body_bytes=settings.MAX_BODY_BYTES)
    app.include_router(api_router)
    return app


app = create_app()
