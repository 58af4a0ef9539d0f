"""The app's background dispatch loop: reconcile with Ray once, then a dispatch pass every tick.

Started by the FastAPI lifespan when the service dispatches to Ray (``FGD_DISPATCH=ray`` or a
``RAY_ADDRESS``); the passes run in a worker thread (they block on HTTP and the database), the
loop itself is an asyncio task that stops between passes on shutdown.

Restart safety: the store is the truth of what was asked, Ray of what runs. ``reconcile`` (at
start, before the first pass) settles the jobs the store has on Ray; ``dispatch_once`` follows
the rest (running jobs are adopted by their deterministic submission ids).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from dataclasses import dataclass, field
from typing import Any

from service import crud
from service.core.config import Settings
from service.db import LeaderLock, Store
from service.dispatch import Dispatcher
from service.models import Job, JobState
from service.results import ResultsReader
from service.scheduler import PassReport, dispatch_once
from workers.entrypoint import JOB_ID_TAG

log = logging.getLogger(__name__)
S = JobState
WORKER_ENV = ("FGD_HOME", "FGD_TUNE_STORAGE")  # passed on to every job when the service has them
# MLflow's client retries a dead server for minutes by default (7 retries, backoff 2, 120 s
# timeout); a pass of the loop waits seconds at most. Set only where the environment is silent.
MLFLOW_CLIENT_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}


@dataclass
class ReconcileReport:
    adopted: list[str] = field(default_factory=list)  # still on Ray: followed as before
    requeued: list[str] = field(default_factory=list)  # never reached Ray: dispatched again
    lost: list[str] = field(default_factory=list)  # gone from Ray: failed or retried
    cancelled: list[str] = field(default_factory=list)


def reconcile(*, store: Store, dispatcher: Dispatcher) -> ReconcileReport:
    """Settle every job the store has on Ray against what Ray knows, after a service restart.

    DISPATCHED but unknown to Ray → QUEUED again under the same attempt (it never started);
    RUNNING but unknown → a failed attempt (``record_failure``: retried while attempts remain);
    CANCELLING but unknown → CANCELLED; known to Ray → left to ``dispatch_once``, which follows
    its state (including FAILED / STOPPED while the service was down). QUEUED jobs need nothing.

    Raises:
        Exception: Ray could not be asked (the caller tries again; nothing was changed for the
            jobs not yet looked at).
    """
    report = ReconcileReport()
    with store.session() as session:
        for job in crud.jobs_on_ray(session=session):
            sid = job.submission_id
            try:
                if sid is None:
                    raise KeyError("no submission id")
                dispatcher.status(sid)
            except KeyError:
                _settle_unknown(session, job, report)
                continue
            report.adopted.append(job.id)
    return report


def _settle_unknown(session: Any, job: Job, report: ReconcileReport) -> None:
    sid = job.submission_id
    if job.state == S.CANCELLING:
        crud.mark_finished(session=session, job=job, state=S.CANCELLED)
        report.cancelled.append(job.id)
    elif job.state == S.DISPATCHED:
        reason = f"Ray never had submission {sid}; queued again"
        crud.requeue_unstarted(session=session, job=job, reason=reason)
        report.requeued.append(job.id)
    else:
        reason = f"lost: Ray no longer knows submission {sid} (was its head restarted?)"
        crud.record_failure(session=session, job=job, reason=reason)
        report.lost.append(job.id)


class MlflowRunLocator:
    """Finds a job's parent run in MLflow by its ``fgd.job_id`` tag (set by the entrypoint).

    Uses the results reader's client (its tracking URI, its injected factory: a fake in tests).
    """

    def __init__(self, results: ResultsReader) -> None:
        self.results = results
        self._client: Any = None

    def __call__(self, job_id: str) -> tuple[str, str] | None:
        if self._client is None:
            self._client = self.results.client()
        experiments = [e.experiment_id for e in self._client.search_experiments()]
        if not experiments:
            return None
        runs = self._client.search_runs(
            experiments, filter_string=f"tags.`{JOB_ID_TAG}` = '{job_id}'", max_results=1
        )
        if not runs:
            return None
        return str(runs[0].info.experiment_id), str(runs[0].info.run_id)


def worker_env(settings: Settings, results: ResultsReader) -> dict[str, str]:
    """The environment every Ray Job gets: the tracking server, and FGD's paths if set."""
    env = {name: os.environ[name] for name in WORKER_ENV if os.environ.get(name)}
    uri = settings.MLFLOW_TRACKING_URI or results.known_uri
    if uri:
        env["MLFLOW_TRACKING_URI"] = uri
    return env


