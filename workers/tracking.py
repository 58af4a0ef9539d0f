"""The MLflow side: the embedded tracking server, runs of jobs and trials, artifacts, registry.

MLflow is a sink (see CONVENTIONS.md): nothing here is imported by ``fgd_core``, and nothing here
imports torch. ``mlflow`` itself is imported lazily, so starting or finding the server costs no
MLflow import.

Every function takes an explicit ``MlflowClient`` (``make_client(uri)``): there is no global active
run, because trials run in Ray worker processes on any node and log over HTTP. The driver resolves
the URI once with ``tracking_uri()`` and hands the string to the trials.

Run layout: one parent run per job or sweep (``create_parent_run``); one nested run per trial
(``open_trial_run``, tags ``mlflow.parentRunId`` and ``fgd.trial_key``), continued, never
duplicated, when Ray retries or restores the trial.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import json
import logging
import math
import numbers
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from workers.settings import FgdLayout, layout, mlflow_settings

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


class TrackingServerError(RuntimeError):
    """An MLflow server could not be started (the message quotes the tail of its log)."""


# --- the server -----------------------------------------------------------------------------

_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}  # servers started by this process (to reap)


@dataclass
class ServerHandle:
    """A running ``mlflow server`` process group (the pid is the group and session leader)."""

    uri: str
    pid: int
    host: str
    port: int
    backend_store_uri: str
    artifacts_destination: str
    log_path: Path
    start_seconds: float | None = None  # spawn → healthy, when started by this call
    _proc: subprocess.Popen[bytes] | None = field(default=None, repr=False, compare=False)

    def healthy(self, timeout: float = 5.0) -> bool:
        """``GET /health`` answers OK."""
        return _health_ok(self.uri, timeout)

    def alive(self) -> bool:
        """The recorded process still exists and is an ``mlflow server``."""
        if self._proc is not None and self._proc.poll() is not None:
            return False
        return _is_mlflow_server(self.pid)

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM the process group, SIGKILL it after ``timeout`` seconds."""
        _terminate_group(self.pid, self._proc or _CHILDREN.get(self.pid), timeout)
        _CHILDREN.pop(self.pid, None)

    def record(self) -> dict[str, Any]:
        """What ``server.json`` keeps."""
        import importlib.metadata

        return {
            "pid": self.pid,
            "host": self.host,
            "port": self.port,
            "uri": self.uri,
            "backend_store_uri": self.backend_store_uri,
            "artifacts_destination": self.artifacts_destination,
            "log_path": str(self.log_path),
            "start_seconds": self.start_seconds,
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "mlflow_version": importlib.metadata.version("mlflow"),
        }


