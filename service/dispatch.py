"""What the service needs from the cluster: the ``Dispatcher`` protocol, and an in-process one.

The Ray dispatcher (``service.ray_dispatch.RayJobsDispatcher``, Ray Jobs at ``RAY_ADDRESS``)
implements the same five methods; the store's state machine (``service.crud``) and the
dispatch loop use nothing else, so the service never imports Ray outside that class.

Submission ids are deterministic (``fgd-<job id>-<attempt>``): after a service restart a
dispatcher can tell a submission it already made from a new one.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol, runtime_checkable

from workers.spec import JobSpec


class DispatchState(StrEnum):
    """A submission's state on the cluster (the values of Ray's ``JobStatus``)."""

    PENDING = "PENDING"
    RUNNING = "RUNNING"
    STOPPED = "STOPPED"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"


@dataclass(frozen=True)
class JobSubmission:
    """Everything a dispatcher needs to start one attempt of a job (no ORM objects)."""

    job_id: str
    attempt: int  # 1 for the first dispatch
    name: str
    spec: dict[str, Any]  # JobSpec.to_dict()
    resources: dict[str, float]  # what one trial needs: {"CPU": 2.0, "GPU": 1.0}
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def submission_id(self) -> str:
        return submission_id(self.job_id, self.attempt)


def submission_id(job_id: str, attempt: int) -> str:
    return f"fgd-{job_id}-{attempt}"


def trial_resources(spec: JobSpec) -> dict[str, float]:
    """Resources one trial of ``spec`` asks Ray for (the sweep's, else 1 CPU, + 1 GPU on CUDA)."""
    if spec.sweep is not None:
        res = spec.sweep.resources
        return {"CPU": res.cpu, "GPU": res.gpu}
    gpu = 1.0 if spec.train.device.startswith("cuda") else 0.0
    return {"CPU": 1.0, "GPU": gpu}


@runtime_checkable
class Dispatcher(Protocol):
    """The cluster as the service sees it."""

    def submit(self, job: JobSubmission) -> str:
        """Start the attempt; return its submission id (``job.submission_id``).

        Submitting an id the cluster already has must not start a second copy.
        """
        ...

    def status(self, submission_id: str) -> tuple[DispatchState, str]:
        """The submission's state and a human message (the failure reason when FAILED)."""
        ...

    def logs(self, submission_id: str) -> str:
        """The whole log of the submission so far (the caller stores what is new)."""
        ...

    def stop(self, submission_id: str) -> None:
        """Ask the cluster to stop the submission; returns at once (status shows STOPPED)."""
        ...

    def cluster_can_fit(self, resources: dict[str, float]) -> bool:
        """Whether the cluster has (or can autoscale to) a node with ``resources``."""
        ...


class InProcessDispatcher:
    """Runs nothing: records submissions and stop requests (tests and a bare development app).

    Tests drive a submission's fate with ``set_status`` and ``add_logs``.
    """

    def __init__(self, *, capacity: dict[str, float] | None = None) -> None:
        self.capacity = capacity
        self.submitted: dict[str, JobSubmission] = {}
        self.stopped: list[str] = []
        self._status: dict[str, tuple[DispatchState, str]] = {}
        self._logs: dict[str, str] = {}
        self._lock = threading.Lock()

    def submit(self, job: JobSubmission) -> str:
        sid = job.submission_id
        with self._lock:
            if sid not in self.submitted:
                self.submitted[sid] = job
                self._status[sid] = (DispatchState.PENDING, "")
        return sid

    def status(self, submission_id: str) -> tuple[DispatchState, str]:
        with self._lock:
            if submission_id not in self._status:
                raise KeyError(f"unknown submission {submission_id!r}")
            return self._status[submission_id]

    def logs(self, submission_id: str) -> str:
        with self._lock:
            return self._logs.get(submission_id, "")

    def stop(self, submission_id: str) -> None:
        with self._lock:
            self.stopped.append(submission_id)
            if submission_id in self._status:
                self._status[submission_id] = (DispatchState.STOPPED, "stopped on request")

    def cluster_can_fit(self, resources: dict[str, float]) -> bool:
        if self.capacity is None:
            return True
        return all(self.capacity.get(k, 0.0) >= v for k, v in resources.items() if v > 0)

    def set_status(self, submission_id: str, state: DispatchState, message: str = "") -> None:
        with self._lock:
            self._status[submission_id] = (state, message)

    def add_logs(self, submission_id: str, text: str) -> None:
        with self._lock:
            self._logs[submission_id] = self._logs.get(submission_id, "") + text
