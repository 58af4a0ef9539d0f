"""A job's distillation report (teacher, baseline and FGD students), read from its parent run.

The sweep logs it as ``report/distillation.json`` on the job's parent MLflow run when the job
trained baseline and FGD students side by side (``baseline: true``, or a ``kind`` grid).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, Field

from workers.distill_report import REPORT_JSON

if TYPE_CHECKING:
    from service.results import ResultsReader


class ReportPair(BaseModel):
    group: dict[str, Any] = Field(description="The grid values the pair shares, e.g. the seed.")
    baseline: float
    fgd: float
    diff: float = Field(description="fgd - baseline.")
    gap_closed: float | None = Field(description="(fgd - baseline) / (teacher - baseline).")
    fgd_trials: int = Field(description="FGD trials of the group; the best one is shown.")
    fgd_run_id: str | None = None


class DistillationReport(BaseModel):
    metric: str
    teacher: float | None = Field(description="The teacher's value of the metric.")
    baseline_mean: float
    fgd_mean: float
    diff_mean: float
    diff_se: float | None = Field(description="Standard error of the mean paired difference.")
    significant: bool = Field(description="diff_mean > 2 * diff_se.")
    gap_closed: float | None = Field(description="Mean share of the teacher-student gap closed.")
    pairs: list[ReportPair]


def read_report(results: ResultsReader, *, parent_run_id: str) -> DistillationReport | None:
    """The report of a parent run, or None when it has none.

    Raises:
        ResultsUnavailable: MLflow is not configured or could not be read.
    """
    from service.results import ResultsUnavailable

    client = results.client()
    try:
        names = {a.path for a in client.list_artifacts(parent_run_id, "report")}
        if REPORT_JSON not in names:
            return None
        with tempfile.TemporaryDirectory(prefix="fgd-report-") as tmp:
            path = client.download_artifacts(parent_run_id, REPORT_JSON, tmp)
            data = json.loads(Path(path).read_text())
    except Exception as exc:  # MlflowException, connection errors: all "unavailable"
        raise ResultsUnavailable(f"MLflow could not be read: {exc}") from exc
    return DistillationReport.model_validate(data)
