"""The distillation report: teacher, baseline student and FGD student side by side.

A distillation job that asks for a baseline (``baseline: true``), or a sweep with a grid over
``kind`` (``["baseline", "distill"]``), trains both students with the same seed and schedule.
Their trials are paired by every grid value but ``kind`` (the seed, typically); the report gives
each pair's difference and the share of the teacher-student gap it closes, and the mean over
pairs with its standard error.

Rows are the sweep's flat trial rows: ``{"kind": "distill", "train.seed": 0, "bbox_AP": 0.1,
...}``. Where a group holds several FGD trials (a search over the FGD hyperparameters), the
best one stands for the group and ``fgd_trials`` says how many there were.
"""

from __future__ import annotations

import json
import math
import statistics
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mlflow import MlflowClient

REPORT_JSON = "report/distillation.json"
REPORT_MD = "report/distillation.md"
KIND_KEY = "kind"


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def gap_closed(teacher: float, baseline: float, fgd: float) -> float | None:
    """(fgd - baseline) / (teacher - baseline); None when the teacher does not lead."""
    gap = teacher - baseline
    return (fgd - baseline) / gap if gap > 0 else None


def mean_and_se(values: Sequence[float]) -> tuple[float | None, float | None]:
    """The mean and its standard error (sample std / sqrt(n)); SE is None below two values."""
    if not values:
        return None, None
    mean = statistics.fmean(values)
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else None
    return mean, se


def distillation_report(
    rows: Sequence[Mapping[str, Any]],
    *,
    metric: str = "bbox_AP",
    teacher: float | None = None,
    group_keys: Sequence[str] = (),
) -> dict[str, Any] | None:
    """Pair baseline and FGD trials and summarise them; None when there is no pair.

    Args:
        rows: one flat dict per trial with its ``kind`` and its final metrics.
        metric: the metric compared (COCO box AP on the 0-1 scale by default).
        teacher: the teacher's value of ``metric``; default: the ``teacher_<metric>`` the FGD
            trials measured before training, when they did.
        group_keys: the grid keys that pair trials (e.g. ``train.seed``); ``kind`` never is.
    """
    keys = [k for k in group_keys if k != KIND_KEY]
    groups: dict[tuple[Any, ...], dict[str, list[Mapping[str, Any]]]] = {}
    for row in rows:
        if _finite(row.get(metric)) is None or row.get(KIND_KEY) not in ("baseline", "distill"):
            continue
        key = tuple(row.get(k) for k in keys)
        groups.setdefault(key, {"baseline": [], "distill": []})[str(row[KIND_KEY])].append(row)
    if teacher is None:
        measured = [
            v
            for r in rows
            if r.get(KIND_KEY) == "distill"
            and (v := _finite(r.get(f"teacher_{metric}"))) is not None
        ]
        teacher = statistics.fmean(measured) if measured else None

    pairs = []
    for key, group in groups.items():
        if not group["baseline"] or not group["distill"]:
            continue
        base = statistics.fmean(float(r[metric]) for r in group["baseline"])
        best = max(group["distill"], key=lambda r: float(r[metric]))
        fgd = float(best[metric])
        pairs.append(
            {
                "group": dict(zip(keys, key, strict=True)),
                "baseline": base,
                "fgd": fgd,
                "diff": fgd - base,
                "gap_closed": gap_closed(teacher, base, fgd) if teacher is not None else None,
                "fgd_trials": len(group["distill"]),
                "fgd_run_id": best.get("mlflow_run_id"),
            }
        )
    if not pairs:
        return None
    diffs = [p["diff"] for p in pairs]
    diff_mean, diff_se = mean_and_se(diffs)
    closed = [p["gap_closed"] for p in pairs if p["gap_closed"] is not None]
    return {
        "metric": metric,
        "teacher": teacher,
        "baseline_mean": statistics.fmean(p["baseline"] for p in pairs),
        "fgd_mean": statistics.fmean(p["fgd"] for p in pairs),
        "diff_mean": diff_mean,
        "diff_se": diff_se,
        "significant": bool(
            diff_se is not None and diff_mean is not None and diff_mean > 2 * diff_se
        ),
        "gap_closed": statistics.fmean(closed) if closed else None,
        "pairs": pairs,
    }


def _fmt(value: Any, scale: float = 1.0) -> str:
    v = _finite(value)
    return "-" if v is None else f"{v * scale:.2f}"


def report_markdown(report: Mapping[str, Any]) -> str:
    """The report as a Markdown table (AP in points: the 0-1 value times 100)."""
    metric = report["metric"]
    lines = [
        f"Teacher {metric}: {_fmt(report['teacher'], 100)}",
        "",
        "| pair | baseline | FGD | FGD - baseline | gap closed |",
        "|---|---|---|---|---|",
    ]
    for p in report["pairs"]:
        name = ", ".join(f"{k}={v}" for k, v in p["group"].items()) or "-"
        closed = "-" if p["gap_closed"] is None else f"{100 * p['gap_closed']:.0f} %"
        lines.append(
            f"| {name} | {_fmt(p['baseline'], 100)} | {_fmt(p['fgd'], 100)} "
            f"| {_fmt(p['diff'], 100)} | {closed} |"
        )
    closed = report["gap_closed"]
    se = "-" if report["diff_se"] is None else _fmt(report["diff_se"], 100)
    lines += [
        f"| **mean** | {_fmt(report['baseline_mean'], 100)} | {_fmt(report['fgd_mean'], 100)} "
        f"| {_fmt(report['diff_mean'], 100)} ± {se} | "
        f"{'-' if closed is None else f'{100 * closed:.0f} %'} |",
        "",
        f"FGD beats the baseline by more than twice the standard error: "
        f"{'yes' if report['significant'] else 'no'}.",
    ]
    return "\n".join(lines) + "\n"


def log_distillation_report(client: MlflowClient, run_id: str, report: Mapping[str, Any]) -> None:
    """Put the report on a (parent) run: JSON and Markdown artifacts, and ``report_*`` metrics."""
    from workers.tracking import log_artifact_file, log_metrics

    with tempfile.TemporaryDirectory(prefix="fgd-distill-report-") as tmp:
        folder = Path(tmp) / "report"
        folder.mkdir()
        (folder / "distillation.json").write_text(json.dumps(report, indent=1))
        (folder / "distillation.md").write_text(report_markdown(report))
        log_artifact_file(client, run_id, folder, "report")
    metrics = {
        f"report_{k}": report[k]
        for k in ("teacher", "baseline_mean", "fgd_mean", "diff_mean", "diff_se", "gap_closed")
    }
    log_metrics(client, run_id, {k: v for k, v in metrics.items() if v is not None}, step=0)
