"""A Ray Tune callback drawing a live table of trials and the best result so far.

Defined at module level so Tune pickles it by reference into its experiment state; the rich
`Live` display holds locks and is left out of the pickle.
"""

from __future__ import annotations

from typing import Any

from ray.tune import Callback
from rich.live import Live
from rich.table import Table

from fgd_cli.console import console


class LiveTrialsTable(Callback):  # type: ignore[misc]
    def __init__(self, metric: str, mode: str = "max") -> None:
        self.metric = metric
        self.sign = 1.0 if mode == "max" else -1.0
        self.rows: dict[str, dict[str, Any]] = {}
        self._live: Live | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_live": None}

    def _table(self) -> Table:
        table = Table(title="trials")
        for col in ("trial", "status", "step", self.metric, "config"):
            table.add_column(col)
        best: tuple[str, float] | None = None
        for trial_id, row in self.rows.items():
            value = row.get(self.metric)
            if isinstance(value, float) and (
                best is None or self.sign * value > self.sign * best[1]
            ):
                best = (trial_id, value)
            table.add_row(
                trial_id,
                row.get("status", ""),
                str(row.get("step", "")),
                f"{value:.4f}" if isinstance(value, float) else "",
                row.get("config", ""),
            )
        if best:
            table.caption = f"best so far: {best[0]} {self.metric}={best[1]:.4f}"
        return table

    def _update(self, trial: Any, status: str, result: dict | None = None) -> None:
        row = self.rows.setdefault(trial.trial_id, {})
        row["status"] = status
        config = trial.config or {}
        values = {**config.get("hp", {}), **config.get("grid", {})}
        row["config"] = ", ".join(
            f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items()
        )
        if result:
            row["step"] = result.get("step", row.get("step", ""))
            if self.metric in result:
                row[self.metric] = float(result[self.metric])
        if self._live is None:
            self._live = Live(self._table(), console=console, refresh_per_second=2)
            self._live.start()
        self._live.update(self._table())

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._update(trial, "RUNNING")

    def on_trial_result(
        self, iteration: int, trials: list, trial: Any, result: dict, **info: Any
    ) -> None:
        self._update(trial, "RUNNING", result)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._update(trial, "DONE")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._update(trial, "ERROR")

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None
