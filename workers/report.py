"""Sweep reports: a leaderboard (CSV, Markdown, JSON) and two plots, logged to the parent run.

Rows are flat dicts, one per trial, e.g. ``{"trial": "t_00001", "run_id": "...", "alpha": 2e-5,
"beta": 1e-6, "gamma": 1e-3, "lambda": 5e-6, "temp": 0.5, "map": 0.31}`` (nested dicts are
flattened with dotted keys). FGD's ``lambda`` may come as ``lambda_``; it is shown as ``lambda``.

Plots use matplotlib's object API (``Figure`` + Agg canvas, imported lazily): no pyplot, no global
backend switch, safe in worker threads and in processes without a display.
"""

from __future__ import annotations

import json
import math
import numbers
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from mlflow import MlflowClient

Mode = Literal["max", "min"]
LEADERBOARD_FILES = ("leaderboard.csv", "leaderboard.md", "leaderboard.json")
PLOT_METRIC_VS_PARAMS = "plots/metric_vs_params.png"
PLOT_PARALLEL = "plots/parallel_coordinates.png"
# Row fields that identify a trial: copied to the parent's best.* tags, never logged as metrics.
_ID_KEYS = ("run_id", "mlflow_run_id", "trial", "trial_id", "trial_key")


def label(key: str) -> str:
    """The name a user sees: ``lambda`` for Python's ``lambda_``."""
    return "lambda" if key == "lambda_" else key


