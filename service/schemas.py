"""Request and response models of the REST API (``JobCreate`` in, ``JobPublic`` out)."""

from __future__ import annotations

import hashlib
import json
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from service.models import JobState
from service.report import DistillationReport
from workers.examples import small_sweep
from workers.spec import JobSpec

# The POST /jobs example: a small sweep on the generated shapes data (a teacher trained first,
# four students under ASHA), the same spec `fgd sweep --example` prints. About two minutes on
# two free CPU cores; no data path to allow (shapes data is generated under FGD_HOME/data).
EXAMPLE_SPEC: dict[str, Any] = small_sweep()
EXAMPLE_JOB: dict[str, Any] = {
    "name": "shapes-alpha-temp-sweep",
    "priority": 0,
    "idempotency_key": "shapes-alpha-temp-sweep-1",
    "max_attempts": 2,
    "spec": EXAMPLE_SPEC,
}


class JobCreate(BaseModel):
    """A job submission: a name, a queue priority and the JobSpec to run."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [EXAMPLE_JOB]},
    )

    name: str = Field(min_length=1, max_length=200, description="A label for people.")
    priority: int = Field(0, ge=-100, le=100, description="Higher runs first; ties by age.")
    idempotency_key: str | None = Field(
        None,
        min_length=1,
        max_length=200,
        description="Resending the same body with the same key returns the same job.",
    )
    max_attempts: int = Field(2, ge=1, le=10, description="Dispatches before giving up.")
    spec: JobSpec

    def request_hash(self) -> str:
        """SHA-256 of the canonical body (defaults filled in, keys sorted, key itself left out)."""
        body = self.model_dump(mode="json", by_alias=True, exclude={"idempotency_key"})
        return canonical_hash(body)


def canonical_hash(obj: Any) -> str:
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(blob.encode()).hexdigest()


class BestMetric(BaseModel):
    name: str
    value: float
    mode: Literal["max", "min"] = "max"
    run_id: str | None = None


class Progress(BaseModel):
    """What the dispatcher last saw of the job's trials."""

    trials_total: int | None = None
    trials_done: int = 0
    trials_running: int = 0
    trials_failed: int = 0
    best: BestMetric | None = None


class MlflowLinks(BaseModel):
    tracking_uri: str | None = None
    experiment_id: str | None = None
    run_id: str | None = None
    experiment_url: str | None = None
    run_url: str | None = None


class Failure(BaseModel):
    attempt: int
    reason: str
    at: datetime | None = None


class JobPublic(BaseModel):
    """A job as its owner sees it."""

    id: str
    name: str
    owner: str
    priority: int
    idempotency_key: str | None
    state: JobState
    attempt: int
    max_attempts: int
    submission_id: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    error: str | None
    progress: Progress
    best_metric: BestMetric | None
    mlflow: MlflowLinks
    failures: list[Failure]
    spec_hash: str
    spec: dict[str, Any]


class JobsPublic(BaseModel):
    data: list[JobPublic]
    count: int = Field(description="Jobs matching the filter (all pages).")


class TrialPublic(BaseModel):
    """One trial: a nested MLflow run of the job's parent run."""

    run_id: str
    name: str | None
    trial_key: str | None
    status: str
    start_time: datetime | None
    end_time: datetime | None
    params: dict[str, str]
    metrics: dict[str, float]


class LeaderboardRow(BaseModel):
    rank: int | None = Field(description="1 = best; None: the trial has no value of the metric.")
    value: float | None
    trial: TrialPublic


class ResultsPublic(BaseModel):
    job_id: str
    metric: str
    mode: Literal["max", "min"]
    rows: list[LeaderboardRow]
    report: DistillationReport | None = Field(
        None,
        description="Teacher, baseline and FGD students side by side, with the gap closed "
        "(distill jobs with baseline: true, or sweeps over kind).",
    )


class CompareEntry(BaseModel):
    job_id: str
    name: str
    state: JobState
    metric: str
    mode: Literal["max", "min"]
    best: LeaderboardRow | None
    trials: int


class ComparePublic(BaseModel):
    jobs: list[CompareEntry]


class CancelPublic(BaseModel):
    id: str
    state: JobState
    message: str
