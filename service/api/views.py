"""ORM rows to response models."""

from __future__ import annotations

from service.models import Job, JobState
from service.results import ResultsReader
from service.schemas import BestMetric, Failure, JobPublic, Progress


def job_public(job: Job, results: ResultsReader) -> JobPublic:
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
