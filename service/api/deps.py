"""What routes get injected: the store's session, the dispatcher, MLflow results, the caller."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from service import crud
from service.auth import verify_token
from service.core.config import Settings
from service.db import Store
from service.dispatch import Dispatcher
from service.models import Job, Token
from service.results import ResultsReader

bearer = HTTPBearer(
    auto_error=False,
    description="An API token from `fgd token create` (or service.cli_tokens.create).",
)


def get_store(request: Request) -> Store:
    return request.app.state.store


def get_session(store: Annotated[Store, Depends(get_store)]) -> Iterator[Session]:
    with store.session() as session:
        yield session


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_dispatcher(request: Request) -> Dispatcher:
    return request.app.state.dispatcher


def get_results(request: Request) -> ResultsReader:
    return request.app.state.results


StoreDep = Annotated[Store, Depends(get_store)]
SessionDep = Annotated[Session, Depends(get_session)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
DispatcherDep = Annotated[Dispatcher, Depends(get_dispatcher)]
ResultsDep = Annotated[ResultsReader, Depends(get_results)]


def get_current_token(
    session: SessionDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> Token:
    """The caller's token; 401 with ``WWW-Authenticate: Bearer`` when missing or unknown."""
    if credentials is None:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            detail="missing bearer token: send 'Authorization: Bearer <token>'",
            headers={"WWW-Authenticate": "Bearer"},
        )
    token = verify_token(session, credentials.credentials)
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
    if job is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"no job {job_id!r}")
    return job


VisibleJob = Annotated[Job, Depends(get_visible_job)]
