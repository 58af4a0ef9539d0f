"""Rich renderings of the REST API's answers: jobs, one job, a leaderboard, a comparison.

They read the JSON the API returns (plain dicts), so a section the API adds later is shown by
``render_value`` without a change here.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from rich.console import Group, RenderableType
from rich.markup import escape
from rich.table import Table
from rich.text import Text

STATE_STYLES = {
    "QUEUED": "cyan",
    "DISPATCHED": "cyan",
    "RUNNING": "yellow",
    "CANCELLING": "magenta",
    "SUCCEEDED": "green",
    "FAILED": "red",
    "CANCELLED": "magenta",
}
RESULTS_KEYS = ("job_id", "metric", "mode", "rows")  # what the leaderboard table shows
_MAX_CELL = 80


def state_text(state: str) -> Text:
    return Text(state, style=STATE_STYLES.get(state, ""))


def when(value: str | None) -> str:
    """An ISO timestamp of the API in local time, to the second; '' for None."""
    if not value:
        return ""
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return value
    if moment.tzinfo is not None:
        moment = moment.astimezone()
    return moment.strftime("%Y-%m-%d %H:%M:%S")


def duration(start: str | None, end: str | None) -> str:
    """``end - start`` as ``1m05s``; '' when either is missing."""
    if not start or not end:
        return ""
    try:
        seconds = (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()
    except (ValueError, TypeError):
        return ""
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def fmt(value: Any) -> str:
    """A cell: floats to 4 significant digits, containers as compact JSON, long text cut."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, Mapping | list | tuple):
        value = json.dumps(value, separators=(",", ":"))
    text = str(value)
    return text if len(text) <= _MAX_CELL else text[: _MAX_CELL - 1] + "…"


def planned_trials(spec: Mapping[str, Any]) -> int | None:
    """Trials a job spec asks for as Tune expands it: ``num_samples`` times every grid axis
    (a ``grid`` distribution, the ``grid`` section, and ``choice`` under grid search); 1 without
    a sweep. None when the spec is not a mapping with a readable sweep."""
    sweep = spec.get("sweep")
    if not sweep:
        return 1
    try:
        total = int(sweep.get("num_samples", 1))
        for dist in (sweep.get("space") or {}).values():
            if dist.get("grid"):
                total *= len(dist["grid"])
            elif dist.get("choice") and sweep.get("search") == "grid":
                total *= len(dist["choice"])
        for values in (sweep.get("grid") or {}).values():
            total *= len(values)
    except (AttributeError, TypeError, ValueError):
        return None
    return total


def trial_counts(job: Mapping[str, Any]) -> tuple[int, int | None]:
    """(trials ended, trials in all) of a job: the API's total, else the spec's plan."""
    p = job.get("progress") or {}
    ended = int(p.get("trials_done") or 0) + int(p.get("trials_failed") or 0)
    total = p.get("trials_total")
    if total is None and isinstance(job.get("spec"), Mapping):
        total = planned_trials(job["spec"])
    return ended, None if total is None else max(int(total), ended)


def progress_text(job: Mapping[str, Any]) -> str:
    ended, total = trial_counts(job)
    text = f"{ended}/{total if total is not None else '?'}"
    failed = (job.get("progress") or {}).get("trials_failed")
    if failed:
        text += f" ({failed} stopped or failed)"
    return text


def best_text(job: Mapping[str, Any]) -> str:
    best = job.get("best_metric")
    return f"{best['name']} {fmt(best['value'])}" if best else ""


def jobs_table(page: Mapping[str, Any]) -> Table:
    """``GET /jobs``: one row per job, newest first."""
    jobs = page.get("data", [])
    owners = len({job.get("owner") for job in jobs}) > 1  # an admin's view: say whose
    table = Table(title=f"{len(jobs)} of {page.get('count', len(jobs))} jobs", title_justify="left")
    id_width = max((len(job["id"]) for job in jobs), default=2)
    table.add_column("id", no_wrap=True, min_width=id_width)
    for col in ("name", "state", "trials", "best", *(("owner",) if owners else ()), "created"):
        table.add_column(col, no_wrap=col in ("state", "created"))
    for job in jobs:
        table.add_row(
            job["id"],
            escape(job["name"]),
            state_text(job["state"]),
            progress_text(job),
            best_text(job),
            *((escape(job.get("owner", "")),) if owners else ()),
            when(job.get("created_at")),
        )
    return table


def job_view(job: Mapping[str, Any]) -> Table:
    """``GET /jobs/{id}``: the fields people read, one per line."""
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    rows: list[tuple[str, Any]] = [
        ("id", job["id"]),
        ("name", escape(job["name"])),
        ("owner", escape(job.get("owner", ""))),
        ("state", state_text(job["state"])),
        ("attempt", f"{job.get('attempt', 0)} of {job.get('max_attempts', '?')}"),
        ("priority", str(job.get("priority", 0))),
        ("created", when(job.get("created_at"))),
        ("started", when(job.get("started_at"))),
        ("finished", when(job.get("finished_at"))),
        ("ran for", duration(job.get("started_at"), job.get("finished_at"))),
        ("trials", progress_text(job)),
        ("best", best_text(job)),
        ("error", Text(job["error"], style="red") if job.get("error") else ""),
    ]
    for failure in job.get("failures") or []:
        rows.append((f"attempt {failure['attempt']}", escape(failure["reason"])))
    links = job.get("mlflow") or {}
    rows.append(("MLflow run", links.get("run_url") or links.get("run_id") or ""))
    rows.append(("MLflow experiment", links.get("experiment_url") or ""))
    for label, value in rows:
        if value not in ("", None):
            grid.add_row(label, value)
    return grid