def _flat(row: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in row.items():
        key = f"{prefix}{label(str(k))}"
        if isinstance(v, Mapping):
            out.update(_flat(v, f"{key}."))
        else:
            out[key] = v
    return out


def _number(value: Any) -> float | None:
    """A finite float, or None for NaN / inf / bool / non-numbers."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    f = float(value)
    return f if math.isfinite(f) else None


def leaderboard(rows: Sequence[Mapping[str, Any]], metric: str, mode: Mode = "max") -> list[dict]:
    """Rows sorted best first with ``rank`` (1-based; ties share a rank).

    Rows without a finite ``metric`` (failed or diverged trials) come last with ``rank`` None.
    """
    if mode not in ("max", "min"):
        raise ValueError(f"mode must be 'max' or 'min', not {mode!r}")
    flat = [_flat(r) for r in rows]
    scored = [r for r in flat if _number(r.get(metric)) is not None]
    unscored = [r for r in flat if _number(r.get(metric)) is None]
    scored.sort(key=lambda r: float(r[metric]), reverse=mode == "max")  # stable: input order
    ranked: list[dict] = []
    previous, rank = None, 0
    for i, row in enumerate(scored, start=1):
        value = float(row[metric])
        if value != previous:
            rank, previous = i, value
        ranked.append({"rank": rank, **row})
    ranked.extend({"rank": None, **row} for row in unscored)
    return ranked


def write_leaderboard(
    rows: Sequence[Mapping[str, Any]],
    directory: str | Path,
    *,
    columns: Sequence[str] | None = None,
) -> dict[str, Path]:
    """Write ranked rows as ``leaderboard.csv``, ``.md`` and ``.json``; return the paths by suffix."""
    from workers.tracking import rows_to_csv

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    cols = list(columns or dict.fromkeys(k for r in rows for k in r))
    paths = {
        "csv": out / "leaderboard.csv",
        "md": out / "leaderboard.md",
        "json": out / "leaderboard.json",
    }
    paths["csv"].write_text(rows_to_csv(rows, cols))
    paths["md"].write_text(_markdown(rows, cols))
    clean = [{c: _json_value(r.get(c)) for c in cols} for r in rows]
    paths["json"].write_text(json.dumps(clean, indent=2, default=str, allow_nan=False) + "\n")
    return paths


def _json_value(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def _markdown(rows: Sequence[Mapping[str, Any]], cols: Sequence[str]) -> str:
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_cell(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


# --- plots ----------------------------------------------------------------------------------


def _axis_values(rows: Sequence[Mapping[str, Any]], key: str) -> tuple[list[float], list[str]]:
    """Numeric positions for one parameter: the values themselves, or category indices."""
    numbers_ = [_number(r.get(key)) for r in rows]
    if all(v is not None for v in numbers_):
        return [float(v) for v in numbers_ if v is not None], []
    cats = sorted({str(r.get(key)) for r in rows})
    return [float(cats.index(str(r.get(key)))) for r in rows], cats


def _spans_decades(values: Sequence[float]) -> bool:
    """All positive and max/min ≥ 10: plot on a log axis."""
    return bool(values) and min(values) > 0 and max(values) / min(values) >= 10


def _scored(rows: Sequence[Mapping[str, Any]], metric: str) -> list[dict]:
    return [_flat(r) for r in rows if _number(_flat(r).get(metric)) is not None]


def _best_index(values: Sequence[float], mode: Mode) -> int:
    return max(range(len(values)), key=lambda i: values[i] if mode == "max" else -values[i])


def stopped_early(rows: Sequence[Mapping[str, Any]]) -> list[bool]:
    """Per row: did it stop (a scheduler's decision, ASHA) before the furthest ``step`` any row
    reached? False for all when the rows carry no step."""
    steps = [_number(r.get("step")) for r in rows]
    last = max((s for s in steps if s is not None), default=None)
    return [last is not None and s is not None and s < last for s in steps]


def plot_metric_vs_params(
    rows: Sequence[Mapping[str, Any]],
    params: Sequence[str],
    metric: str,
    path: str | Path,
    *,
    mode: Mode = "max",
) -> Path:
    """One scatter subplot per hyperparameter (metric on y), log-x where values span decades."""
    from matplotlib.figure import Figure

    params = [label(p) for p in params]
    data = _scored(rows, metric)
    n = max(len(params), 1)
    ncols = min(n, 3)
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(4.2 * ncols, 3.4 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    from matplotlib.ticker import NullFormatter

    y = [float(r[metric]) for r in data]
    best = _best_index(y, mode) if y else None
    early = stopped_early(data)  # their metric is from an earlier step: drawn hollow
    for i, (ax, p) in enumerate(zip(axes, params, strict=False)):
        x, cats = _axis_values(data, p)
        full = [k for k in range(len(x)) if not early[k]]
        cut = [k for k in range(len(x)) if early[k]]
        ax.scatter(
            [x[k] for k in full],
            [y[k] for k in full],
            s=28,
            alpha=0.8,
            color="tab:blue",
            label="trained to the end",
        )
        if cut:
            ax.scatter(
                [x[k] for k in cut],
                [y[k] for k in cut],
                s=28,
                alpha=0.8,
                facecolors="none",
                edgecolors="tab:blue",
                label="stopped early",
            )
        if best is not None:
            ax.scatter([x[best]], [y[best]], s=160, marker="*", color="tab:red", label="best")
        if cats:
            ax.set_xticks(range(len(cats)), cats, rotation=30)
        elif _spans_decades(x):
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())  # labels on the decades only
        ax.set_xlabel(p)
        ax.set_ylabel(metric)
        ax.grid(True, alpha=0.3)
        if i == 0 and cut:
            ax.legend(fontsize="small")
    for ax in axes[len(params) :]:
        ax.set_visible(False)
    fig.suptitle(f"{metric} vs hyperparameters ({len(data)} trials, {mode})")
    return _save(fig, path)


def plot_parallel_coordinates(
    rows: Sequence[Mapping[str, Any]],
    params: Sequence[str],
    metric: str,
    path: str | Path,
    *,
    mode: Mode = "max",
) -> Path:
    """Parallel coordinates: one vertical axis per hyperparameter plus the metric, lines coloured
    by the metric (log-scaled axes where values span decades), the best trial drawn thick."""
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    keys = [label(p) for p in params] + [metric]
    data = _scored(rows, metric)
    fig = Figure(figsize=(max(6.0, 1.9 * len(keys) + 1.5), 4.8), layout="constrained")
    ax = fig.subplots()
    columns: list[list[float]] = []
    for k in keys:
        values, cats = _axis_values(data, k)
        log = not cats and _spans_decades(values)
        scaled = [math.log10(v) for v in values] if log else values
        lo, hi = (min(scaled), max(scaled)) if scaled else (0.0, 1.0)
        span = hi - lo or 1.0
        columns.append([(v - lo) / span if hi > lo else 0.5 for v in scaled])
        top = cats[-1] if cats else _tick(max(values) if values else 1.0)
        bottom = cats[0] if cats else _tick(min(values) if values else 0.0)
        i = len(columns) - 1
        ax.vlines(i, 0.0, 1.0, color="0.4", lw=1)
        ax.annotate(top, (i, 1.0), xytext=(0, 6), textcoords="offset points", ha="center")
        ax.annotate(bottom, (i, 0.0), xytext=(0, -14), textcoords="offset points", ha="center")
    metric_values = [float(r[metric]) for r in data]
    norm = Normalize(min(metric_values, default=0.0), max(metric_values, default=1.0))
    cmap = colormaps["viridis" if mode == "max" else "viridis_r"]
    best = _best_index(metric_values, mode) if metric_values else None
    xs = list(range(len(keys)))
    for j, value in enumerate(metric_values):
        ys = [col[j] for col in columns]
        thick = j == best
        ax.plot(
            xs, ys, color=cmap(norm(value)), lw=3.0 if thick else 1.2, alpha=1 if thick else 0.7
        )
    ax.set_xticks(xs, [f"{k}\n(log)" if _is_log(data, k) else k for k in keys])
    ax.set_yticks([])
    ax.set_ylim(-0.12, 1.12)
    ax.set_xlim(-0.3, len(keys) - 0.7)
    for side in ("left", "right", "top", "bottom"):
        ax.spines[side].set_visible(False)
    fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=ax, label=metric)
    fig.suptitle(f"{len(data)} trials; best ({mode} {metric}) drawn thick")
    return _save(fig, path)


def _is_log(data: Sequence[Mapping[str, Any]], key: str) -> bool:
    values, cats = _axis_values(data, key)
    return not cats and _spans_decades(values)


def _tick(value: float) -> str:
    return f"{value:.3g}"


def _save(fig: Any, path: str | Path) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)  # Figure.savefig attaches an Agg canvas for .png
    return out


# --- MLflow -------------------------------------------------------------------------------


def log_sweep_summary(
    client: MlflowClient,
    parent_run_id: str,
    rows: Sequence[Mapping[str, Any]],
    *,
    metric: str,
    mode: Mode,
    params: Sequence[str],
    best_metrics: Sequence[str] | None = None,
) -> list[dict]:
    """Log the leaderboard and plots to the parent run, plus the best trial; return the board.

    Artifacts: ``leaderboard.csv/.md/.json``, ``plots/metric_vs_params.png``,
    ``plots/parallel_coordinates.png``. The best config goes in tags ``best.<param>`` (tags, not
    params: a later summary of the same sweep, e.g. after a restore, may change it, and MLflow
    params are immutable); its metrics as metrics ``best_<name>`` (default: every numeric field
    that is not a hyperparameter or the rank).
    """
    from workers.tracking import log_artifact_file, log_metrics, set_tags

    board = leaderboard(rows, metric, mode)
    names = [label(p) for p in params]
    with tempfile.TemporaryDirectory(prefix="fgd-report-") as tmp:
        for p in write_leaderboard(board, tmp).values():
            log_artifact_file(client, parent_run_id, p)
        plots = Path(tmp) / "plots"
        plot_metric_vs_params(rows, names, metric, plots / "metric_vs_params.png", mode=mode)
        plot_parallel_coordinates(
            rows, names, metric, plots / "parallel_coordinates.png", mode=mode
        )
        log_artifact_file(client, parent_run_id, plots, "plots")
    best = board[0] if board and board[0]["rank"] is not None else None
    tags: dict[str, Any] = {"best.metric": metric, "best.mode": mode, "sweep.trials": len(board)}
    if best is not None:
        tags.update({f"best.{p}": best.get(p) for p in names if p in best})
        tags.update({f"best.{k}": best[k] for k in _ID_KEYS if best.get(k) is not None})
        keys = best_metrics or [
            k
            for k, v in best.items()
            if k not in names and k != "rank" and k not in _ID_KEYS and _number(v) is not None
        ]
        log_metrics(client, parent_run_id, {f"best_{k}": best.get(k) for k in keys}, step=0)
    set_tags(client, parent_run_id, tags)
    return board
