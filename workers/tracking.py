"""The MLflow side: runs of jobs and trials, artifacts, registry (the server itself:
``workers.tracking_server``).

MLflow is a sink (see CONVENTIONS.md): nothing here is imported by ``fgd_core``, and nothing here
imports torch. ``mlflow`` itself is imported lazily, when a client is made.

Every function takes an explicit ``MlflowClient`` (``make_client(uri)``): there is no global active
run, because trials run in Ray worker processes on any node and log over HTTP. The driver resolves
the URI once with ``tracking_uri()`` and hands the string to the trials.

Run layout: one parent run per job or sweep (``create_parent_run``); one nested run per trial
(``open_trial_run``, tags ``mlflow.parentRunId`` and ``fgd.trial_key``), continued, never
duplicated, when Ray retries or restores the trial.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import numbers
import re
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from workers.artifact_store import LocalArtifactStore
from workers.tracking_server import tracking_uri

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Run

log = logging.getLogger(__name__)

PARENT_TAG = "mlflow.parentRunId"  # MLflow's own nesting tag (the UI draws the tree from it)
TRIAL_KEY_TAG = "fgd.trial_key"  # stable id of a trial across retries / restores
ROLE_TAG = "fgd.role"  # "parent" or "trial"
FORMAT_TAG = "fgd.format"  # on registered model versions: "state_dict"
TERMINAL_STATUSES = ("FINISHED", "FAILED", "KILLED")
_BATCH_PARAMS = 100  # MLflow's limits per log_batch call (mlflow/utils/validation.py)
_BATCH_METRICS = 1000
_MAX_PARAM_LEN = 6000
_SAFE_FILTER_VALUE = re.compile(r"^[^'\"\\]{1,250}$")


# --- runs -----------------------------------------------------------------------------------


def make_client(uri: str | None = None) -> MlflowClient:
    """An ``MlflowClient`` whose tracking and registry both point at ``uri``.

    ``uri`` defaults to ``tracking_uri()``, which may start the embedded server: pass the URI
    explicitly in Ray workers.
    """
    from mlflow import MlflowClient

    uri = uri or tracking_uri()
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested dicts to dotted keys with string values; ``lambda_`` is logged as ``lambda``."""
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = "lambda" if key == "lambda_" else str(key)
        full = f"{prefix}{name}"
        if isinstance(value, Mapping):
            flat.update(flatten_params(value, f"{full}."))
            continue
        text = json.dumps(value, default=str) if isinstance(value, list | tuple) else str(value)
        if len(text) > _MAX_PARAM_LEN:
            text = text[: _MAX_PARAM_LEN - 3] + "..."
        flat[full] = text
    return flat


def get_or_create_experiment(client: MlflowClient, name: str) -> str:
    """The id of the experiment ``name``, created (or restored if deleted) when needed."""
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            return str(client.create_experiment(name))
        except MlflowException as e:  # a concurrent creator won
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            exp = client.get_experiment_by_name(name)
            assert exp is not None
    if exp.lifecycle_stage == "deleted":
        client.restore_experiment(exp.experiment_id)
    return str(exp.experiment_id)


def create_parent_run(
    client: MlflowClient,
    experiment_id: str,
    *,
    name: str,
    params: Mapping[str, Any],
    tags: Mapping[str, Any] | None = None,
) -> str:
    """Create the run of one job or sweep; ``params`` flattened with dotted keys."""
    run_tags = {ROLE_TAG: "parent", **{k: str(v) for k, v in (tags or {}).items()}}
    run = client.create_run(experiment_id, run_name=name, tags=run_tags)
    log_params(client, run.info.run_id, params, existing={})
    return str(run.info.run_id)


