"""`fgd sweep`: run a job spec's sweep on Ray Tune with a live table of trials."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

EXAMPLE = """\
# A small FGD sweep on the generated shapes data: a teacher is trained first, then four
# students search alpha and the temperature under ASHA. About two minutes on two CPU cores.
kind: distill
data:
  shapes: {num_train: 256, num_val: 48, image_size: 96, seed: 0}
model: {arch: retinanet, backbone: resnet18, fpn_channels: 32, min_size: 96, max_size: 96}
teacher:
  train: true
  model: {arch: retinanet, backbone: resnet34, fpn_channels: 32, min_size: 96, max_size: 96}
  training:
    batch_size: 8
    schedule: {iterations: 60, warmup_iters: 10}
fgd: {alpha: 0.001, beta: 0.0005, gamma: 0.0005, lambda: 0.000005, temp: 2.0}
train:
  batch_size: 8
  schedule: {iterations: 30, warmup_iters: 5}
  eval_every: 10
  checkpoint_every: 10
  log_every: 5
evaluate_teacher: true
sweep:
  space:
    alpha: {loguniform: [0.00001, 0.001]}
    temp: {choice: [1.0, 2.0, 4.0]}
  search: random
  scheduler: asha
  asha: {grace_period: 1, reduction_factor: 2}
  num_samples: 4
  max_concurrent_trials: 2
  resources: {cpu: 1}
  metric: bbox_AP
  mode: max
  max_failures: 1
"""


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
        typer.echo(EXAMPLE, nl=False)
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
