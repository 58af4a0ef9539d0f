"""What routes get injected: the store's session, the dispatcher, MLflow results, the caller.

Dependencies that only read ``app.state`` are ``async def``: FastAPI runs a plain ``def``
dependency in a worker thread, and each such hop costs a thread handoff (and, under load, a
wait for the GIL) on every request. Only what touches the database runs in a thread.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from service import crud
from service.auth import TokenCache
from service.core.config import Settings
from service.db import Store
from service.dispatch import Dispatcher
from service.models import Job, Token
from service.results import ResultsReader

bearer = HTTPBearer(
    auto_error=False,
    description="An API token from `fgd token create` (or service.cli_tokens.create).",
)


async def get_store(request: Request) -> Store:
    return request.app.state.store


async def get_session(store: Annotated[Store, Depends(get_store)]) -> AsyncIterator[Session]:
    """A session for the request (opening one does no I/O); closed after the response, in a
    worker thread when it still holds a connection (closing rolls back what was not committed).
    """
    session = store.sessions()
    try:
        yield session
    finally:
        if session.get_transaction() is None:
            session.close()  # no connection: nothing to wait for
        else:
            await run_in_threadpool(session.close)


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_dispatcher(request: Request) -> Dispatcher:
    return request.app.state.dispatcher


async def get_results(request: Request) -> ResultsReader:
    return request.app.state.results


def _release(session: Session) -> None:
    """End a dependency's read, so its connection goes back to the pool before the next step.

    Each ``def`` dependency and the route run as separate hops to the thread pool. A
    connection held between hops waits for a free thread, while every thread may be waiting for
    a connection: under load the pool and the threads would starve each other (until the pool's
    timeout). Read rows stay loaded (``expire_on_commit=False``).
    """
    session.commit()


StoreDep = Annotated[Store, Depends(get_store)]
SessionDep = Annotated[Session, Depends(get_session)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
DispatcherDep = Annotated[Dispatcher, Depends(get_dispatcher)]
ResultsDep = Annotated[ResultsReader, Depends(get_results)]


async def get_current_token(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> Token:
    """The caller's token; 401 with ``WWW-Authenticate: Bearer`` when missing or unknown.

    A token seen in the last few seconds comes from the process's cache (``TokenCache``)
    without leaving the event loop; any other is looked up in the store on a worker thread.
    """
    if credentials is None:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            detail="missing bearer token: send 'Authorization: Bearer <token>'",
            headers={"WWW-Authenticate": "Bearer"},
        )
    tokens: TokenCache = request.app.state.tokens
    token = tokens.cached(credentials.credentials)
    if token is None:
        token = await run_in_threadpool(tokens.verify, credentials.credentials)
    if token is None:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            detail="invalid or revoked token",
            headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
        )
    return token


CurrentToken = Annotated[Token, Depends(get_current_token)]


def get_visible_job(job_id: str, session: SessionDep, token: CurrentToken) -> Job:
    """The job ``job_id`` if the caller may see it; 404 otherwise (even if it exists)."""
    job = crud.get_job(session=session, job_id=job_id, viewer=token)
    _release(session)
    if job is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"no job {job_id!r}")
    return job


VisibleJob = Annotated[Job, Depends(get_visible_job)]
