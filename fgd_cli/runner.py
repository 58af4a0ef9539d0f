"""`fgd train`: run one JobSpec with fgd_core, a progress bar, and the run's files on disk.

A run directory holds:
  spec.yaml             the spec as run (rerun it with `fgd train <kind> spec.yaml`)
  checkpoint.pt         full training state (resume with --resume; `state["job"]` = JobConfig)
  model.pt              plain torchvision state dict of the trained network
  metrics.json          final and intermediate COCO metrics, train time, FGD hparams
  detections_val.json   COCO results of the final evaluation
A distill job with ``teacher.train: true`` trains its teacher first in ``<out>/teacher/`` (and
reuses it when that run is already complete); with ``baseline: true`` it also trains the baseline
student in ``<out>/baseline/``.
"""

from __future__ import annotations

import json
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from fgd_cli.console import CliError, console, fmt_stat, say
from workers.spec import JobSpec, dump_spec

if TYPE_CHECKING:
    from fgd_core.training import JobConfig
    from fgd_core.training.jobs import JobResult

CHECKPOINT = "checkpoint.pt"
MODEL = "model.pt"
METRICS = "metrics.json"
DETECTIONS = "detections_val.json"
SPEC = "spec.yaml"


@dataclass
class RunOutcome:
    """What one finished run left behind."""

    kind: str
    out: Path
    metrics: dict[str, float]
    teacher_metrics: dict[str, float] | None
    train_seconds: float
    steps: int
    fgd_hparams: dict[str, float] | None

    @property
    def model_path(self) -> Path:
        return self.out / MODEL


@contextmanager
def _graceful_interrupt() -> Iterator[threading.Event]:
    """First Ctrl-C asks the loop to stop (it evaluates and checkpoints); a second one aborts."""
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    previous = signal.getsignal(signal.SIGINT)

    def handler(signum: int, frame: Any) -> None:
        if stop.is_set():
            signal.signal(signal.SIGINT, previous)
            raise KeyboardInterrupt
        stop.set()
        say("stopping after this step (Ctrl-C again to abort)", style="yellow")

    signal.signal(signal.SIGINT, handler)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)


def _check_resume(job: JobConfig, resume: dict[str, Any], source: str) -> None:
    from fgd_core.training.checkpoint import job_from_dict

    if "job" not in resume:
        raise CliError(f"{source}: no job configuration in the checkpoint; cannot resume from it")
    previous = job_from_dict(resume["job"])
    if previous.kind != job.kind or previous.model != job.model:
        raise CliError(
            f"{source} was written by a different job ({previous.kind} "
            f"{previous.model.arch}/{previous.model.backbone}); it cannot resume this "
            f"{job.kind} {job.model.arch}/{job.model.backbone} run"
        )
    if previous.train.schedule != job.train.schedule:
        say(f"warning: {source} was written with another schedule", style="yellow")


def run_job_spec(
    spec: JobSpec,
    out: Path,
    *,
    teacher_weights: str | None = None,
    resume: dict[str, Any] | None = None,
    resume_source: str = "--resume",
    label: str | None = None,
) -> RunOutcome:
    """Convert `spec`, train it with a progress bar, and write the run's files under `out`."""
    import torch

    from fgd_core.training.checkpoint import save_checkpoint
    from fgd_core.training.jobs import Callbacks, run_job
    from workers.convert import job_config

    label = label or spec.kind
    with console.status(f"[bold]{label}[/bold]: preparing data"):
        job = job_config(spec, teacher_weights=teacher_weights)
    if resume is not None:
        _check_resume(job, resume, resume_source)
    out.mkdir(parents=True, exist_ok=True)
    dump_spec(spec, out / SPEC)
    m = job.model
    say(
        f"{label}: {m.arch} {m.backbone} fpn {m.fpn_channels}, "
        f"{job.train.schedule.iterations} steps of {job.train.batch_size} images -> {out}"
    )

    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )
    task = progress.add_task(label, total=job.train.schedule.iterations, info="")

    def on_metrics(step: int, metrics: dict[str, float]) -> None:
        progress.update(task, info=f"loss {metrics['loss']:.3f} lr {metrics['lr']:.2e}")

    def on_evaluation(step: int, metrics: dict[str, float]) -> None:
        ap, ap50 = fmt_stat(metrics.get("bbox_AP")), fmt_stat(metrics.get("bbox_AP50"))
        say(f"  step {step}: bbox AP {ap}, AP50 {ap50}")

    def on_teacher_evaluation(metrics: dict[str, float]) -> None:
        ap, ap50 = fmt_stat(metrics.get("bbox_AP")), fmt_stat(metrics.get("bbox_AP50"))
        say(f"  teacher: bbox AP {ap}, AP50 {ap50}")

    def on_checkpoint(step: int, state: dict[str, Any]) -> None:
        save_checkpoint(state, out / CHECKPOINT)

    def on_progress(step: int, total: int) -> None:
        progress.update(task, completed=step, total=total)

    with _graceful_interrupt() as stop, progress:
        callbacks = Callbacks(
            on_metrics=on_metrics,
            on_evaluation=on_evaluation,
            on_checkpoint=on_checkpoint,
            on_teacher_evaluation=on_teacher_evaluation,
            on_progress=on_progress,
            should_stop=lambda step: stop.is_set(),
        )
        result: JobResult = run_job(job, callbacks=callbacks, resume=resume)

    torch.save(result.model_state, out / MODEL)
    _write_json(out / DETECTIONS, result.detections)
    _write_json(out / METRICS, _metrics_record(spec, result))
    if getattr(result, "stopped_early", False):
        say(
            f"stopped early at step {result.steps}; resume with --resume {out / CHECKPOINT}",
            style="yellow",
        )
    return RunOutcome(
        kind=spec.kind,
        out=out,
        metrics=result.metrics,
        teacher_metrics=result.teacher_metrics,
        train_seconds=result.train_seconds,
        steps=result.steps,
        fgd_hparams=result.fgd_hparams,
    )


