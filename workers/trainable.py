"""The Ray Tune trainable: a thin adapter from a trial's config to `fgd_core`'s `run_job`.

validate config -> build the job -> restore from the Tune checkpoint if one is given -> train
-> report metrics with a checkpoint at every evaluation. Each trial logs to its own nested MLflow
run over HTTP, so it can run on any node; a retried or restored trial continues that run.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import shutil
import tempfile
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from pathlib import Path
from typing import Any

from workers.artifact_store import LocalArtifactStore
from workers.spec import JobSpec
from workers.sweep_spec import FGD_PARAMS, RATIO

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"
META_FILE = "trial.json"
COMPLETE_KEY = "complete"  # in META_FILE: the trial ran to its end (see _complete_checkpoint)
# A trial's scratch folders in the temporary directory: <prefix><pid>-<random>, removed when it
# ends; those of a process that died without cleaning up are removed later (remove_stale_scratch).
SCRATCH_PREFIXES = ("fgd-ckpt-", "fgd-model-", "fgd-teacher-")
STALE_AFTER_S = 3600.0

# Fault injection for the fault-tolerance tests: with FGD_FAULT_AT_STEP=N and
# FGD_FAULT_MARKER=<path>, the first trial to reach step N creates the marker and raises once;
# FGD_FAULT_AT_STEP=end raises once after a trial's last report instead.
FAULT_STEP_ENV = "FGD_FAULT_AT_STEP"
FAULT_MARKER_ENV = "FGD_FAULT_MARKER"
FAULT_AT_END = "end"


class InjectedFault(RuntimeError):
    """Raised once by the fault-injection hook (tests only)."""


def _maybe_inject_fault(step: int | str) -> None:
    at = os.environ.get(FAULT_STEP_ENV)
    marker = os.environ.get(FAULT_MARKER_ENV)
    if not at or not marker or str(step) != at:
        return
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    os.close(fd)
    raise InjectedFault(f"injected fault at step {step}")


def scratch_folder(prefix: str, *, create: bool = True) -> Path:
    """A new scratch folder of this process (``prefix`` is one of SCRATCH_PREFIXES); with
    ``create=False`` only its unused path, for a folder made later if at all."""
    if create:
        return Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-"))
    return Path(tempfile.gettempdir()) / f"{prefix}{os.getpid()}-{uuid.uuid4().hex}"


def remove_stale_scratch(
    root: Path | None = None, *, older_than: float = STALE_AFTER_S
) -> list[Path]:
    """Remove the scratch folders that earlier trials left behind: those of this process (a
    trial process runs one trial at a time, so they belong to trials that are over: Tune stops
    a trial early by abandoning its thread, which never cleans up), and those whose process is
    gone (SIGKILL, the OOM killer) once they are older than ``older_than`` seconds. A checkpoint
    or a teacher is 80 MB or more; a node would otherwise fill its disk over many sweeps."""
    root = Path(root) if root is not None else Path(tempfile.gettempdir())
    now = time.time()
    removed: list[Path] = []
    for prefix in SCRATCH_PREFIXES:
        for path in root.glob(f"{prefix}*"):
            pid = path.name[len(prefix) :].split("-", 1)[0]
            if not pid.isdigit():
                continue
            if int(pid) == os.getpid():
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
                continue
            if _process_alive(int(pid)):
                continue
            try:
                age = now - path.stat().st_mtime
            except FileNotFoundError:
                continue
            if age >= older_than:
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def apply_overrides(job: dict[str, Any], config: dict[str, Any]) -> JobSpec:
    """The trial's JobSpec: the job with the sampled hyperparameters and grid values applied.

    Args:
        job: the sweep's JobSpec as a dict (`JobSpec.to_dict()`).
        config: the trial config, {"hp": {alpha, ..., ratio}, "grid": {dotted path: value}}.
    """
    spec = copy.deepcopy(job)
    spec.pop("sweep", None)
    for path, value in (config.get("grid") or {}).items():
        node = spec
        *parents, leaf = path.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    hp = config.get("hp") or {}
    fgd = spec.setdefault("fgd", {})
    for name in FGD_PARAMS:
        if name in hp:
            fgd[name] = float(hp[name])
    if RATIO in hp:
        fgd["calibrate_ratio"] = float(hp[RATIO])
    if spec.get("kind") != "distill":
        spec.pop("teacher", None)
        spec["baseline"] = False
    return JobSpec.model_validate(spec)


def flat_params(spec: JobSpec) -> dict[str, Any]:
    """Every field of the spec as dotted MLflow params (FGD's under alpha, ..., temp)."""
    out: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            out[prefix] = value

    walk("", spec.to_dict())
    for name in FGD_PARAMS:
        out[name] = out.pop(f"fgd.{name}", None)
    return {k: v for k, v in out.items() if v is not None}


def resolve_teacher_weights(
    spec: JobSpec, teacher_uri: str | None, client: Any, downloads: Path | None = None
) -> str | None:
    """A local file of the teacher's weights: the checkpoint, or the MLflow artifact fetched
    into `downloads` (else a temporary folder of MLflow's that nobody removes)."""
    if spec.kind != "distill" or spec.teacher is None:
        return None
    uri = teacher_uri or spec.teacher.mlflow_uri
    if uri:
        from workers.tracking import download_run_artifact

        path = download_run_artifact(uri, client=client, dst_path=downloads)
        if path.is_dir():  # a registered model or run folder: the one state-dict file in it
            files = sorted(path.rglob("*.pt"))
            if len(files) != 1:
                raise ValueError(f"{uri} holds {len(files)} .pt files; point at one of them")
            path = files[0]
        return str(path)
    return spec.teacher.checkpoint


def fgd_trainable(config: dict[str, Any], *, job: dict[str, Any], tracking: dict[str, Any]) -> None:
    """Train one trial; reports metrics and a checkpoint at every evaluation.

    A teacher fetched from MLflow lands in a folder of the trial's own, removed when the trial
    ends however it ends (a sweep's trials would otherwise leave a copy each on the node).
    """
    try:
        remove_stale_scratch()
    except OSError:
        log.warning("could not clear stale scratch folders", exc_info=True)
    # Made only when a teacher is fetched: a trial killed outright leaves no empty folder.
    downloads = scratch_folder("fgd-teacher-", create=False)
    try:
        _train_trial(config, job, tracking, downloads)
    finally:
        shutil.rmtree(downloads, ignore_errors=True)


def _train_trial(
    config: dict[str, Any], job: dict[str, Any], tracking: dict[str, Any], downloads: Path
) -> None:
    import ray
    import torch
    from ray import tune

    from fgd_core.training.checkpoint import load_checkpoint, save_checkpoint
    from fgd_core.training.jobs import Callbacks, run_job
    from workers.convert import job_config
    from workers.tracking import (
        finish_run,
        log_artifact_file,
        log_json_artifact,
        log_metrics,
        make_client,
        open_trial_run,
    )

    ctx = tune.get_context()
    trial_id = ctx.get_trial_id()
    node_id = ray.get_runtime_context().get_node_id()
    resources = ctx.get_trial_resources().required_resources
    # Two oversubscribed cores run many times slower: one torch thread per CPU of the trial.
    torch.set_num_threads(max(1, int(resources.get("CPU", 1))))

    resume = None
    run_id = None
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            meta = json.loads((Path(folder) / META_FILE).read_text())
            if not meta.get(COMPLETE_KEY):
                resume = load_checkpoint(Path(folder) / STATE_FILE)
        if meta.get(COMPLETE_KEY):
            _report_again(meta, trial_id)
            return
        if meta.get("trial_id") == trial_id:  # PBT may hand over another trial's checkpoint
            run_id = meta.get("mlflow_run_id")

    spec = apply_overrides(job, config)
    client = make_client(tracking["uri"])
    # The server's own artifact directory when this node reaches it: no upload of the
    # checkpoint and the weights through the server.
    store = LocalArtifactStore.from_dict(tracking.get("artifact_store"))
    teacher_weights = resolve_teacher_weights(spec, tracking.get("teacher_uri"), client, downloads)
    job_cfg = job_config(spec, teacher_weights=teacher_weights)
    hp = dict(config.get("hp") or {})
    if resume is not None and "fgd_hparams" in resume and hp:
        # PBT: the values in force are the ones the scheduler chose for this trial.
        resume["fgd_hparams"].update({k: float(v) for k, v in hp.items() if k != RATIO})

    run_id = open_trial_run(
        client,
        tracking["experiment_id"],
        tracking["parent_run_id"],
        trial_id,
        name=ctx.get_trial_name(),
        params=flat_params(spec),
        run_id=run_id,
    )
    # The run's artifact URI, looked up once for every file written straight into the store.
    artifact_uri = client.get_run(run_id).info.artifact_uri if store and store.reachable() else None
    direct = {"store": store, "artifact_uri": artifact_uri}
    evaluations: dict[int, dict[str, float]] = {}
    in_force: dict[str, float] = {}
    last_train: dict[str, float] = {}
    teacher_eval: dict[str, float] = {}
    # Metrics and artifacts travel to MLflow on background threads while the trial trains; the
    # trial waits for all of them before its run is finished (or failed).
    mlflow_io = _Background()

    def on_metrics(step: int, metrics: dict[str, float]) -> None:
        last_train.clear()
        last_train.update({f"train/{k}": v for k, v in metrics.items()})
        mlflow_io.submit(log_metrics, client, run_id, dict(last_train), step)
        _maybe_inject_fault(step)

    def on_evaluation(step: int, metrics: dict[str, float]) -> None:
        evaluations[step] = metrics
        mlflow_io.submit(log_metrics, client, run_id, dict(metrics), step)

    def on_teacher(metrics: dict[str, float]) -> None:
        teacher_eval.update({f"teacher_{k}": v for k, v in metrics.items()})
        mlflow_io.submit(log_metrics, client, run_id, dict(teacher_eval), 0)

    final_step = job_cfg.train.schedule.iterations
    # The last report waits until the run is complete in MLflow: a scheduler may stop the trial
    # at that report (ASHA at its top rung), which ends this function there.
    final_report: list[tuple[dict[str, Any], Path]] = []

    def on_checkpoint(step: int, state: dict[str, Any]) -> None:
        if "fgd_hparams" in state:
            in_force.update(state["fgd_hparams"])
            hp_now = {f"hp/{k}": v for k, v in in_force.items()}
            mlflow_io.submit(log_metrics, client, run_id, hp_now, step)
        folder = scratch_folder("fgd-ckpt-")
        save_checkpoint(state, folder / STATE_FILE)
        meta = {"trial_id": trial_id, "mlflow_run_id": run_id, "step": step}
        (folder / META_FILE).write_text(json.dumps(meta))
        if step == final_step:
            # The final checkpoint goes to MLflow while the trial finishes.
            mlflow_io.submit(
                log_artifact_file, client, run_id, folder / STATE_FILE, "checkpoint", **direct
            )
        report: dict[str, Any] = {
            k: v for k, v in {**teacher_eval, **last_train}.items() if math.isfinite(v)
        }
        report.update({k: v for k, v in evaluations.get(step, {}).items() if math.isfinite(v)})
        report.update({"step": step, **{f"hp/{k}": v for k, v in in_force.items()}})
        report["node_id"] = node_id
        if step == final_step:
            final_report.append((report, folder))
            return
        try:
            tune.report(report, checkpoint=tune.Checkpoint.from_directory(str(folder)))
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    callbacks = Callbacks(
        on_metrics=on_metrics,
        on_evaluation=on_evaluation,
        on_checkpoint=on_checkpoint,
        on_teacher_evaluation=on_teacher,
        # on_checkpoint serializes the state before it returns: no copy of it is needed.
        copy_checkpoint_state=False,
    )
    try:
        result = run_job(job_cfg, callbacks=callbacks, resume=resume)
        # The weights are saved and sent while the final checkpoint is still on its way.
        folder = scratch_folder("fgd-model-")
        mlflow_io.cleanup(folder)
        torch.save(result.model_state, folder / "state_dict.pt")
        mlflow_io.submit(
            log_artifact_file, client, run_id, folder / "state_dict.pt", "model", **direct
        )
        for obj, name in ((result.detections, "detections_val"), (result.metrics, "metrics_val")):
            mlflow_io.submit(log_json_artifact, client, run_id, obj, f"coco/{name}.json", **direct)
        mlflow_io.wait()
    except BaseException as exc:
        # Tune stops a trial (ASHA, a time budget) by exiting its thread at the next report.
        status = "KILLED" if isinstance(exc, SystemExit) else "FAILED"
        try:
            mlflow_io.wait()  # what was on its way still lands; the trial's own error wins
        except Exception:
            log.warning("an MLflow upload of trial %s failed", trial_id, exc_info=True)
        finish_run(client, run_id, status)
        for _, folder in final_report:
            shutil.rmtree(folder, ignore_errors=True)
        raise
    finish_run(client, run_id, "FINISHED")
    for report, folder in final_report:
        if not tracking.get("final_state_in_tune", True):
            # The full final state is the run's `checkpoint` artifact now; Tune's last
            # checkpoint names it instead of holding a second copy.
            shutil.rmtree(folder, ignore_errors=True)
            folder = _complete_checkpoint(trial_id, run_id, report)
        try:
            tune.report(report, checkpoint=tune.Checkpoint.from_directory(str(folder)))
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    _maybe_inject_fault(FAULT_AT_END)


def _complete_checkpoint(trial_id: str, run_id: str, report: dict[str, Any]) -> Path:
    """A Tune checkpoint of a trial that ran to its end: its final report and where its final
    state lives in MLflow (``runs:/<run>/checkpoint/state.pt``), no weights."""
    folder = scratch_folder("fgd-ckpt-")
    meta = {
        "trial_id": trial_id,
        "mlflow_run_id": run_id,
        "step": report.get("step"),
        COMPLETE_KEY: True,
        "report": report,
        "final_checkpoint": f"runs:/{run_id}/checkpoint/{STATE_FILE}",
    }
    (folder / META_FILE).write_text(json.dumps(meta))
    return folder


def _report_again(meta: dict[str, Any], trial_id: str) -> None:
    """A trial restored from its completion checkpoint (a retry or a restore after its last
    report) is complete in MLflow: report the same result again instead of training again."""
    if meta.get("trial_id") != trial_id:
        raise ValueError(
            f"trial {trial_id} was handed the completion checkpoint of trial "
            f"{meta.get('trial_id')}, which holds no training state"
        )
    from ray import tune

    folder = _complete_checkpoint(trial_id, meta["mlflow_run_id"], meta["report"])
    try:
        tune.report(meta["report"], checkpoint=tune.Checkpoint.from_directory(str(folder)))
    finally:
        shutil.rmtree(folder, ignore_errors=True)


class _Background:
    """Calls to MLflow on background threads, so a trial goes on while its metrics and files
    travel.

    ``wait`` blocks until every call is done, removes the folders handed to ``cleanup`` and
    raises the first error.
    """

    def __init__(self, threads: int = 3) -> None:
        self._threads = threads
        self._pool: ThreadPoolExecutor | None = None
        self._pending: list[Future[Any]] = []
        self._folders: list[Path] = []

    def submit(self, fn: Any, *args: Any, **kwargs: Any) -> None:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self._threads, thread_name_prefix="fgd-mlflow")
        self._pending.append(self._pool.submit(fn, *args, **kwargs))

    def cleanup(self, folder: Path) -> None:
        self._folders.append(folder)

    def wait(self) -> None:
        pending, self._pending = self._pending, []
        try:
            futures_wait(pending)  # every call ends before its files are removed
            for future in pending:
                future.result()
        finally:
            for folder in self._folders:
                shutil.rmtree(folder, ignore_errors=True)
            self._folders.clear()
