"""Results read from MLflow: a job's trials, its leaderboard, and several jobs side by side."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, status

from service import crud
from service.api.deps import CurrentToken, ResultsDep, SessionDep, VisibleJob
from service.api.errors import ErrorPublic
from service.api.routes.jobs import AUTH_ERRORS, NOT_FOUND
from service.models import FINAL_STATES, Job, JobState
from service.report import read_report
from service.results import ResultsReader, ResultsUnavailable, metric_of
from service.schemas import CompareEntry, ComparePublic, LeaderboardRow, ResultsPublic, TrialPublic

router = APIRouter(tags=["results"])
UNAVAILABLE: dict[int | str, dict] = {
    503: {"model": ErrorPublic, "description": "MLflow is not configured or not reachable."},
}


def _ranked(job: Job, results: ResultsReader) -> list[LeaderboardRow]:
    if not job.mlflow_run_id or not job.mlflow_experiment_id:
        return []
    metric, mode = metric_of(job.spec)
    try:
        return results.leaderboard(
            experiment_id=job.mlflow_experiment_id,
            parent_run_id=job.mlflow_run_id,
            metric=metric,
            mode=mode,
        )
    except ResultsUnavailable as exc:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, detail=str(exc)) from None


@router.get(
    "/jobs/{job_id}/trials",
    response_model=list[TrialPublic],
    responses={**AUTH_ERRORS, **NOT_FOUND, **UNAVAILABLE},
)
def list_trials(job: VisibleJob, results: ResultsDep) -> list[TrialPublic]:
    """The job's trials (nested MLflow runs): params, status, latest metrics; [] before any."""
    if not job.mlflow_run_id or not job.mlflow_experiment_id:
        return []
    try:
        return results.trials(
            experiment_id=job.mlflow_experiment_id, parent_run_id=job.mlflow_run_id
        )
    except ResultsUnavailable as exc:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, detail=str(exc)) from None


@router.get(
    "/jobs/{job_id}/results",
    response_model=ResultsPublic,
    responses={**AUTH_ERRORS, **UNAVAILABLE, 404: {"model": ErrorPublic}},
)
def read_results(job: VisibleJob, results: ResultsDep) -> ResultsPublic:
    """The leaderboard: trials ranked by the sweep metric, and the distillation report when the
    job trained baseline and FGD students side by side. 404 until the job has finished with at
    least one trial."""
    if job.state not in FINAL_STATES:
        raise HTTPException(
            status.HTTP_404_NOT_FOUND,
            detail=f"job {job.id} is {job.state}; results come once it has finished",
        )
    rows = _ranked(job, results)
    if not rows:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"job {job.id} has no trials")
    metric, mode = metric_of(job.spec)
    assert job.mlflow_run_id is not None  # rows come from its nested runs
    try:
        report = read_report(results, parent_run_id=job.mlflow_run_id)
    except ResultsUnavailable as exc:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, detail=str(exc)) from None
    return ResultsPublic(job_id=job.id, metric=metric, mode=mode, rows=rows, report=report)


@router.get(
    "/compare",
    response_model=ComparePublic,
    responses={**AUTH_ERRORS, **UNAVAILABLE, 404: {"model": ErrorPublic}},
)
def compare_jobs(
    session: SessionDep,
    token: CurrentToken,
    results: ResultsDep,
    job: Annotated[list[str], Query(min_length=1, max_length=20, description="Job ids.")],
) -> ComparePublic:
    """The best trial of each job, side by side (each ranked by its own metric)."""
    entries = []
    for job_id in dict.fromkeys(job):
        found = crud.get_job(session=session, job_id=job_id, viewer=token)
        if found is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"no job {job_id!r}")
        rows = _ranked(found, results)
        metric, mode = metric_of(found.spec)
        entries.append(
            CompareEntry(
                job_id=found.id,
                name=found.name,
                state=JobState(found.state),
                metric=metric,
                mode=mode,
                best=rows[0] if rows and rows[0].rank is not None else None,
                trials=len(rows),
            )
        )
    return ComparePublic(jobs=entries)