def open_trial_run(
    client: MlflowClient,
    experiment_id: str,
    parent_run_id: str,
    trial_key: str,
    *,
    name: str,
    params: Mapping[str, Any],
    run_id: str | None = None,
    tags: Mapping[str, Any] | None = None,
) -> str:
    """The nested run of one trial: reused (and set RUNNING) if it exists, else created.

    Lookup order: ``run_id`` (kept in the trial's checkpoint), then the run tagged
    ``fgd.trial_key = trial_key`` under ``parent_run_id``, then a new run. Params already logged
    are skipped (MLflow params are immutable).
    """
    if not _SAFE_FILTER_VALUE.match(trial_key) or not _SAFE_FILTER_VALUE.match(parent_run_id):
        raise ValueError(
            f"trial_key / parent_run_id must be 1-250 chars without quotes: {trial_key!r}"
        )
    run = _active_run(client, run_id) if run_id else None
    if run_id and run is None:
        log.warning("trial run %s not found or deleted; looking up %s", run_id, trial_key)
    if run is None:
        found = client.search_runs(
            [experiment_id],
            filter_string=(
                f"tags.`{PARENT_TAG}` = '{parent_run_id}' and tags.`{TRIAL_KEY_TAG}` = '{trial_key}'"
            ),
            order_by=["attributes.start_time ASC"],
            max_results=1,
        )
        run = found[0] if found else None
    want_tags = {PARENT_TAG: parent_run_id, TRIAL_KEY_TAG: trial_key, ROLE_TAG: "trial"}
    want_tags.update({k: str(v) for k, v in (tags or {}).items()})
    if run is None:
        run = client.create_run(experiment_id, run_name=name, tags=want_tags)
        log_params(client, run.info.run_id, params, existing={})
        return str(run.info.run_id)
    rid = str(run.info.run_id)
    if run.info.status != "RUNNING":
        client.update_run(rid, status="RUNNING")
    missing = {k: v for k, v in want_tags.items() if run.data.tags.get(k) != v}
    if missing:
        set_tags(client, rid, missing)
    log_params(client, rid, params, existing=run.data.params)
    return rid


def reopen_run(client: MlflowClient, run_id: str) -> None:
    """Set a finished run RUNNING again (a restored job continues its parent run)."""
    client.update_run(run_id, status="RUNNING")


def _active_run(client: MlflowClient, run_id: str) -> Run | None:
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(run_id)
    except MlflowException as e:
        if e.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise
    return run if run.info.lifecycle_stage == "active" else None


