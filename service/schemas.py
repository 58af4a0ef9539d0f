"""Request and response models of the REST API (``JobCreate`` in, ``JobPublic`` out)."""

from __future__ import annotations

import hashlib
import json
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from service.models import JobState
from workers.spec import JobSpec

EXAMPLE_SPEC: dict[str, Any] = {
    "kind": "distill",
    "data": {
        "coco": {
            "train_images": "/srv/fgd/data/coco/train2017",
            "train_ann": "/srv/fgd/data/coco/annotations/instances_train2017.json",
            "val_images": "/srv/fgd/data/coco/val2017",
            "val_ann": "/srv/fgd/data/coco/annotations/instances_val2017.json",
        }
    },
    "model": {"arch": "retinanet", "backbone": "resnet18", "min_size": 512, "max_size": 683},
    "teacher": {
        "checkpoint": "/srv/fgd/data/teachers/retinanet_r50.pt",
        "model": {"arch": "retinanet", "backbone": "resnet50", "min_size": 512, "max_size": 683},
    },
    "train": {"batch_size": 8, "schedule": {"iterations": 3000, "warmup_iters": 100}},
    "sweep": {
        "space": {"alpha": {"loguniform": [1e-5, 1e-3]}, "temp": {"choice": [0.5, 1.0]}},
        "num_samples": 8,
        "scheduler": "asha",
        "metric": "bbox_AP",
    },
}


class JobCreate(BaseModel):
    """A job submission: a name, a queue priority and the JobSpec to run."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "name": "fgd-r18-alpha-sweep",
                    "priority": 0,
                    "idempotency_key": "2025-06-01-alpha-sweep",
                    "max_attempts": 2,
                    "spec": EXAMPLE_SPEC,
                }
            ]
        },
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
