"""ORM rows to response models, and a page of jobs straight to JSON bytes."""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from typing import Any

from pydantic import TypeAdapter

from service.models import Job, JobState
from service.results import ResultsReader
from service.schemas import BestMetric, Failure, JobPublic, MlflowLinks, Progress

_JOB_PUBLIC: TypeAdapter[JobPublic] = TypeAdapter(JobPublic)
_JOB_LIST: TypeAdapter[list[JobPublic]] = TypeAdapter(list[JobPublic])
_PROGRESS: TypeAdapter[Progress] = TypeAdapter(Progress)
_FAILURES: TypeAdapter[list[Failure]] = TypeAdapter(list[Failure])
_NO_PROGRESS = Progress()  # read-only: shared by the rows with no progress yet
# Stands for a spec in a rendered page. Its key holds a control character, which JSON writes
# escaped (\u0000) inside any string, so its bytes appear nowhere else; the value is random.
_SPEC_MARK: dict[str, Any] = {"\x00spec": secrets.token_hex(16)}
_SPEC_MARK_JSON = TypeAdapter(dict[str, Any]).dump_json(_SPEC_MARK)


def job_public(job: Job, results: ResultsReader) -> JobPublic:
    """The job as its owner sees it."""
    progress = Progress.model_validate(job.progress or {})
    return JobPublic(
        id=job.id,
        name=job.name,
        owner=job.owner.name,
        priority=job.priority,
        idempotency_key=job.idempotency_key,
        state=JobState(job.state),
        attempt=job.attempt,
        max_attempts=job.max_attempts,
        submission_id=job.submission_id,
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        error=job.error,
        progress=progress,
        best_metric=BestMetric.model_validate(progress.best) if progress.best else None,
        mlflow=results.links(experiment_id=job.mlflow_experiment_id, run_id=job.mlflow_run_id),
        failures=[Failure.model_validate(f) for f in job.failures or []],
        spec_hash=job.spec_hash,
        spec=job.spec,
    )


def job_json(job: Job, results: ResultsReader) -> bytes:
    """``job_public(job, results)`` as JSON, the bytes FastAPI would send for it."""
    return _JOB_PUBLIC.dump_json(job_public(job, results))


def jobs_page_json(rows: Sequence[dict[str, Any]], count: int, results: ResultsReader) -> bytes:
    """``JobsPublic`` of a page of ``crud.list_jobs`` rows, as JSON, the specs passed through.

    What ``JobsPublic(data=[job_public(job, results) ...], count=count)`` serializes to (a test
    says so), at a fraction of the cost on a page of 100: the specs are not parsed but spliced
    in as the JSON text the store holds, and the rows (read from our own store, of the right
    types) become models without validation and are serialized in one call, a marker standing
    for each spec. A type that does not fit raises instead of being serialized loosely.
    """
    specs, models = [], []
    no_run = MlflowLinks.model_construct(**results.link_fields(experiment_id=None, run_id=None))
    for row in rows:
        specs.append(row["spec"].encode())
        text = row["progress"]
        progress = _NO_PROGRESS if text is None or text == "null" else _PROGRESS.validate_json(text)
        text = row["failures"]
        experiment_id, run_id = row["mlflow_experiment_id"], row["mlflow_run_id"]
        links = (
            no_run
            if experiment_id is None and run_id is None
            else MlflowLinks.model_construct(
                **results.link_fields(experiment_id=experiment_id, run_id=run_id)
            )
        )
        models.append(
            JobPublic.model_construct(
                id=row["id"],
                name=row["name"],
                owner=row["owner"],
                priority=row["priority"],
                idempotency_key=row["idempotency_key"],
                state=JobState(row["state"]),
                attempt=row["attempt"],
                max_attempts=row["max_attempts"],
                submission_id=row["submission_id"],
                created_at=row["created_at"],
                started_at=row["started_at"],
                finished_at=row["finished_at"],
                error=row["error"],
                progress=progress,
                best_metric=progress.best,
                mlflow=links,
                failures=[] if not text or text == "[]" else _FAILURES.validate_json(text),
                spec_hash=row["spec_hash"],
                spec=_SPEC_MARK,
            )
        )
    pieces = _JOB_LIST.dump_json(models, warnings="error").split(_SPEC_MARK_JSON)
    if len(pieces) != len(specs) + 1:  # cannot happen: the marker is in no other field
        raise RuntimeError("a page of jobs could not be rendered")
    data = [pieces[0]]
    for spec, piece in zip(specs, pieces[1:], strict=True):
        data += (spec, piece)
    return b"".join((b'{"data":', *data, b',"count":', str(count).encode(), b"}"))
