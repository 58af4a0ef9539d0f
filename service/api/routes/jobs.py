"""Jobs: submit, list, read, cancel."""

from __future__ import annotations

import logging
from typing import Annotated, Any

from fastapi import APIRouter, Body, HTTPException, Query, Request, Response, status

from service import crud
from service.api.deps import (
    CurrentToken,
    DispatcherDep,
    ResultsDep,
    SessionDep,
    VisibleJob,
)
from service.api.errors import ErrorPublic, ValidationErrorPublic, validation_error
from service.api.views import JobsRenderer, job_json, job_public
from service.models import JobState
from service.schemas import EXAMPLE_JOB, CancelPublic, JobCreate, JobPublic, JobsPublic
from service.validation import PathNotAllowed, check_data_paths

log = logging.getLogger(__name__)
router = APIRouter(prefix="/jobs", tags=["jobs"])

AUTH_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorPublic, "description": "No token, or an unknown one."},
}
NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorPublic, "description": "No such job among yours."},
}

# The request body's example in the OpenAPI schema (Swagger's "Try it out").
SUBMIT_EXAMPLES = {
    "shapes-sweep": {
        "summary": "A small FGD sweep on generated shapes data (about two minutes on 2 CPUs)",
        "description": "A ResNet-34 teacher is trained first, then four ResNet-18 students "
        "search alpha and the temperature under ASHA; `fgd sweep --example` prints the spec.",
        "value": EXAMPLE_JOB,
    }
}


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=JobPublic,
    responses={
        **AUTH_ERRORS,
        200: {"model": JobPublic, "description": "Same idempotency key and body: the stored job."},
        409: {"model": ErrorPublic, "description": "Idempotency key reused with another body."},
        413: {"model": ErrorPublic, "description": "Body larger than FGD_MAX_BODY_BYTES."},
        422: {"model": ValidationErrorPublic, "description": "Invalid spec; names the field."},
        429: {"model": ErrorPublic, "description": "Too many unfinished jobs for this token."},
    },
)
def submit_job(
    job_in: Annotated[JobCreate, Body(openapi_examples=SUBMIT_EXAMPLES)],
    request: Request,
    token: CurrentToken,
) -> Response:
    """Queue a job. Data paths (COCO files, shapes root, teacher checkpoint) must lie under
    the service's data roots."""
    # The busiest routes read the app's parts off ``request`` rather than as dependencies:
    # each dependency FastAPI resolves costs about what a round trip to the database does.
    app = request.app.state
    try:
        check_data_paths(job_in.spec, app.settings.DATA_ROOTS)
    except PathNotAllowed as exc:
        raise validation_error(("body", *exc.loc), str(exc), "path_not_allowed") from None
    with app.store.sessions() as session:
        try:
            job, created = crud.create_job(session=session, owner=token, job_in=job_in)
        except crud.IdempotencyConflict as exc:
            raise HTTPException(status.HTTP_409_CONFLICT, detail=str(exc)) from None
        except crud.QuotaExceeded as exc:
            raise HTTPException(status.HTTP_429_TOO_MANY_REQUESTS, detail=str(exc)) from None
    code = status.HTTP_201_CREATED if created else status.HTTP_200_OK
    # A JobPublic, serialized in this worker thread (a returned model would take another hop).
    return Response(job_json(job, app.results), status_code=code, media_type="application/json")


@router.get("", response_model=JobsPublic, responses=AUTH_ERRORS)
def list_jobs(
    request: Request,
    token: CurrentToken,
    state: Annotated[JobState | None, Query(description="Only jobs in this state.")] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> Response:
    """Your jobs, newest first (an admin token sees everyone's)."""
    app = request.app.state  # as in submit_job
    renderer: JobsRenderer = app.jobs_renderer
    body = None
    with app.store.sessions() as session:
        for known in (renderer, ()):  # a second read only if a kept piece was dropped meanwhile
            page, rows, count = crud.list_jobs(
                session=session, viewer=token, state=state, limit=limit, offset=offset, known=known
            )
            body = renderer.page(page, rows, count)
            if body is not None:
                break
    assert body is not None  # the second read renders every row it returns
    return Response(body, media_type="application/json")


@router.get("/{job_id}", response_model=JobPublic, responses={**AUTH_ERRORS, **NOT_FOUND})
def read_job(job: VisibleJob, results: ResultsDep) -> JobPublic:
    """State, timestamps, progress, best metric so far and MLflow links of one job."""
    return job_public(job, results)


@router.post(
    "/{job_id}/cancel",
    response_model=CancelPublic,
    responses={
        **AUTH_ERRORS,
        **NOT_FOUND,
        409: {"model": ErrorPublic, "description": "The job already finished."},
    },
)
def cancel_job(job: VisibleJob, session: SessionDep, dispatcher: DispatcherDep) -> CancelPublic:
    """Cancel a job: a queued one at once (CANCELLED), one on Ray is stopped (CANCELLING)."""
    try:
        job = crud.request_cancel(session=session, job=job)
    except crud.InvalidTransition:
        raise HTTPException(
            status.HTTP_409_CONFLICT, detail=f"job {job.id} already finished ({job.state})"
        ) from None
    message = "cancelled"
    if job.state == JobState.CANCELLING:
        message = "stopping on the cluster"
        if job.submission_id:
            try:
                dispatcher.stop(job.submission_id)
            except Exception:  # the dispatch loop retries stops of CANCELLING jobs
                log.exception("stop of %s failed; will retry", job.submission_id)
    return CancelPublic(id=job.id, state=JobState(job.state), message=message)
