"""The dispatch loop's one pass: Ray's view of each job → the store, queued jobs → Ray.

Works against any ``Dispatcher`` (``service.dispatch``); the Ray dispatcher plugs in unchanged.
A pass is idempotent and safe to repeat after a crash: submission ids are deterministic, so a
job submitted but not yet marked DISPATCHED is submitted again under the same id.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from pydantic import ValidationError
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from service import crud
from service.db import Store
from service.dispatch import Dispatcher, DispatchState, JobSubmission, trial_resources
from service.models import Job, JobLog, JobState
from service.results import ResultsReader, ResultsUnavailable, metric_of, progress_of
from workers.spec import JobSpec

log = logging.getLogger(__name__)
D = DispatchState
Locate = Callable[[str], tuple[str, str] | None]  # job id -> (MLflow experiment id, run id)


@dataclass
class PassReport:
    submitted: list[str] = field(default_factory=list)  # job ids
    finished: list[str] = field(default_factory=list)
    requeued: list[str] = field(default_factory=list)
    waiting_for_resources: list[str] = field(default_factory=list)


def dispatch_once(
    *,
    store: Store,
    dispatcher: Dispatcher,
    max_concurrent: int,
    results: ResultsReader | None = None,
    locate: Locate | None = None,
    fail_unfit: bool = False,
) -> PassReport:
    """Watch the jobs on Ray, then submit queued ones while fewer than ``max_concurrent`` run.

    Args:
        locate: finds a job's MLflow parent run (stored once, then progress is read from it).
        fail_unfit: a job no node of the cluster can ever run fails at once (else it waits,
            for a cluster that may still grow).
    """
    report = PassReport()
    with store.session() as session:
        for job in crud.jobs_on_ray(session=session):
            try:
                _watch(session, dispatcher, job, report, results, locate)
            except Exception:  # one bad job must not stall the others
                session.rollback()
                log.exception("watching job %s failed", job.id)
        free = max_concurrent - len(crud.jobs_on_ray(session=session))
        if free <= 0:
            return report
        for job in crud.queued_jobs(session=session, limit=free):
            try:
                spec = JobSpec.model_validate(job.spec)
            except ValidationError as exc:  # stored under an older spec model, say
                reason = f"the stored spec is no longer a valid JobSpec: {_short(exc)}"
                _fail_queued(session, job, reason, report)
                continue
            submission = JobSubmission(
                job_id=job.id,
                attempt=job.attempt + 1,
                name=job.name,
                spec=job.spec,
                resources=trial_resources(spec),
                metadata={"fgd_job_id": job.id, "fgd_owner": job.owner.name},
            )
            if not dispatcher.cluster_can_fit(submission.resources):
                if fail_unfit:
                    _fail_queued(session, job, _unfit_reason(dispatcher, submission), report)
                else:
                    report.waiting_for_resources.append(job.id)
                continue
            sid = dispatcher.submit(submission)
            crud.mark_dispatched(session=session, job=job, submission_id=sid)
            report.submitted.append(job.id)
    return report


def _fail_queued(session: Session, job: Job, reason: str, report: PassReport) -> None:
    """A job that can never run fails straight from QUEUED (unless cancelled meanwhile)."""
    try:
        crud.fail_queued(session=session, job=job, reason=reason)
    except crud.InvalidTransition:
        log.info("job %s left the queue before it could be failed: %s", job.id, reason)
        return
    report.finished.append(job.id)


def _short(exc: ValidationError, limit: int = 2_000) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _watch(
    session: Session,
    dispatcher: Dispatcher,
    job: Job,
    report: PassReport,
    results: ResultsReader | None,
    locate: Locate | None = None,
) -> None:
    sid = job.submission_id
    if sid is None:  # CANCELLING before it was ever submitted cannot happen; be safe
        crud.mark_finished(session=session, job=job, state=JobState.CANCELLED)
        return
    try:
        state, message = dispatcher.status(sid)
    except KeyError as exc:
        if job.state == JobState.CANCELLING:  # nothing left to stop
            crud.mark_finished(session=session, job=job, state=JobState.CANCELLED)
        else:
            crud.record_failure(session=session, job=job, reason=f"submission lost: {exc}")
        _note(job, report)
        return
    _copy_logs(session, dispatcher, job, sid)
    if locate is not None and not job.mlflow_run_id:
        _locate_run(session, job, locate)
    if results is not None and job.mlflow_run_id and job.mlflow_experiment_id:
        _refresh_progress(session, job, results)
    if job.state == JobState.CANCELLING:
        if state in (D.STOPPED, D.FAILED):
            crud.mark_finished(session=session, job=job, state=JobState.CANCELLED)
        elif state == D.SUCCEEDED:
            crud.mark_finished(session=session, job=job, state=JobState.SUCCEEDED)
        else:
            dispatcher.stop(sid)  # asked again until the cluster says it stopped
            return
        report.finished.append(job.id)
    elif state == D.RUNNING and job.state == JobState.DISPATCHED:
        crud.mark_running(session=session, job=job)
    elif state == D.SUCCEEDED:
        crud.mark_finished(session=session, job=job, state=JobState.SUCCEEDED)
        report.finished.append(job.id)
    elif state in (D.FAILED, D.STOPPED):
        reason = message or ("stopped outside the service" if state == D.STOPPED else "failed")
        crud.record_failure(session=session, job=job, reason=reason)
        _note(job, report)


def _unfit_reason(dispatcher: Dispatcher, submission: JobSubmission) -> str:
    """Why no node of the cluster can run one trial of the job."""
    asks = ", ".join(f"{k} {v:g}" for k, v in submission.resources.items() if v > 0)
    reason = f"no node of the cluster can run one trial: it asks for {asks} (sweep.resources)"
    describe = getattr(dispatcher, "describe_capacity", None)
    if describe is not None:
        try:
            reason += f"; the cluster has {describe()}"
        except Exception:  # the message only
            log.debug("describing the cluster failed", exc_info=True)
    return reason


def _locate_run(session: Session, job: Job, locate: Locate) -> None:
    try:
        found = locate(job.id)
    except Exception as exc:  # MLflow down: try again next pass
        log.warning("MLflow run of job %s not found: %s", job.id, exc)
        return
    if found is not None:
        experiment_id, run_id = found
        crud.update_progress(
            session=session, job=job, mlflow_experiment_id=experiment_id, mlflow_run_id=run_id
        )


def _note(job: Job, report: PassReport) -> None:
    (report.requeued if job.state == JobState.QUEUED else report.finished).append(job.id)


def _copy_logs(session: Session, dispatcher: Dispatcher, job: Job, sid: str) -> None:
    """Store the part of the submission's log not stored yet (one chunk per pass)."""
    stored = session.scalar(
        select(func.coalesce(func.sum(func.length(JobLog.text)), 0)).where(
            JobLog.job_id == job.id, JobLog.attempt == job.attempt
        )
    )
    text = dispatcher.logs(sid)
    if len(text) > int(stored or 0):
        crud.append_logs(
            session=session, job_id=job.id, attempt=job.attempt, chunks=[text[int(stored or 0) :]]
        )


def _refresh_progress(session: Session, job: Job, results: ResultsReader) -> None:
    metric, mode = metric_of(job.spec)
    try:
        trials = results.trials(
            experiment_id=job.mlflow_experiment_id or "", parent_run_id=job.mlflow_run_id or ""
        )
    except ResultsUnavailable as exc:
        log.warning("progress of job %s not refreshed: %s", job.id, exc)
        return
    crud.update_progress(session=session, job=job, progress=progress_of(trials, metric, mode))
