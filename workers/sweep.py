"""Sweeps: a job spec with a `sweep` section run as a Ray Tune experiment, tracked in MLflow.

One parent MLflow run per sweep, one nested run per trial. Runs on whatever Ray cluster
`RAY_ADDRESS` names (a local one otherwise) and logs to `MLFLOW_TRACKING_URI` (the embedded
server otherwise).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from workers.spec import JobSpec
from workers.sweep_spec import FGD_PARAMS, Distribution, SweepSpec

SWEEP_TAG = "fgd.sweep_name"


def to_tune_space(sweep: SweepSpec) -> dict[str, Any]:
    """The Ray Tune param space of a sweep: {"hp": {...}, "grid": {dotted path: grid}}.

    The one place where the spec's distributions become `ray.tune` objects.
    """
    from ray import tune

    hp: dict[str, Any] = {}
    for name, dist in sweep.space.items():
        sampler = _range_sampler(dist)
        if sampler is not None:
            hp[name] = sampler
        elif dist.choice is not None:
            hp[name] = (
                tune.grid_search(list(dist.choice))
                if sweep.search == "grid"
                else tune.choice(list(dist.choice))
            )
        elif dist.grid is not None:
            hp[name] = tune.grid_search(list(dist.grid))
    grid = {path: tune.grid_search(list(values)) for path, values in sweep.grid.items()}
    return {"hp": hp, "grid": grid}


def _range_sampler(dist: Distribution) -> Any:
    """`tune.loguniform` / `tune.uniform` of a range distribution; None for choice and grid."""
    from ray import tune

    if dist.loguniform is not None:
        return tune.loguniform(*dist.loguniform)
    if dist.uniform is not None:
        return tune.uniform(*dist.uniform)
    return None


def build_search_alg(sweep: SweepSpec) -> Any:
    """None for random and grid (Tune's variant generator), Optuna TPE through Tune."""
    if sweep.search != "tpe":
        return None
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    alg = OptunaSearch(metric=sweep.metric, mode=sweep.mode)
    if sweep.max_concurrent_trials:
        return ConcurrencyLimiter(alg, max_concurrent=sweep.max_concurrent_trials)
    return alg


def build_scheduler(sweep: SweepSpec) -> Any:
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining

    if sweep.scheduler == "asha":
        return ASHAScheduler(
            time_attr="training_iteration",
            grace_period=sweep.asha.grace_period,
            reduction_factor=sweep.asha.reduction_factor,
        )
    if sweep.scheduler == "pbt":
        mutations: dict[str, Any] = {}
        for name, dist in sweep.space.items():
            sampler = _range_sampler(dist)
            if sampler is not None:
                mutations[name] = sampler
            elif dist.choice is not None:
                mutations[name] = list(dist.choice)
        return PopulationBasedTraining(
            time_attr="training_iteration",
            perturbation_interval=sweep.pbt.perturbation_interval,
            quantile_fraction=sweep.pbt.quantile_fraction,
            resample_probability=sweep.pbt.resample_probability,
            hyperparam_mutations={"hp": mutations},
        )
    return FIFOScheduler()


def tune_storage_path(explicit: str | None = None) -> str:
    """Tune's storage: explicit, else `FGD_TUNE_STORAGE`, else `$FGD_HOME/tune`."""
    if explicit:
        return explicit
    from workers.settings import tune_storage

    return str(tune_storage())


@dataclass
class TrialRow:
    trial_id: str
    status: str
    config: dict[str, Any]
    metrics: dict[str, float]
    mlflow_run_id: str | None = None
    node_id: str | None = None
    run_status: str | None = None  # the trial's MLflow run: FINISHED, KILLED (stopped), FAILED


@dataclass
class SweepResult:
    name: str
    parent_run_id: str
    experiment_id: str
    tracking_uri: str
    storage_path: str
    rows: list[TrialRow] = field(default_factory=list)
    best: TrialRow | None = None
    registered_model: tuple[str, str] | None = None  # (name, version)
    timings: dict[str, float] = field(default_factory=dict)  # seconds per phase of the driver
    report: dict[str, Any] | None = None  # teacher, baseline and FGD side by side (distill)


def _flat_config(config: dict[str, Any]) -> dict[str, Any]:
    return {**(config.get("hp") or {}), **(config.get("grid") or {})}


# A local runtime started for a sweep has no dashboard, so nothing reads Ray's own metrics:
# they are not collected (about 1 CPU second a minute less on the CPUs the trials train on).
LOCAL_RAY_SYSTEM_CONFIG = {"enable_metrics_collection": False, "event_stats": False}


def start_local_ray(num_cpus: int | None = None, object_store_memory: int | None = None) -> None:
    """Start a Ray runtime on this machine for sweeps: no dashboard, no metrics collection,
    the workers' output kept in Ray's log files."""
    import ray

    ray.init(
        num_cpus=num_cpus,
        object_store_memory=object_store_memory,
        log_to_driver=False,
        include_dashboard=False,
        _system_config=dict(LOCAL_RAY_SYSTEM_CONFIG),
    )


def _ensure_ray(address: str | None) -> None:
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        start_local_ray()


def _find_parent(client: Any, experiment_id: str, name: str) -> str | None:
    runs = client.search_runs(
        [experiment_id], filter_string=f"tags.`{SWEEP_TAG}` = '{name}'", max_results=1
    )
    return runs[0].info.run_id if runs else None


def run_sweep(
    spec: JobSpec,
    *,
    name: str | None = None,
    tracking_uri: str | None = None,
    experiment: str = "fgd",
    storage_path: str | None = None,
    ray_address: str | None = None,
    resume: bool = False,
    teacher_uri: str | None = None,
    callbacks: list[Any] | None = None,
    register_as: str | None = None,
    teacher_metrics: dict[str, float] | None = None,
) -> SweepResult:
    """Run (or, with `resume`, restore and finish) the sweep of `spec`.

    Args:
        spec: a job spec; its `sweep` section (default: one trial) says what to search.
        name: the experiment name in Tune's storage and the parent run's name.
        resume: restore the sweep of this name from its storage path (after a driver died).
        teacher_uri: an MLflow URI of the teacher's weights, overriding the spec's teacher.
        callbacks: Ray Tune callbacks (e.g. a live progress table).
        register_as: Model Registry name for the best network (default from the job kind).
        teacher_metrics: the teacher's evaluation, for the distillation report (default: the
            teacher job's, when the sweep trains its teacher first).
    """
    from ray import tune

    from workers.tracking import (
        create_parent_run,
        finish_run,
        get_or_create_experiment,
        make_client,
        register_model_version,
    )
    from workers.tracking_server import local_artifact_store
    from workers.tracking_server import tracking_uri as default_tracking_uri
    from workers.trainable import fgd_trainable, flat_params

    t_start = time.perf_counter()
    sweep: SweepSpec = spec.sweep or SweepSpec()
    name = name or f"{spec.kind}-{time.strftime('%Y%m%d-%H%M%S')}"
    uri = tracking_uri or default_tracking_uri()
    client = make_client(uri)
    experiment_id = get_or_create_experiment(client, experiment)
    storage = tune_storage_path(storage_path)
    _ensure_ray(ray_address)

    def sub_sweep(job: JobSpec, suffix: str) -> SweepResult:
        """A sweep this one runs first (its teacher, its baseline), named after it."""
        return run_sweep(
            job,
            name=f"{name}-{suffix}",
            tracking_uri=uri,
            experiment=experiment,
            storage_path=storage,
            ray_address=ray_address,
            resume=resume,
            callbacks=callbacks,
        )

    if (
        teacher_uri is None
        and spec.kind == "distill"
        and spec.teacher is not None
        and spec.teacher.train
    ):
        # "Train one first": a one-trial teacher job, registered, whose weights the trials fetch.
        teacher = sub_sweep(spec.teacher_job(), "teacher")
        if teacher.best is None or not teacher.best.mlflow_run_id:
            raise RuntimeError(f"the teacher job of sweep {name} produced no model")
        teacher_uri = f"runs:/{teacher.best.mlflow_run_id}/model/state_dict.pt"
        teacher_metrics = teacher_metrics or teacher.best.metrics
    spec, sweep, baseline = _with_baseline(spec, sweep)
    # A baseline the main sweep cannot hold (a search or an early-stopping scheduler) gets
    # its own sweep first, over the same seeds.
    baseline_rows = sub_sweep(baseline, "baseline").rows if baseline is not None else []
    parent = _find_parent(client, experiment_id, name) if resume else None
    if parent is None:
        parent = create_parent_run(
            client,
            experiment_id,
            name=name,
            params=flat_params(spec),
            tags={SWEEP_TAG: name, "fgd.kind": spec.kind},
        )
    tracking = {
        "uri": uri,
        "experiment_id": experiment_id,
        "parent_run_id": parent,
        "teacher_uri": teacher_uri,
        # PBT may clone a finished trial's final state; otherwise that state lives in MLflow only.
        "final_state_in_tune": sweep.scheduler == "pbt",
        # The server's local artifact directory, for trials on its machine to write into.
        "artifact_store": store.to_dict() if (store := local_artifact_store(uri)) else None,
    }
    job = spec.to_dict()
    trainable = tune.with_resources(
        tune.with_parameters(fgd_trainable, job=job, tracking=tracking),
        {"cpu": sweep.resources.cpu, "gpu": sweep.resources.gpu},
    )
    experiment_path = _join(storage, name)
    if resume and tune.Tuner.can_restore(experiment_path):
        tuner = tune.Tuner.restore(
            experiment_path, trainable=trainable, resume_errored=True, restart_errored=False
        )
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=to_tune_space(sweep),
            tune_config=tune.TuneConfig(
                metric=sweep.metric,
                mode=sweep.mode,
                search_alg=build_search_alg(sweep),
                scheduler=build_scheduler(sweep),
                num_samples=sweep.num_samples,
                max_concurrent_trials=sweep.max_concurrent_trials
                if sweep.search != "tpe"
                else None,
                time_budget_s=sweep.time_budget_s,
                # Trial processes keep torch and MLflow imported between trials.
                reuse_actors=True,
            ),
            run_config=tune.RunConfig(
                name=name,
                storage_path=storage,
                failure_config=tune.FailureConfig(max_failures=sweep.max_failures),
                # PBT hands a trial's checkpoints to others: keep enough for them to exploit.
                checkpoint_config=tune.CheckpointConfig(
                    num_to_keep=4 if sweep.scheduler == "pbt" else 2
                ),
                callbacks=callbacks,
                verbose=0,
            ),
        )
    t_fit = time.perf_counter()
    grid = tuner.fit()
    t_done = time.perf_counter()

    result = SweepResult(name, parent, experiment_id, uri, storage)
    for trial in grid:
        metrics = {
            k: float(v)
            for k, v in (trial.metrics or {}).items()
            if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
        }
        trial_id = (trial.metrics or {}).get("trial_id", "")
        run_id = _trial_run(client, experiment_id, parent, trial_id)
        status = "ERROR" if trial.error else "TERMINATED"
        run_status = None
        if run_id:
            run_status = client.get_run(run_id).info.status
            if run_status == "RUNNING":  # stopped early by the scheduler
                finish_run(client, run_id, "KILLED")
                run_status = "KILLED"
        result.rows.append(
            TrialRow(
                trial_id=trial_id,
                status=status,
                config=_flat_config(trial.config or {}),
                metrics=metrics,
                mlflow_run_id=run_id,
                node_id=(trial.metrics or {}).get("node_id"),
                run_status=run_status,
            )
        )
    # A distill sweep's best is an FGD student, never one of its baseline twins.
    ranked = [
        r
        for r in result.rows
        if sweep.metric in r.metrics and r.config.get("kind", spec.kind) == spec.kind
    ]
    sign = 1 if sweep.mode == "max" else -1
    if ranked:
        result.best = max(ranked, key=lambda r: sign * r.metrics[sweep.metric])
    result.timings["setup"] = t_fit - t_start  # includes the sweeps this one runs first
    result.timings["fit"] = t_done - t_fit
    result.timings["collect"] = time.perf_counter() - t_done
    t_summary = time.perf_counter()
    _summarise(client, result, sweep)
    result.report = _report(client, result, spec, sweep, baseline_rows, teacher_metrics)
    result.timings["summary"] = time.perf_counter() - t_summary
    t_register = time.perf_counter()
    # Only a trial that ran to its end holds a final model to register.
    finished = [r for r in ranked if r.run_status == "FINISHED" and r.mlflow_run_id]
    to_register = max(finished, key=lambda r: sign * r.metrics[sweep.metric]) if finished else None
    if to_register is not None:
        model_name = register_as or (
            "fgd-teacher" if spec.kind == "teacher" else f"fgd-{spec.kind}-student"
        )
        version = register_model_version(
            client,
            name=model_name,
            run_id=to_register.mlflow_run_id,
            artifact_path="model",
            description=f"best of sweep {name} by {sweep.metric} ({sweep.mode})",
        )
        result.registered_model = (model_name, str(version))
    result.timings["register"] = time.perf_counter() - t_register
    finish_run(client, parent, "FINISHED")
    return result