def _metrics_record(spec: JobSpec, result: JobResult) -> dict[str, Any]:
    return {
        "kind": spec.kind,
        "metrics": result.metrics,
        "teacher_metrics": result.teacher_metrics,
        "history": [{"step": step, "metrics": metrics} for step, metrics in result.history],
        "steps": result.steps,
        "train_seconds": result.train_seconds,
        "fgd_hparams": result.fgd_hparams,
        "stopped_early": bool(getattr(result, "stopped_early", False)),
    }


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    tmp.replace(path)


def load_outcome(out: Path, spec: JobSpec) -> RunOutcome | None:
    """The outcome of a completed run of `spec` in `out` (spec.yaml, model.pt, metrics.json)."""
    from workers.spec import SpecError, load_spec

    try:
        record = json.loads((out / METRICS).read_text())
        if load_spec(out / SPEC) != spec:
            return None
    except (OSError, ValueError, SpecError):
        return None
    if not (out / MODEL).is_file() or record.get("stopped_early"):
        return None
    return RunOutcome(
        kind=record["kind"],
        out=out,
        metrics=record["metrics"],
        teacher_metrics=record.get("teacher_metrics"),
        train_seconds=record.get("train_seconds", 0.0),
        steps=record.get("steps", 0),
        fgd_hparams=record.get("fgd_hparams"),
    )


def run_training(
    spec: JobSpec, out: Path, *, resume_path: Path | None = None
) -> dict[str, RunOutcome]:
    """Run `spec` and whatever it implies (a teacher trained first, a baseline alongside).

    `resume_path` applies to the phase of the checkpoint's kind. Returns outcomes by role:
    "teacher" (trained here), spec.kind, "baseline" (alongside a distill job).
    """
    resume: dict[str, Any] | None = None
    resume_kind = None
    if resume_path is not None:
        from fgd_core.training.checkpoint import load_checkpoint

        resume = load_checkpoint(resume_path)
        resume_kind = resume.get("job", {}).get("kind")

    def resume_for(kind: str) -> dict[str, Any] | None:
        return resume if resume is not None and resume_kind == kind else None

    phases = (["teacher"] if spec.teacher is not None and spec.teacher.train else []) + [spec.kind]
    phases += ["baseline"] if spec.kind == "distill" and spec.baseline else []
    if resume is not None and resume_kind not in phases:
        raise CliError(
            f"{resume_path} is a {resume_kind} checkpoint; this job's runs are {', '.join(phases)}"
        )

    def completed(role: str, run_spec: JobSpec, run_out: Path) -> RunOutcome | None:
        # A finished run of the same spec is reused for a teacher trained first, and for the
        # phases before the one being resumed; every other phase runs.
        if role == resume_kind:
            return None
        before_resumed = resume_kind is not None and phases.index(role) < phases.index(resume_kind)
        if role != "teacher" and not before_resumed:
            return None
        done = load_outcome(run_out, run_spec)
        if done is not None:
            say(f"{role}: reusing the completed run in {run_out}")
        return done

    outcomes: dict[str, RunOutcome] = {}
    teacher_weights = None
    if spec.kind == "distill":
        assert spec.teacher is not None
        if spec.teacher.mlflow_uri is not None:
            raise CliError(
                "teacher.mlflow_uri: not supported from the CLI yet; download the weights and "
                "give them as teacher.checkpoint (or run the job through the service)"
            )
        if spec.teacher.train:
            teacher_out = out / "teacher"
            outcomes["teacher"] = completed(
                "teacher", spec.teacher_job(), teacher_out
            ) or run_job_spec(
                spec.teacher_job(),
                teacher_out,
                resume=resume_for("teacher"),
                resume_source=str(resume_path),
                label="teacher",
            )
            teacher_weights = str(outcomes["teacher"].model_path)
    outcomes[spec.kind] = completed(spec.kind, spec, out) or run_job_spec(
        spec,
        out,
        teacher_weights=teacher_weights,
        resume=resume_for(spec.kind),
        resume_source=str(resume_path),
    )
    if "baseline" in phases[1:]:
        outcomes["baseline"] = run_job_spec(
            spec.baseline_job(),
            out / "baseline",
            resume=resume_for("baseline"),
            resume_source=str(resume_path),
            label="baseline",
        )
    return outcomes
