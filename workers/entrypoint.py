"""The Ray Job entrypoint of a service job: ``python -m workers.entrypoint --job-id ID ...``.

Runs one attempt of a job as a sweep (a spec without a ``sweep`` section is a one-trial sweep) on
the Ray cluster it runs in (inside a Ray Job, ``RAY_ADDRESS`` points at it), logging to
``MLFLOW_TRACKING_URI``. The parent MLflow run is named and tagged ``job-<ID>``
(``fgd.sweep_name``) and tagged ``fgd.job_id``, created before Tune starts so the service can
follow progress at once; a later attempt reuses that run and restores the Tune experiment of
the same name when an earlier attempt left one.

Prints one line per trial event on stdout (the Ray Job log the service copies); on failure the
reason goes to stderr and the exit status is 1 (2 for a bad command line or spec).

``--noop`` exits 0 at once (the dispatch load benchmark).
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from workers.spec import JobSpec

JOB_ID_TAG = "fgd.job_id"
ATTEMPT_TAG = "fgd.attempt"
B64_PREFIX = "b64:"


def sweep_name(job_id: str) -> str:
    """The Tune experiment and parent-run name of a service job."""
    return f"job-{job_id}"


def encode_spec(spec: dict[str, Any]) -> str:
    """``spec`` as one shell-safe ``--spec-json`` argument (``b64:`` + urlsafe base64 of JSON)."""
    raw = json.dumps(spec, separators=(",", ":"), sort_keys=True).encode()
    return B64_PREFIX + base64.urlsafe_b64encode(raw).decode("ascii")


def read_spec(value: str) -> dict[str, Any]:
    """The spec of ``--spec-json``: ``b64:...``, inline JSON (``{...}``), or a JSON file path."""
    if value.startswith(B64_PREFIX):
        text = base64.urlsafe_b64decode(value[len(B64_PREFIX) :].encode("ascii")).decode()
    elif value.lstrip().startswith("{"):
        text = value
    else:
        text = Path(value).read_text()
    obj = json.loads(text)
    if not isinstance(obj, dict):
        raise ValueError("the spec must be a JSON object")
    return obj


def _say(line: str) -> None:
    print(f"[fgd {time.strftime('%H:%M:%S')}] {line}", flush=True)


def _progress_callback(metric: str) -> Any:
    """A Tune callback printing one line per trial start, result, completion and error."""
    from ray.tune import Callback

    class ProgressLines(Callback):
        def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            _say(f"trial {trial.trial_id} started: {trial.config}")

        def on_trial_result(
            self, iteration: int, trials: list, trial: Any, result: dict, **info: Any
        ) -> None:
            parts = [f"iter {result.get('training_iteration')}"]
            for key in ("step", metric, "train/loss", "loss"):
                value = result.get(key)
                if isinstance(value, int | float) and not isinstance(value, bool):
                    parts.append(f"{key}={value:.4g}")
            _say(f"trial {trial.trial_id} " + " ".join(dict.fromkeys(parts)))

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            done = sum(t.status == "TERMINATED" for t in trials)
            _say(f"trial {trial.trial_id} finished ({done}/{len(trials)} done)")

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            _say(f"trial {trial.trial_id} errored: {getattr(trial, 'error_file', '')}")

    return ProgressLines()


def _parent_run(client: Any, experiment_id: str, spec: JobSpec, job_id: str, attempt: int) -> str:
    """The job's parent run: found by its sweep tag (a later attempt), else created, tagged."""
    from workers.sweep import SWEEP_TAG
    from workers.tracking import create_parent_run, reopen_run, set_tags
    from workers.trainable import flat_params

    name = sweep_name(job_id)
    runs = client.search_runs(
        [experiment_id], filter_string=f"tags.`{SWEEP_TAG}` = '{name}'", max_results=1
    )
    tags = {JOB_ID_TAG: job_id, ATTEMPT_TAG: str(attempt)}
    if runs:
        run_id = str(runs[0].info.run_id)
        if runs[0].info.status != "RUNNING":
            reopen_run(client, run_id)
        set_tags(client, run_id, tags)
        return run_id
    return create_parent_run(
        client,
        experiment_id,
        name=name,
        params=flat_params(spec),
        tags={SWEEP_TAG: name, "fgd.kind": spec.kind, **tags},
    )


def run(
    spec: JobSpec, *, job_id: str, attempt: int, experiment: str = "fgd", storage_path: str | None
) -> int:
    """Run the job's sweep; return the exit status."""
    from workers.sweep import run_sweep
    from workers.tracking import finish_run, get_or_create_experiment, make_client
    from workers.tracking_server import tracking_uri

    uri = tracking_uri()
    client = make_client(uri)
    experiment_id = get_or_create_experiment(client, experiment)
    parent = _parent_run(client, experiment_id, spec, job_id, attempt)
    _say(f"job {job_id} attempt {attempt}: mlflow experiment {experiment_id} run {parent} at {uri}")
    metric = spec.sweep.metric if spec.sweep is not None else "bbox_AP"
    try:
        # resume=True: the parent run above is reused, and Tune's experiment is restored only
        # when an earlier attempt left one (run_sweep checks Tuner.can_restore).
        result = run_sweep(
            spec,
            name=sweep_name(job_id),
            tracking_uri=uri,
            experiment=experiment,
            storage_path=storage_path,
            resume=True,
            callbacks=[_progress_callback(metric)],
        )
    except BaseException:
        finish_run(client, parent, "FAILED")
        raise
    errored = [r for r in result.rows if r.status == "ERROR"]
    _say(f"{len(result.rows)} trials, {len(errored)} errored")
    if result.best is not None:
        _say(f"best trial {result.best.trial_id}: {metric}={result.best.metrics.get(metric)}")
    if result.registered_model is not None:
        _say("registered model {} version {}".format(*result.registered_model))
    if not result.rows or len(errored) == len(result.rows):
        finish_run(client, parent, "FAILED")
        print(f"fgd job {job_id} failed: every trial errored", file=sys.stderr, flush=True)
        return 1
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m workers.entrypoint", description=__doc__)
    p.add_argument("--job-id", help="the service's job id")
    p.add_argument("--attempt", type=int, default=1, help="1 for the first dispatch")
    p.add_argument("--spec-json", help="b64:<urlsafe base64 JSON>, inline JSON, or a file path")
    p.add_argument("--experiment", default="fgd", help="MLflow experiment name")
    p.add_argument("--storage-path", default=None, help="Tune storage (default FGD_TUNE_STORAGE)")
    p.add_argument("--noop", action="store_true", help="exit 0 at once (load benchmark)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.noop:
        _say(f"noop job {args.job_id} attempt {args.attempt}")
        return 0
    if not args.job_id or not args.spec_json:
        print("--job-id and --spec-json are required", file=sys.stderr)
        return 2
    try:
        spec = JobSpec.model_validate(read_spec(args.spec_json))
    except Exception as exc:
        print(f"fgd job {args.job_id} failed: bad spec: {exc}", file=sys.stderr, flush=True)
        return 2
    try:
        return run(
            spec,
            job_id=args.job_id,
            attempt=args.attempt,
            experiment=args.experiment,
            storage_path=args.storage_path,
        )
    except Exception as exc:
        traceback.print_exc()
        reason = f"{type(exc).__name__}: {exc}"
        print(f"fgd job {args.job_id} failed: {reason}", file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
