"""Liveness and readiness probes (no token needed)."""

from __future__ import annotations

from fastapi import APIRouter, status
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from service.api.deps import StoreDep

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is up (answered on the event loop: a busy thread pool does not delay it)."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "The database is not reachable."}})
async def readyz(store: StoreDep) -> JSONResponse:
    """The job store answers ``SELECT 1``."""
    try:
        await run_in_threadpool(store.ping)
    except Exception as exc:
        return JSONResponse(
            status_code=status.HTTP_503_SERVICE_UNAVAILABLE,
            content={"status": "unavailable", "detail": f"database: {type(exc).__name__}"},
        )
    return JSONResponse({"status": "ok", "database": store.dialect})
