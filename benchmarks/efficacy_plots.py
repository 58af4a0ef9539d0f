"""The two plots of `benchmarks/efficacy.py` (matplotlib's object API, no pyplot)."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

COLOURS = {"teacher": "#444444", "baseline": "#1f77b4", "distill": "#d62728"}


def _figure(width: float = 6.0, height: float = 4.0) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def plot_ap_by_model(out: dict[str, Any], path: Path) -> Path:
    """Box AP of the teacher, the baseline and the FGD students: mean bar, one dot per seed."""
    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    groups = [
        ("teacher", [out["teacher_ap"]]),
        ("baseline", out["baseline_ap"]),
        ("distill", out["fgd_ap"]),
    ]
    for i, (name, values) in enumerate(groups):
        pts = [100 * v for v in values]
        ax.bar(i, statistics.fmean(pts), color=COLOURS[name], alpha=0.35, width=0.6)
        ax.scatter([i] * len(pts), pts, color=COLOURS[name], zorder=3)
        if len(pts) > 1:
            ax.errorbar(
                i,
                statistics.fmean(pts),
                yerr=[[statistics.fmean(pts) - min(pts)], [max(pts) - statistics.fmean(pts)]],
                color=COLOURS[name],
                capsize=6,
            )
    ax.set_xticks(range(3), ["teacher", "baseline student", "FGD student"])
    ax.set_ylabel("box AP (COCOeval, points)")
    closed = out.get("gap_closed")
    title = "AP per model (dots: seeds, bars: min-max)"
    if closed is not None:
        title += f"; gap closed {100 * closed:.0f} %"
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def plot_ap_vs_step(out: dict[str, Any], path: Path) -> Path:
    """Box AP against the training step for every baseline and FGD student."""
    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    for kind, label in (("baseline", "baseline"), ("distill", "FGD")):
        for seed, history in enumerate(out["history"][kind]):
            if history:
                steps, values = zip(*history, strict=True)
                ax.plot(
                    steps,
                    [100 * v for v in values],
                    marker="o",
                    color=COLOURS[kind],
                    alpha=0.8,
                    label=label if seed == 0 else None,
                )
    ax.axhline(100 * out["teacher_ap"], color=COLOURS["teacher"], linestyle="--", label="teacher")
    ax.set_xlabel("training step")
    ax.set_ylabel("box AP (COCOeval, points)")
    ax.legend(loc="lower right")
    ax.set_title("AP during training, one line per seed", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
