"""`fgd sweep`: run a job spec's sweep on Ray Tune with a live table of trials."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def sweep(
    spec: Annotated[Path | None, typer.Argument(help="Job spec with a sweep section.")] = None,
    example: Annotated[bool, typer.Option("--example", help="Print a small example spec.")] = False,
    name: Annotated[str | None, typer.Option(help="Sweep name (Tune folder, parent run).")] = None,
    resume: Annotated[bool, typer.Option(help="Restore the sweep NAME after a crash.")] = False,
    storage: Annotated[str | None, typer.Option(help="Tune storage path or s3:// URI.")] = None,
    experiment: Annotated[str, typer.Option(help="MLflow experiment.")] = "fgd",
) -> None:
    """Run the sweep of SPEC on Ray Tune, logging to MLflow; shows a live table of trials.

    Uses RAY_ADDRESS and MLFLOW_TRACKING_URI when set; otherwise a local Ray and the embedded
    MLflow server under FGD_HOME.
    """
    from fgd_cli.console import CliError, console, say, user_errors

    if example:
        from workers.examples import SMALL_SWEEP_YAML

        typer.echo(SMALL_SWEEP_YAML, nl=False)
        return
    with user_errors():
        if spec is None:
            raise CliError("give a job spec (or --example to print one)")
        if resume and not name:
            raise CliError("--resume needs --name of the sweep to restore")
        from fgd_cli.live import LiveTrialsTable
        from workers.spec import load_spec
        from workers.sweep import run_sweep
        from workers.sweep_spec import SweepSpec

        job = load_spec(spec)
        metric = (job.sweep or SweepSpec()).metric
        result = run_sweep(
            job,
            name=name,
            storage_path=storage,
            experiment=experiment,
            resume=resume,
            callbacks=[LiveTrialsTable(metric, (job.sweep or SweepSpec()).mode)],
        )
        console.print()
        if result.best is not None:
            say(f"best trial {result.best.trial_id}: {metric}={result.best.metrics.get(metric)}")
            say(f"best config {result.best.config}")
        if result.registered_model:
            say(f"registered model {result.registered_model[0]} v{result.registered_model[1]}")
        say(f"MLflow parent run {result.parent_run_id} at {result.tracking_uri}")
        say(f"MLflow UI: {result.tracking_uri}/#/experiments/{result.experiment_id}")