def _join(storage: str, name: str) -> str:
    if "://" in storage:
        return storage.rstrip("/") + "/" + name
    return str(Path(storage).expanduser().resolve() / name)


def _trial_run(client: Any, experiment_id: str, parent: str, trial_id: str) -> str | None:
    if not trial_id:
        return None
    runs = client.search_runs(
        [experiment_id],
        filter_string=(
            f"tags.`fgd.trial_key` = '{trial_id}' and tags.`mlflow.parentRunId` = '{parent}'"
        ),
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


def _summarise(client: Any, result: SweepResult, sweep: SweepSpec) -> None:
    from workers.report import log_sweep_summary

    rows = []
    for r in result.rows:
        rows.append(
            {
                "trial_id": r.trial_id,
                "status": r.status,
                "mlflow_run_id": r.mlflow_run_id,
                **r.config,
                **r.metrics,
            }
        )
    params = [p for p in (*FGD_PARAMS, "ratio") if any(p in r.config for r in result.rows)]
    params += [p for p in sweep.grid if p not in params]
    if rows:
        log_sweep_summary(
            client,
            result.parent_run_id,
            rows,
            metric=sweep.metric,
            mode=sweep.mode,
            params=params,
            best_metrics=sorted({k for r in result.rows for k in r.metrics}),
        )


def _with_baseline(spec: JobSpec, sweep: SweepSpec) -> tuple[JobSpec, SweepSpec, JobSpec | None]:
    """Where a distill job asks for a baseline: the sweep with it, or the baseline's own job.

    A plain sweep (FIFO, no search space) takes the baseline as one more grid axis,
    ``kind: [distill, baseline]``, so the two students of a seed train side by side. A search or
    an early-stopping scheduler would rank the baseline among FGD trials or stop it early, so
    the baseline then gets its own sweep over the same grid (minus FGD's fields).
    """
    if spec.kind != "distill" or not spec.baseline:
        return spec, sweep, None
    if "kind" in sweep.grid:
        return spec, sweep, None
    if not sweep.space and sweep.scheduler == "fifo":
        grid = {"kind": ["distill", "baseline"], **sweep.grid}
        sweep = sweep.model_copy(update={"grid": grid})
        return spec.model_copy(update={"sweep": sweep}), sweep, None
    grid = {
        k: v for k, v in sweep.grid.items() if not k.startswith(("fgd.", "teacher.", "baseline"))
    }
    own = SweepSpec.model_validate(
        {
            "grid": grid,
            "search": "grid" if grid else "random",
            "resources": sweep.resources,
            "max_concurrent_trials": sweep.max_concurrent_trials,
            "metric": sweep.metric,
            "mode": sweep.mode,
            "max_failures": sweep.max_failures,
        }
    )
    return spec, sweep, spec.baseline_job().model_copy(update={"sweep": own})


def _report(
    client: Any,
    result: SweepResult,
    spec: JobSpec,
    sweep: SweepSpec,
    baseline_rows: list[TrialRow],
    teacher_metrics: dict[str, float] | None,
) -> dict[str, Any] | None:
    """The distillation report of a sweep holding baseline and FGD students, logged on its parent."""
    from workers.distill_report import distillation_report, log_distillation_report

    trials = [(r, spec.kind) for r in result.rows] + [(r, "baseline") for r in baseline_rows]
    rows = [
        {
            "mlflow_run_id": r.mlflow_run_id,
            **r.config,
            **r.metrics,
            "kind": r.config.get("kind", kind),
        }
        for r, kind in trials
    ]
    teacher = (teacher_metrics or {}).get(sweep.metric)
    report = distillation_report(
        rows,
        metric=sweep.metric,
        teacher=teacher,
        group_keys=[k for k in sweep.grid if k != "kind"],
    )
    if report is not None:
        log_distillation_report(client, result.parent_run_id, report)
    return report


ProgressFn = Callable[[list[TrialRow]], None]
