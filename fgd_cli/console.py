"""Terminal output of the `fgd` command: one rich console, user errors, metrics tables."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping, Sequence

import typer
from rich.console import Console, RenderableType
from rich.markup import escape
from rich.table import Table

console = Console()
err_console = Console(stderr=True)

# Metrics shown in tables: (key suffix after "bbox_"/"segm_", column title).
TABLE_STATS: tuple[tuple[str, str], ...] = (
    ("AP", "AP"),
    ("AP50", "AP50"),
    ("AP75", "AP75"),
    ("APs", "APs"),
    ("APm", "APm"),
    ("APl", "APl"),
    ("AR100", "AR100"),
)


def say(message: str, *, style: str | None = None) -> None:
    """Print a plain line: no markup or highlighting, never wrapped (paths stay copyable)."""
    console.print(message, style=style, markup=False, highlight=False, soft_wrap=True)


def print_wide(renderable: RenderableType) -> None:
    """Print a table; into a pipe or a file at its natural width instead of 80 columns, so
    that ids and values are never cut (a terminal keeps its own width)."""
    if console.is_terminal:
        console.print(renderable)
        return
    natural = console.measure(renderable, options=console.options.update_width(1000)).maximum
    Console(width=max(console.width, natural)).print(renderable)


class CliError(Exception):
    """A user-facing error: printed as one message, no traceback, exit status 1."""


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn expected failures (bad specs, missing files, bad weights) into a message and exit 1.

    Set FGD_DEBUG=1 to get the traceback instead.
    """
    try:
        yield
    except KeyboardInterrupt:
        err_console.print("[red]interrupted[/red]")
        raise typer.Exit(130) from None
    except (CliError, ValueError, OSError, FloatingPointError) as exc:
        # SpecError, DatasetError, WeightsError and checkpoint errors are ValueErrors; a
        # non-finite loss is a FloatingPointError.
        if os.environ.get("FGD_DEBUG"):
            raise
        err_console.print(
            f"[bold red]error:[/bold red] {escape(str(exc))}", highlight=False, soft_wrap=True
        )
        raise typer.Exit(1) from None


def fmt_stat(value: float | None) -> str:
    """A 0-1 COCO stat as a percentage; '-' where COCOeval had nothing to measure (-1)."""
    if value is None or value < 0:
        return "-"
    return f"{100 * value:.1f}"


def metrics_table(
    rows: Sequence[tuple[str, Mapping[str, float]]],
    *,
    title: str | None = None,
    iou_type: str = "bbox",
    stats: Sequence[tuple[str, str]] = TABLE_STATS,
    extra: Mapping[str, Sequence[str]] | None = None,
) -> Table:
    """One row per model: COCO stats in percent, plus `extra` columns (title -> cell per row)."""
    title = f"{title} - {iou_type} (%)" if title else f"{iou_type} (%)"
    table = Table(title=title, title_justify="left")
    table.add_column("model" if len(rows) > 1 else "", style="bold")
    for _, name in stats:
        table.add_column(name, justify="right")
    for col in extra or {}:
        table.add_column(col, justify="right")
    for i, (label, metrics) in enumerate(rows):
        cells = [fmt_stat(metrics.get(f"{iou_type}_{key}")) for key, _ in stats]
        cells += [values[i] for values in (extra or {}).values()]
        table.add_row(label, *cells)
    return table


def print_metrics(metrics: Mapping[str, float], *, title: str | None = None) -> None:
    """The COCO metrics of one model (bbox, and segm when present), in percent."""
    console.print(metrics_table([("val", metrics)], title=title))
    if any(k.startswith("segm_") for k in metrics):
        console.print(metrics_table([("val", metrics)], iou_type="segm"))