def start_server(
    backend_store_uri: str,
    artifacts_destination: str | Path,
    *,
    host: str = "127.0.0.1",
    port: int | None = None,
    log_path: str | Path,
    timeout: float | None = None,
    workers: int = 1,
    allowed_hosts: str | None = None,
    extra_args: Sequence[str] = (),
) -> ServerHandle:
    """Start a detached ``mlflow server`` (own session) proxying artifacts, and wait for /health.

    Args:
        backend_store_uri: SQLAlchemy URI, e.g. ``sqlite:////abs/mlflow.db`` or
            ``postgresql+psycopg://user@host:5432/db``.
        artifacts_destination: where the server stores artifacts (local dir or ``s3://...``);
            clients see ``mlflow-artifacts:/`` URIs and up/download through the server.
        port: ``None`` or 0 picks a free port; a given port must be free.
        log_path: the server's stdout + stderr are appended here.
        timeout: seconds to wait for /health (default ``FGD_MLFLOW_START_TIMEOUT``).

    Raises:
        TrackingServerError: the port is taken, the server exited, or /health never answered;
            the message quotes the tail of the log.
    """
    timeout = timeout if timeout is not None else mlflow_settings().start_timeout
    log_path = Path(log_path).expanduser().absolute()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    destination = str(artifacts_destination)
    if "://" not in destination:
        local = Path(destination).expanduser().absolute()
        local.mkdir(parents=True, exist_ok=True)
        destination = str(local)
    if backend_store_uri.startswith("sqlite:///"):
        Path(backend_store_uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    if not port:
        port = _free_port(host)
    elif not _port_free(host, port):
        raise TrackingServerError(f"port {port} on {host} is already in use")

    cmd = [sys.executable, "-m", "mlflow", "server"]
    cmd += ["--backend-store-uri", backend_store_uri, "--artifacts-destination", destination]
    cmd += ["--serve-artifacts", "--host", host, "--port", str(port), "--workers", str(workers)]
    if allowed_hosts:
        cmd += ["--allowed-hosts", allowed_hosts]
    cmd += list(extra_args)
    env = dict(os.environ)
    # The GenAI job runner (7 huey consumer processes) is not needed for training runs.
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")

    offset = log_path.stat().st_size if log_path.exists() else 0
    with open(log_path, "ab") as logf:
        shown = " ".join(_redact(a) for a in cmd)
        logf.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {shown}\n".encode())
        logf.flush()
        t0 = time.monotonic()
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=logf,
            stderr=subprocess.STDOUT,
            cwd=log_path.parent,  # a stray ./mlruns or ./mlflow.db lands beside the log
            env=env,
            start_new_session=True,  # outlives the command that started it; pid == pgid
            close_fds=True,  # never inherit the server.lock descriptor
        )
    _CHILDREN[proc.pid] = proc
    uri_host = "127.0.0.1" if host in ("0.0.0.0", "", "::") else host
    handle = ServerHandle(
        uri=f"http://{uri_host}:{port}",
        pid=proc.pid,
        host=host,
        port=port,
        backend_store_uri=backend_store_uri,
        artifacts_destination=destination,
        log_path=log_path,
        _proc=proc,
    )
    deadline = t0 + timeout
    while not _health_ok(handle.uri, 1.0):
        if proc.poll() is not None:
            _CHILDREN.pop(proc.pid, None)
            raise TrackingServerError(
                f"mlflow server exited with code {proc.returncode} during start-up "
                f"({_redact(backend_store_uri)}); tail of {log_path}:\n{_tail(log_path, offset)}"
            )
        if time.monotonic() > deadline:
            handle.stop()
            raise TrackingServerError(
                f"mlflow server on port {port} not healthy after {timeout:.0f}s; "
                f"tail of {log_path}:\n{_tail(log_path, offset)}"
            )
        time.sleep(0.1)
    handle.start_seconds = round(time.monotonic() - t0, 2)
    log.info("mlflow server %s up in %.1fs (pid %d)", handle.uri, handle.start_seconds, proc.pid)
    return handle


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` when set; else the embedded server's URI, started if needed."""
    configured = mlflow_settings().tracking_uri
    if configured:
        return configured
    return ensure_embedded_server().uri


def ensure_embedded_server() -> ServerHandle:
    """Reuse the embedded server under ``fgd_home()/mlflow`` if healthy, else start one.

    A file lock (``server.lock``) makes concurrent callers wait for one start-up.
    """
    lay = layout()
    settings = mlflow_settings()
    with _locked(lay.server_lock):
        recorded = _recorded_server(lay)
        if recorded is not None:
            if _matches(recorded, lay) and recorded.alive():
                deadline = time.monotonic() + settings.start_timeout
                while recorded.alive() and time.monotonic() < deadline:
                    if recorded.healthy():
                        return recorded
                    time.sleep(0.5)
            if recorded.alive():
                log.warning("stopping unusable embedded mlflow server (pid %d)", recorded.pid)
                recorded.stop()
            lay.server_json.unlink(missing_ok=True)
        port = settings.port
        if not port or not _port_free(settings.host, port):
            port = _free_port(settings.host)
        handle = start_server(
            lay.mlflow_backend_store_uri,
            lay.mlflow_artifacts,
            host=settings.host,
            port=port,
            log_path=lay.server_log,
            timeout=settings.start_timeout,
            workers=settings.workers,
            allowed_hosts=settings.allowed_hosts,
        )
        _write_json(lay.server_json, handle.record())
        return handle


def embedded_server() -> ServerHandle | None:
    """The recorded embedded server if it is running and healthy; starts nothing."""
    lay = layout()
    with _locked(lay.server_lock):
        recorded = _recorded_server(lay)
    if recorded is not None and recorded.alive() and recorded.healthy():
        return recorded
    return None


def stop_embedded_server(timeout: float = 15.0) -> bool:
    """Stop the embedded server of ``fgd_home()``; True if one was running."""
    lay = layout()
    with _locked(lay.server_lock):
        recorded = _recorded_server(lay)
        stopped = False
        if recorded is not None and recorded.alive():
            recorded.stop(timeout)
            stopped = True
        lay.server_json.unlink(missing_ok=True)
        return stopped


def check_tracking_server(uri: str, timeout: float = 5.0) -> None:
    """Raise ``TrackingServerError`` unless the REST API at ``uri`` answers (not just /health).

    MLflow 3's security middleware answers /health for any Host header but 403s API calls whose
    Host is not localhost or a private IP (e.g. ``http://mlflow:5000`` in docker-compose) until
    the server gets ``--allowed-hosts``.
    """
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    url = f"{uri.rstrip('/')}/api/2.0/mlflow/experiments/search?max_results=1"
    try:
        with opener.open(url, timeout=timeout) as resp:
            resp.read()
    except urllib.error.HTTPError as e:
        hint = " (start the server with --allowed-hosts naming this host)" if e.code == 403 else ""
        raise TrackingServerError(f"MLflow at {uri} answered HTTP {e.code}{hint}") from e
    except (OSError, ValueError) as e:
        raise TrackingServerError(f"MLflow at {uri} is not reachable: {e}") from e


def _matches(handle: ServerHandle, lay: FgdLayout) -> bool:
    return handle.backend_store_uri == lay.mlflow_backend_store_uri and Path(
        handle.artifacts_destination
    ) == Path(lay.mlflow_artifacts)


def _recorded_server(lay: FgdLayout) -> ServerHandle | None:
    try:
        rec = json.loads(lay.server_json.read_text())
        return ServerHandle(
            uri=rec["uri"],
            pid=int(rec["pid"]),
            host=rec["host"],
            port=int(rec["port"]),
            backend_store_uri=rec["backend_store_uri"],
            artifacts_destination=rec["artifacts_destination"],
            log_path=Path(rec["log_path"]),
            start_seconds=rec.get("start_seconds"),
            _proc=_CHILDREN.get(int(rec["pid"])),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def _health_ok(uri: str, timeout: float) -> bool:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via a proxy
    try:
        with opener.open(f"{uri.rstrip('/')}/health", timeout=timeout) as resp:
            return resp.status == 200 and resp.read(16).strip() == b"OK"
    except (OSError, urllib.error.URLError, ValueError):
        return False


def _port_free(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _is_mlflow_server(pid: int) -> bool:
    """The pid exists, is not a zombie, and (where /proc says) runs ``mlflow server``."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    proc = Path(f"/proc/{pid}")
    if not proc.exists():
        return sys.platform != "linux"
    try:
        if _proc_state(pid) == "Z":
            return False
        cmdline = (proc / "cmdline").read_bytes()
    except OSError:
        return False
    return b"mlflow" in cmdline and b"server" in cmdline


def _proc_state(pid: int) -> str:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.rsplit(")", 1)[1].split()[0]


def _group_alive(pgid: int) -> bool:
    """Any non-zombie process left in the group."""
    if not Path("/proc/self/stat").exists():
        try:
            os.killpg(pgid, 0)
            return True
        except ProcessLookupError:
            return False
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":  # fields: state ppid pgrp ...
            return True
    return False


def _terminate_group(pgid: int, proc: subprocess.Popen[bytes] | None, timeout: float) -> None:
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if proc is not None:
                proc.poll()  # reap our own child so it does not linger as a zombie
            if not _group_alive(pgid):
                break
            time.sleep(0.1)
        else:
            continue
        break
    if proc is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)


def _tail(path: Path, offset: int = 0, lines: int = 40) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
    except OSError as e:
        return f"<log unreadable: {e}>"
    return "\n".join(text.splitlines()[-lines:])


def _redact(text: str) -> str:
    """Hide the password in ``scheme://user:password@host`` URIs."""
    return re.sub(r"(://[^:/@\s]+:)[^@/\s]+@", r"\1***@", text)


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
    client: MlflowClient, run_id: str, local_path: str | Path, artifact_path: str | None = None
) -> None:
    """Upload a file or directory into the run's artifact dir ``artifact_path`` (default root)."""
    path = Path(local_path)
    if path.is_dir():
        client.log_artifacts(run_id, str(path), artifact_path)
    else:
        client.log_artifact(run_id, str(path), artifact_path)


def log_json_artifact(client: MlflowClient, run_id: str, obj: Any, artifact_path: str) -> None:
    """Write ``obj`` as JSON to the artifact file ``artifact_path`` (e.g. ``spec/job.json``)."""
    text = json.dumps(obj, indent=2, default=str, allow_nan=False) + "\n"
    _log_text(client, run_id, text, artifact_path)


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


def _log_text(client: MlflowClient, run_id: str, text: str, artifact_path: str) -> None:
    directory, _, filename = artifact_path.strip("/").rpartition("/")
    with tempfile.TemporaryDirectory(prefix="fgd-artifact-") as tmp:
        local = Path(tmp) / filename
        local.write_text(text)
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
