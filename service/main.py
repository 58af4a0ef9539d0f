"""Builds the FastAPI app: ``uvicorn service.main:app`` (settings from the environment).

Torch-free by design: this process imports ``workers.spec`` and friends, never ``fgd_core``.
"""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from anyio import to_thread
from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from service.api import errors
from service.api.main import api_router
from service.api.views import JobsRenderer
from service.auth import TokenCache
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
    dispatch_loop: bool | None = None,
) -> FastAPI:
    """The app; pieces not given are built from ``settings``.

    Args:
        migrate: run ``alembic upgrade head`` on the store at start-up.
        dispatch_loop: run the dispatch loop (``service.loop``) while the app runs; default
            when ``settings`` dispatch to Ray, whose dispatcher is then the default one.
    """
    settings = settings or get_settings()
    owns_store = store is None
    store = store or Store.from_url(settings.DATABASE_URL)
    results = results or ResultsReader(tracking_uri=settings.MLFLOW_TRACKING_URI)
    if dispatcher is None and settings.dispatch_to_ray:
        from service.loop import bound_mlflow_retries, ray_dispatcher

        bound_mlflow_retries()
        dispatcher = ray_dispatcher(settings, results)
    dispatcher = dispatcher or InProcessDispatcher()
    run_loop = settings.dispatch_to_ray if dispatch_loop is None else dispatch_loop

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Sync routes and dependencies run on this many threads (anyio's default is 40). The
        # event loop that parses and answers every request shares the GIL with them: more
        # threads than the store has connections only wait, and take turns from the loop.
        to_thread.current_default_thread_limiter().total_tokens = settings.THREADS
        if migrate:
            await run_in_threadpool(store.migrate)
        loop = None
        if run_loop:
            from service.loop import DispatchLoop

            preload = getattr(dispatcher, "preload", None)  # before the app takes requests
            if preload is not None:
                await run_in_threadpool(preload)

            loop = DispatchLoop(
                store=store,
                dispatcher=dispatcher,
                max_concurrent=settings.MAX_CONCURRENT_JOBS,
                interval=settings.DISPATCH_INTERVAL,
                results=results,
                fail_unfit=settings.UNFIT_JOBS == "fail",
            )
            loop.start()
        app.state.dispatch_loop = loop
        # What is alive once the app has started (modules, settings, the store, ~100,000
        # objects) lives as long as the process: move it out of the cyclic collector's reach.
        # A full collection would otherwise walk all of it, holding the GIL (~100 ms here),
        # every so often under load: the requests of that moment wait for it.
        gc.collect()
        gc.freeze()
        try:
            yield
        finally:
            gc.unfreeze()
            if loop is not None:
                await loop.stop()
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
    app.state.dispatcher = dispatcher
    app.state.results = results
    app.state.tokens = TokenCache(store, settings.TOKEN_CACHE_SECONDS)
    app.state.jobs_renderer = JobsRenderer(results)
    errors.install(app, max_body_bytes=settings.MAX_BODY_BYTES)
    app.include_router(api_router)
    return app


app = create_app()