def list_trial_runs(client: MlflowClient, experiment_id: str, parent_run_id: str) -> list[Run]:
    """All nested runs of a parent, oldest first."""
    runs: list[Run] = []
    token = None
    while True:
        page = client.search_runs(
            [experiment_id],
            filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}'",
            order_by=["attributes.start_time ASC"],
            max_results=1000,
            page_token=token,
        )
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def log_params(
    client: MlflowClient,
    run_id: str,
    params: Mapping[str, Any],
    *,
    existing: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Log the flattened params not yet on the run; return what was logged.

    A key already logged with another value is kept as it is (MLflow refuses to change it) and
    warned about.
    """
    from mlflow.entities import Param

    if existing is None:
        existing = client.get_run(run_id).data.params
    flat = flatten_params(params)
    changed = [k for k, v in flat.items() if k in existing and existing[k] != v]
    if changed:
        log.warning("run %s: params already logged with other values, kept: %s", run_id, changed)
    new = {k: v for k, v in flat.items() if k not in existing}
    items = [Param(k, v) for k, v in new.items()]
    for i in range(0, len(items), _BATCH_PARAMS):
        client.log_batch(run_id, params=items[i : i + _BATCH_PARAMS])
    return new


def set_tags(client: MlflowClient, run_id: str, tags: Mapping[str, Any]) -> None:
    """Set (or overwrite) tags in batches."""
    from mlflow.entities import RunTag

    items = [RunTag(str(k), str(v)) for k, v in tags.items()]
    for i in range(0, len(items), _BATCH_PARAMS):
        client.log_batch(run_id, tags=items[i : i + _BATCH_PARAMS])


def log_metrics(
    client: MlflowClient,
    run_id: str,
    metrics: Mapping[str, Any],
    step: int,
    *,
    timestamp_ms: int | None = None,
) -> list[str]:
    """Log the numeric, finite metrics at ``step`` in one ``log_batch``; return skipped keys.

    NaN / inf (a diverged loss), bools, None and non-numbers (Ray's bookkeeping fields) are
    skipped, so a sweep's metric history stays plottable and sortable.
    """
    from mlflow.entities import Metric

    ts = timestamp_ms if timestamp_ms is not None else int(time.time() * 1000)
    items: list[Metric] = []
    skipped: list[str] = []
    for key, value in metrics.items():
        number = _as_float(value)
        if number is None:
            skipped.append(key)
        else:
            items.append(Metric(str(key), number, ts, int(step)))
    for i in range(0, len(items), _BATCH_METRICS):
        client.log_batch(run_id, metrics=items[i : i + _BATCH_METRICS])
    return skipped


def _as_float(value: Any) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    if not isinstance(value, numbers.Real) and hasattr(value, "item"):  # numpy / 0-d tensors
        try:
            value = value.item()
        except (TypeError, ValueError, RuntimeError):
            return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def finish_run(client: MlflowClient, run_id: str, status: str = "FINISHED") -> None:
    """Terminate a run as FINISHED, FAILED or KILLED."""
    if status not in TERMINAL_STATUSES:
        raise ValueError(f"status must be one of {TERMINAL_STATUSES}, not {status!r}")
    client.set_terminated(run_id, status=status)


# --- artifacts ------------------------------------------------------------------------------


def log_artifact_file(
    client: MlflowClient,
    run_id: str,
    local_path: str | Path,
    artifact_path: str | None = None,
    *,
    store: LocalArtifactStore | None = None,
    artifact_uri: str | None = None,
) -> None:
    """Upload a file or directory into the run's artifact dir ``artifact_path`` (default root).

    With ``store``, the server's local artifact store (``local_artifact_store``), a file is
    written straight into it when this process reaches it, and uploaded otherwise; the store
    may then share the file's data (a hard link), so the file must not be changed afterwards.
    ``artifact_uri``, the run's artifact URI where the caller knows it, saves looking it up.
    """
    path = Path(local_path)
    if path.is_file() and _write_direct(client, run_id, path, artifact_path, store, artifact_uri):
        return
    if path.is_dir():
        client.log_artifacts(run_id, str(path), artifact_path)
    else:
        client.log_artifact(run_id, str(path), artifact_path)


def _write_direct(
    client: MlflowClient,
    run_id: str,
    path: Path,
    artifact_path: str | None,
    store: LocalArtifactStore | None,
    artifact_uri: str | None,
) -> bool:
    """Write the file ``path`` straight into ``store``; False where it cannot (upload then)."""
    if store is None or not store.reachable():
        return False
    uri = artifact_uri or client.get_run(run_id).info.artifact_uri
    return store.write_file(uri, path, artifact_path)


def log_json_artifact(
    client: MlflowClient,
    run_id: str,
    obj: Any,
    artifact_path: str,
    *,
    store: LocalArtifactStore | None = None,
    artifact_uri: str | None = None,
) -> None:
    """Write ``obj`` as JSON to the artifact file ``artifact_path`` (e.g. ``spec/job.json``);
    ``store`` and ``artifact_uri`` as for ``log_artifact_file``."""
    text = json.dumps(obj, indent=2, default=str, allow_nan=False) + "\n"
    _log_text(client, run_id, text, artifact_path, store=store, artifact_uri=artifact_uri)


def log_dict_as_table(
    client: MlflowClient, run_id: str, rows: Sequence[Mapping[str, Any]], artifact_path: str
) -> None:
    """Log rows as a table: ``.csv`` as CSV, ``.json`` as ``{"columns": [...], "data": [[...]]}``.

    Unlike ``MlflowClient.log_table`` (which appends to an existing file), this overwrites, so a
    retried step does not duplicate rows.
    """
    columns = _columns(rows)
    if artifact_path.endswith(".json"):
        data = [[_jsonable(r.get(c)) for c in columns] for r in rows]
        _log_text(
            client,
            run_id,
            json.dumps({"columns": columns, "data": data}, default=str) + "\n",
            artifact_path,
        )
    elif artifact_path.endswith(".csv"):
        _log_text(client, run_id, rows_to_csv(rows, columns), artifact_path)
    else:
        raise ValueError(f"table artifact must end in .csv or .json: {artifact_path!r}")


def rows_to_csv(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    """CSV text of ``rows`` (columns in first-seen order)."""
    import io

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns or _columns(rows)), extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def _columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    return list(dict.fromkeys(k for r in rows for k in r))


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _log_text(
    client: MlflowClient,
    run_id: str,
    text: str,
    artifact_path: str,
    *,
    store: LocalArtifactStore | None = None,
    artifact_uri: str | None = None,
) -> None:
    directory, _, filename = artifact_path.strip("/").rpartition("/")
    with tempfile.TemporaryDirectory(prefix="fgd-artifact-") as tmp:
        local = Path(tmp) / filename
        local.write_text(text)
        if not _write_direct(client, run_id, local, directory or None, store, artifact_uri):
            client.log_artifact(run_id, str(local), directory or None)


def register_model_version(
    client: MlflowClient,
    *,
    name: str,
    run_id: str,
    artifact_path: str,
    description: str | None = None,
    tags: Mapping[str, Any] | None = None,
) -> str:
    """Register the run artifact dir ``artifact_path`` (a state-dict dir) as a version of ``name``.

    The source is the run's resolved artifact URI (``mlflow-artifacts:/<exp>/<run>/artifacts/...``
    behind a proxying server), which the server checks lies inside the run. Returns the version
    (a string, as MLflow's APIs take it); download with ``models:/<name>/<version>``.
    """
    from mlflow.exceptions import MlflowException

    artifact_path = artifact_path.strip("/")
    parent, _, _ = artifact_path.rpartition("/")
    listed = {f.path for f in client.list_artifacts(run_id, parent or None)}
    if artifact_path not in listed:
        raise FileNotFoundError(f"run {run_id} has no artifact {artifact_path!r} (has {listed})")
    try:
        client.create_registered_model(name)
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    source = f"{client.get_run(run_id).info.artifact_uri.rstrip('/')}/{artifact_path}"
    version_tags = {FORMAT_TAG: "state_dict", **{k: str(v) for k, v in (tags or {}).items()}}
    mv = client.create_model_version(
        name,
        source=source,
        run_id=run_id,
        description=description,
        tags=version_tags,
        await_creation_for=0,  # SQL-backed registries create versions READY at once
    )
    return str(mv.version)


def download_run_artifact(
    uri: str, *, client: MlflowClient | None = None, dst_path: str | Path | None = None
) -> Path:
    """Download ``runs:/<run>/<path>``, ``models:/<name>/<version|alias|latest>[/<path>]`` or any
    artifact URI the server can serve; return the local path.

    ``models:/`` is resolved with ``client`` here: ``mlflow.artifacts.download_artifacts`` would
    resolve it against the *global* registry URI (mlflow 3.17 ``ModelsArtifactRepository``)
    and ignore the ``tracking_uri`` argument.
    """
    from mlflow.artifacts import download_artifacts

    client = client or make_client()
    source = _resolve_models_uri(client, uri) if uri.startswith("models:") else uri
    if dst_path is not None:
        Path(dst_path).mkdir(parents=True, exist_ok=True)
    local = download_artifacts(
        artifact_uri=source,
        dst_path=str(dst_path) if dst_path is not None else None,
        tracking_uri=client.tracking_uri,
        registry_uri=client.tracking_uri,
    )
    return Path(local)


def _resolve_models_uri(client: MlflowClient, uri: str) -> str:
    body = uri.removeprefix("models:").lstrip("/")
    if "://" in uri or not body:
        raise ValueError(f"unsupported models URI (remote registry or empty): {uri!r}")
    head, _, rest = body.partition("/")
    if "@" in head:  # models:/<name>@<alias>[/path]
        model, alias = head.split("@", 1)
        version = str(client.get_model_version_by_alias(model, alias).version)
        sub = rest
    elif head.startswith("m-") and not rest:  # models:/<model_id> (an MLflow 3 logged model)
        return str(client.get_logged_model(head).artifact_location)
    else:  # models:/<name>/<version|latest>[/path]
        model = head
        version, _, sub = rest.partition("/")
        if version.lower() == "latest":
            found = client.search_model_versions(f"name = '{model}'")
            if not found:
                raise ValueError(f"registered model {model!r} has no versions")
            version = str(max(int(v.version) for v in found))
        elif not version.isdigit():
            raise ValueError(f"{uri!r}: use a version number, 'latest' or @alias (stages are gone)")
    base = client.get_model_version_download_uri(model, version).rstrip("/")
    return f"{base}/{sub}" if sub else base
