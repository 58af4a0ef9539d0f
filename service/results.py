"""Results read back from MLflow: a job's trials (nested runs of its parent run) and leaderboard.

The client comes from an injectable factory (``tracking_uri -> MlflowClient``), so route unit
tests pass a fake; ``mlflow`` itself is imported only when the default factory is first used.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Literal

from service.schemas import LeaderboardRow, MlflowLinks, TrialPublic
from workers.report import leaderboard
from workers.sweep_spec import SweepSpec
from workers.tracking import TRIAL_KEY_TAG, list_trial_runs

ClientFactory = Callable[[str], Any]
DEFAULT_METRIC: str = SweepSpec.model_fields["metric"].default
DEFAULT_MODE: Literal["max", "min"] = SweepSpec.model_fields["mode"].default


class ResultsUnavailable(RuntimeError):
    """No tracking server is configured or running, or it did not answer."""


def _default_factory(uri: str) -> Any:
    from workers.tracking import make_client

    return make_client(uri)


def metric_of(spec: dict[str, Any]) -> tuple[str, Literal["max", "min"]]:
    """The metric a job ranks its trials by, and its direction."""
    sweep = spec.get("sweep") or {}
    return sweep.get("metric", DEFAULT_METRIC), sweep.get("mode", DEFAULT_MODE)


class ResultsReader:
    """Reads trials and leaderboards of jobs from one MLflow tracking server."""

    def __init__(
        self, *, tracking_uri: str | None = None, client_factory: ClientFactory | None = None
    ) -> None:
        self._uri = tracking_uri
        self._factory = client_factory or _default_factory

    @property
    def known_uri(self) -> str | None:
        """The configured (or last discovered) tracking URI; looks nothing up."""
        return self._uri

    def tracking_uri(self) -> str:
        """The configured URI, else the embedded server's if it is running (never started)."""
        if self._uri is None:
            from workers.tracking_server import embedded_server

            handle = embedded_server()
            if handle is None:
                raise ResultsUnavailable(
                    "no MLflow tracking server: set MLFLOW_TRACKING_URI or start the embedded one"
                )
            self._uri = handle.uri
        return self._uri

    def client(self) -> Any:
        """A client of the tracking server, made by the injected factory (``MlflowClient`` by
        default).

        Raises:
            ResultsUnavailable: no tracking server is configured or running.
        """
        return self._factory(self.tracking_uri())

    def links(self, *, experiment_id: str | None, run_id: str | None) -> MlflowLinks:
        return MlflowLinks(**self.link_fields(experiment_id=experiment_id, run_id=run_id))

    def link_fields(self, *, experiment_id: str | None, run_id: str | None) -> dict[str, Any]:
        """``links(...)``'s fields as a dict (a page of jobs validates them all at once)."""
        uri = self.known_uri
        ui = uri.rstrip("/") if uri and uri.startswith(("http://", "https://")) else None
        exp_url = f"{ui}/#/experiments/{experiment_id}" if ui and experiment_id else None
        return {
            "tracking_uri": uri,
            "experiment_id": experiment_id,
            "run_id": run_id,
            "experiment_url": exp_url,
            "run_url": f"{exp_url}/runs/{run_id}" if exp_url and run_id else None,
        }

    def trials(self, *, experiment_id: str, parent_run_id: str) -> list[TrialPublic]:
        """The nested runs of ``parent_run_id``, oldest first."""
        uri = self.tracking_uri()
        try:
            runs = list_trial_runs(self._factory(uri), experiment_id, parent_run_id)
        except Exception as exc:  # MlflowException, connection errors: all "unavailable"
            raise ResultsUnavailable(f"MLflow at {uri} could not be read: {exc}") from exc
        return [_trial(run) for run in runs]

    def leaderboard(
        self,
        *,
        experiment_id: str,
        parent_run_id: str,
        metric: str,
        mode: Literal["max", "min"],
    ) -> list[LeaderboardRow]:
        """Trials ranked by ``metric`` (best first; trials without it last, rank None)."""
        trials = self.trials(experiment_id=experiment_id, parent_run_id=parent_run_id)
        by_id = {t.run_id: t for t in trials}
        rows = [{"run_id": t.run_id, metric: t.metrics.get(metric)} for t in trials]
        ranked = leaderboard(rows, metric, mode)
        return [
            LeaderboardRow(rank=r["rank"], value=r.get(metric), trial=by_id[r["run_id"]])
            for r in ranked
        ]


def _trial(run: Any) -> TrialPublic:
    info, data = run.info, run.data
    return TrialPublic(
        run_id=str(info.run_id),
        name=getattr(info, "run_name", None),
        trial_key=data.tags.get(TRIAL_KEY_TAG),
        status=str(info.status),
        start_time=_ms(info.start_time),
        end_time=_ms(info.end_time),
        params={str(k): str(v) for k, v in data.params.items()},
        metrics={str(k): float(v) for k, v in data.metrics.items()},
    )


def _ms(value: int | None) -> datetime | None:
    return datetime.fromtimestamp(value / 1000, tz=UTC) if value else None


def progress_of(
    trials: list[TrialPublic], metric: str, mode: Literal["max", "min"]
) -> dict[str, Any]:
    """A job's ``progress`` from its trials: counts by status, and the best metric so far."""
    scored = [t for t in trials if t.metrics.get(metric) is not None]
    sign = 1.0 if mode == "max" else -1.0
    best = max(scored, key=lambda t: sign * t.metrics[metric], default=None)
    return {
        "trials_done": sum(t.status == "FINISHED" for t in trials),
        "trials_running": sum(t.status in ("RUNNING", "SCHEDULED") for t in trials),
        "trials_failed": sum(t.status in ("FAILED", "KILLED") for t in trials),
        "best": None
        if best is None
        else {"name": metric, "value": best.metrics[metric], "mode": mode, "run_id": best.run_id},
    }
