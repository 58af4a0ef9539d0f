"""Job logs: the stored text, or a server-sent event stream that follows it until the job ends."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Annotated

import anyio
from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import PlainTextResponse, Response, StreamingResponse
from fastapi.sse import KEEPALIVE_COMMENT, format_sse_event
from starlette.concurrency import run_in_threadpool

from service import crud
from service.api.deps import SessionDep, SettingsDep, StoreDep, VisibleJob
from service.api.routes.jobs import AUTH_ERRORS, NOT_FOUND
from service.db import Store
from service.models import FINAL_STATES, Job, JobLog

router = APIRouter(prefix="/jobs", tags=["logs"])
KEEPALIVE_SECONDS = 15.0
_BATCH = 500


@router.get(
    "/{job_id}/logs",
    response_class=PlainTextResponse,
    response_model=None,
    responses={
        **AUTH_ERRORS,
        **NOT_FOUND,
        200: {
            "description": "The log text; with follow=true an event stream: `log` events (data: "
            'a chunk, id: its cursor) until one `end` event (data: {"state": ...}).',
            "content": {"text/plain": {}, "text/event-stream": {}},
        },
    },
)
def read_logs(
    job: VisibleJob,
    request: Request,
    session: SessionDep,
    store: StoreDep,
    settings: SettingsDep,
    follow: Annotated[bool, Query(description="Stream new chunks until the job ends.")] = False,
    after: Annotated[int, Query(ge=0, description="Only chunks after this cursor.")] = 0,
    last_event_id: Annotated[str | None, Header(include_in_schema=False)] = None,
) -> Response:
    """The log of a job as copied out of Ray (all attempts, in order)."""
    if not follow:
        chunks = crud.read_logs(session=session, job_id=job.id, after_id=after, limit=100_000)
        cursor = chunks[-1].id if chunks else after
        return PlainTextResponse(
            "".join(c.text for c in chunks), headers={"X-Log-Cursor": str(cursor)}
        )
    if last_event_id and last_event_id.isdigit():  # a reconnecting EventSource resumes
        after = max(after, int(last_event_id))
    job_id = job.id
    session.close()  # hold no transaction while streaming
    stream = _follow(request, store, job_id, after, settings.LOG_POLL_SECONDS)
    return StreamingResponse(
        stream,
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


def _poll(store: Store, job_id: str, after: int) -> tuple[list[JobLog], str]:
    with store.session() as session:
        job = session.get(Job, job_id)
        state = job.state if job is not None else "CANCELLED"  # deleted: end the stream
        # State first: chunks stored before a job ends are then all read below.
        chunks = crud.read_logs(session=session, job_id=job_id, after_id=after, limit=_BATCH)
        return chunks, state


async def _follow(
    request: Request, store: Store, job_id: str, after: int, poll_seconds: float
) -> AsyncIterator[bytes]:
    last_sent = time.monotonic()
    while True:
        chunks, state = await run_in_threadpool(_poll, store, job_id, after)
        for chunk in chunks:
            yield format_sse_event(data_str=chunk.text, event="log", id=str(chunk.id))
            after = chunk.id
        if chunks:
            last_sent = time.monotonic()
            if len(chunks) == _BATCH:
                continue
        if not chunks and state in FINAL_STATES:
            yield format_sse_event(data_str=json.dumps({"state": state}), event="end")
            return
        if await request.is_disconnected():
            return
        if time.monotonic() - last_sent > KEEPALIVE_SECONDS:
            yield KEEPALIVE_COMMENT
            last_sent = time.monotonic()
        await anyio.sleep(poll_seconds)