def bound_mlflow_retries() -> None:
    """Make this process's MLflow client give up on a dead server in seconds, not minutes."""
    for name, value in MLFLOW_CLIENT_DEFAULTS.items():
        os.environ.setdefault(name, value)


def ray_dispatcher(settings: Settings, results: ResultsReader) -> Dispatcher:
    """The Ray Jobs dispatcher for ``settings.RAY_ADDRESS`` (no connection made yet)."""
    from service.ray_dispatch import RayJobsDispatcher

    if not settings.RAY_ADDRESS:
        raise ValueError("dispatching to Ray needs RAY_ADDRESS (the Ray dashboard's URL)")
    return RayJobsDispatcher(
        settings.RAY_ADDRESS,
        env_vars=worker_env(settings, results),
        python=settings.RAY_PYTHON,
        noop=settings.DISPATCH_NOOP,
    )


class DispatchLoop:
    """Reconcile (retried until Ray answers), then ``dispatch_once`` every ``interval`` s.

    Each API worker process runs one; only the holder of the store's ``dispatch`` leader lock
    works (``service.db.LeaderLock``), the others wait to take over, so ``uvicorn --workers N``
    still dispatches each job once.
    """

    def __init__(
        self,
        *,
        store: Store,
        dispatcher: Dispatcher,
        max_concurrent: int,
        interval: float,
        results: ResultsReader | None = None,
        fail_unfit: bool = True,
    ) -> None:
        self.store, self.dispatcher = store, dispatcher
        self.max_concurrent, self.interval = max_concurrent, interval
        self.results, self.fail_unfit = results, fail_unfit
        self.locate = MlflowRunLocator(results) if results is not None else None
        self.leader = LeaderLock(store, "dispatch")
        self.reconciled: ReconcileReport | None = None
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def step(self) -> PassReport | None:
        """One tick (blocking): nothing unless this process leads; then reconcile if not done
        since it took the lead, else one dispatch pass."""
        if not self.leader.acquire():
            self.reconciled = None  # whoever leads now reconciled; if we take over, we will
            return None
        if self.reconciled is None:
            self.reconciled = reconcile(store=self.store, dispatcher=self.dispatcher)
            log.info("reconciled with Ray: %s", self.reconciled)
        return dispatch_once(
            store=self.store,
            dispatcher=self.dispatcher,
            max_concurrent=self.max_concurrent,
            results=self.results,
            locate=self.locate,
            fail_unfit=self.fail_unfit,
        )

    async def run(self) -> None:
        while not self._stop.is_set():
            try:
                await asyncio.to_thread(self.step)
            except OSError as exc:  # Ray or MLflow unreachable: try again next tick
                log.warning("dispatch pass failed: %s", exc)
            except Exception:
                log.exception("dispatch pass failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), timeout=self.interval)

    def start(self) -> None:
        self._stop.clear()
        self._task = asyncio.get_running_loop().create_task(self.run(), name="fgd-dispatch")

    async def stop(self) -> None:
        """Stop after the pass in progress (if any)."""
        self._stop.set()
        if self._task is not None:
            await self._task
            self._task = None
        await asyncio.to_thread(self.leader.release)