def varying_params(trials: Sequence[Mapping[str, Any]]) -> list[str]:
    """Param names whose values differ between trials (the searched hyperparameters)."""
    names: dict[str, set[str]] = {}
    for trial in trials:
        for key, value in (trial.get("params") or {}).items():
            names.setdefault(key, set()).add(value)
    missing = {k for k in names if any(k not in (t.get("params") or {}) for t in trials)}
    return sorted(k for k, values in names.items() if len(values) > 1 or k in missing)


def leaderboard_table(results: Mapping[str, Any]) -> Table:
    """``GET /jobs/{id}/results``: the trials ranked by the job's metric."""
    metric = results["metric"]
    rows = results.get("rows", [])
    trials = [row["trial"] for row in rows]
    params = varying_params(trials)
    table = Table()
    table.add_column("rank", justify="right")
    table.add_column(metric, justify="right", style="bold")
    table.add_column("trial")
    table.add_column("status")
    for name in params:
        table.add_column(name, justify="right")
    for row in rows:
        trial = row["trial"]
        values = trial.get("params") or {}
        table.add_row(
            "-" if row.get("rank") is None else str(row["rank"]),
            fmt(row.get("value")),
            escape(trial.get("name") or trial.get("run_id", "")),
            trial.get("status", ""),
            *(fmt(_number(values.get(name))) for name in params),
        )
    return table


def _number(text: str | None) -> Any:
    """An MLflow param (always text) as a number where it is one, for compact display."""
    if text is None:
        return None
    try:
        return float(text) if any(c in text for c in ".eE") else int(text)
    except ValueError:
        return text


def results_view(results: Mapping[str, Any]) -> Group:
    """The leaderboard, then every other top-level section of the answer, generically."""
    rows, metric = results.get("rows", []), results["metric"]
    title = f"job {results.get('job_id', '')}: {len(rows)} trials by {metric}"
    title += f" ({results.get('mode', 'max')})"
    parts: list[RenderableType] = [Text(title, style="italic"), leaderboard_table(results)]
    for key, value in results.items():
        if key == "report":
            if value:
                parts.append(report_table(value))
        elif key not in RESULTS_KEYS:
            parts.append(render_value(key, value))
    return Group(*parts)


def report_table(report: Mapping[str, Any]) -> Table:
    """The distillation report: teacher, baseline and FGD student side by side, per pair."""
    metric = report.get("metric", "")
    table = Table(title=f"distillation report ({metric})", title_justify="left")
    for col in ("", "teacher", "baseline", "FGD", "FGD - baseline", "gap closed"):
        table.add_column(col)

    def pct(v: Any) -> str:
        return "-" if v is None else f"{100 * float(v):.0f} %"

    for pair in report.get("pairs", []):
        name = ", ".join(f"{k}={v}" for k, v in pair.get("group", {}).items()) or "pair"
        table.add_row(
            escape(name),
            fmt(report.get("teacher")),
            fmt(pair.get("baseline")),
            fmt(pair.get("fgd")),
            fmt(pair.get("diff")),
            pct(pair.get("gap_closed")),
        )
    se = report.get("diff_se")
    diff = fmt(report.get("diff_mean")) + ("" if se is None else f" ± {fmt(se)}")
    table.add_row(
        "mean",
        fmt(report.get("teacher")),
        fmt(report.get("baseline_mean")),
        fmt(report.get("fgd_mean")),
        diff,
        pct(report.get("gap_closed")),
        style="bold",
    )
    return table


def render_value(title: str, value: Any) -> RenderableType:
    """Any JSON value under a title: a table for a list of objects or an object, else text."""
    if isinstance(value, list) and value and all(isinstance(v, Mapping) for v in value):
        columns = list(dict.fromkeys(k for item in value for k in item))
        table = Table(title=title, title_justify="left")
        for col in columns:
            table.add_column(col)
        for item in value:
            table.add_row(*(escape(fmt(item.get(col))) for col in columns))
        return table
    if isinstance(value, Mapping):
        if all(not isinstance(v, Mapping | list) for v in value.values()):
            grid = Table(title=title, title_justify="left", show_header=False)
            grid.add_column(style="bold")
            grid.add_column()
            for k, v in value.items():
                grid.add_row(escape(str(k)), escape(fmt(v)))
            return grid
        return Group(
            Text(title, style="italic"),
            *(render_value(f"{title}.{k}", v) for k, v in value.items()),
        )
    if isinstance(value, list):
        return Text(f"{title}: " + ", ".join(fmt(v) for v in value))
    if isinstance(value, str) and "\n" in value:
        return Text(f"{title}:\n{value}")
    return Text(f"{title}: {value}")


def compare_table(data: Mapping[str, Any]) -> Table:
    """``GET /compare``: the best trial of each job side by side."""
    entries = data.get("jobs", [])
    best_trials = [e["best"]["trial"] for e in entries if e.get("best")]
    params = varying_params(best_trials) if len(best_trials) > 1 else []
    table = Table(title="best trial of each job", title_justify="left")
    for col in ("job", "name", "state", "metric", "best", "trial", "trials", *params):
        table.add_column(col, justify="right" if col in ("best", "trials") else "left")
    for entry in entries:
        best = entry.get("best") or {}
        trial = best.get("trial") or {}
        values = trial.get("params") or {}
        table.add_row(
            entry["job_id"],
            escape(entry["name"]),
            state_text(entry["state"]),
            f"{entry['metric']} ({entry['mode']})",
            fmt(best.get("value")),
            escape(trial.get("name") or ""),
            str(entry.get("trials", 0)),
            *(fmt(_number(values.get(name))) for name in params),
        )
    return table
