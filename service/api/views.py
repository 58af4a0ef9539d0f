"""ORM rows to response models, and pages of jobs straight to JSON bytes."""

from __future__ import annotations

import secrets
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import TypeAdapter
from pydantic_core import to_json

from service.crud import JobVersion
from service.models import Job, JobState
from service.results import ResultsReader
from service.schemas import BestMetric, Failure, JobPublic, Progress

_JOB_PUBLIC: TypeAdapter[JobPublic] = TypeAdapter(JobPublic)
_PROGRESS: TypeAdapter[Progress] = TypeAdapter(Progress)
_FAILURES: TypeAdapter[list[Failure]] = TypeAdapter(list[Failure])
_NO_PROGRESS = Progress()  # read-only: shared by the rows with no progress yet
# Stands for a spec in a rendered page. Its key holds a control character, which JSON writes
# escaped (\u0000) inside any string, so its bytes appear nowhere else; the value is random.
_SPEC_MARK: dict[str, Any] = {"\x00spec": secrets.token_hex(16)}
_SPEC_MARK_JSON = to_json(_SPEC_MARK)


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


class JobsRenderer:
    """Pages of jobs as JSON (``JobsPublic``), each job rendered once per version of its row.

    A job's piece of a page depends only on its row (and this process's MLflow links), and
    ``(id, updated_at)`` names one version of the row (``crud.list_jobs``). Finished jobs never
    change again, and a busy listing shows the same jobs page after page: their pieces are kept
    (up to ``max_bytes``, oldest first out), and the store is asked only for the rows of the
    versions not rendered yet. A page is then its pieces joined.

    The bytes are what ``JobsPublic(data=[job_public(job, results) ...], count=count)``
    serializes to (a test says so): each row becomes a plain dict in ``JobPublic``'s field
    order and is serialized in one call, its stored spec spliced in as the JSON text the store
    holds (not parsed and serialized again). The other JSON columns still go through their
    models (``Progress``, ``Failure``), which reject what does not fit.
    """

    def __init__(self, results: ResultsReader, *, max_bytes: int = 32 << 20) -> None:
        self.results, self.max_bytes = results, max_bytes
        self._pieces: dict[JobVersion, bytes] = {}
        self._bytes = 0
        self._lock = threading.Lock()

    def __contains__(self, version: object) -> bool:
        return version in self._pieces

    def page(
        self, page: Sequence[JobVersion], rows: Mapping[str, dict[str, Any]], count: int
    ) -> bytes | None:
        """The page's JSON; None if a piece it needs was dropped meanwhile (read the page again
        with nothing ``known``)."""
        pieces = []
        for version in page:
            row = rows.get(version[0])
            piece = self._render(row) if row is not None else self._pieces.get(version)
            if piece is None:
                return None
            pieces.append(piece)
        return b"".join((b'{"data":[', b",".join(pieces), b'],"count":', b"%d}" % count))

    def _render(self, row: dict[str, Any]) -> bytes:
        text = row["progress"]
        progress = _NO_PROGRESS if text is None or text == "null" else _PROGRESS.validate_json(text)
        text = row["failures"]
        experiment_id, run_id = row["mlflow_experiment_id"], row["mlflow_run_id"]
        fields = {
            "id": row["id"],
            "name": row["name"],
            "owner": row["owner"],
            "priority": row["priority"],
            "idempotency_key": row["idempotency_key"],
            "state": JobState(row["state"]),
            "attempt": row["attempt"],
            "max_attempts": row["max_attempts"],
            "submission_id": row["submission_id"],
            "created_at": row["created_at"],
            "started_at": row["started_at"],
            "finished_at": row["finished_at"],
            "error": row["error"],
            "progress": progress,
            "best_metric": progress.best,
            "mlflow": self.results.link_fields(experiment_id=experiment_id, run_id=run_id),
            "failures": [] if not text or text == "[]" else _FAILURES.validate_json(text),
            "spec_hash": row["spec_hash"],
            "spec": _SPEC_MARK,
        }
        head, tail = to_json(fields).split(_SPEC_MARK_JSON)  # the marker is in no other field
        piece = b"".join((head, row["spec"].encode(), tail))
        self._keep((row["id"], row["updated_at"]), piece)
        return piece

    def _keep(self, version: JobVersion, piece: bytes) -> None:
        with self._lock:
            if version in self._pieces:
                return
            self._pieces[version] = piece
            self._bytes += len(piece)
            while self._bytes > self.max_bytes and self._pieces:
                self._bytes -= len(self._pieces.pop(next(iter(self._pieces))))
