"""The MLflow tracking server: the embedded one under ``FGD_HOME`` (started on first use, shared
by every process of the user through a lock and a JSON record), any server started for a test or
a benchmark (``start_server``), and the URI the driver hands to its trials (``tracking_uri``).

``mlflow`` is not imported here: starting or finding the server costs no MLflow import.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from workers.artifact_store import LocalArtifactStore
from workers.settings import FgdLayout, layout, mlflow_settings

log = logging.getLogger(__name__)


class TrackingServerError(RuntimeError):
    """An MLflow server could not be started (the message quotes the tail of its log)."""


_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}  # servers started by this process (to reap)
_STARTED: dict[str, ServerHandle] = {}  # the same servers by URI (for local_artifact_store)


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
        if _STARTED.get(self.uri) is self:
            del _STARTED[self.uri]

    def artifact_store(self) -> LocalArtifactStore | None:
        """The server's artifact directory, when it is local and marked (see start_server)."""
        if "://" in self.artifacts_destination:
            return None
        return LocalArtifactStore.read(self.artifacts_destination)

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
        # Marked, so that trials on this machine may write into it directly.
        LocalArtifactStore.mark(local)
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
    _STARTED[handle.uri] = handle
    log.info("mlflow server %s up in %.1fs (pid %d)", handle.uri, handle.start_seconds, proc.pid)
    return handle


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` when set; else the embedded server's URI, started if needed."""
    configured = mlflow_settings().tracking_uri
    if configured:
        return configured
    return ensure_embedded_server().uri


def local_artifact_store(uri: str) -> LocalArtifactStore | None:
    """The local artifact store of the server at ``uri``, when it is one this process started
    or the embedded server: trials that find it (workers.artifact_store) write artifacts into
    it without an upload. None for any other server."""
    uri = uri.rstrip("/")
    handle = _STARTED.get(uri)
    if handle is None:
        embedded = embedded_server()
        handle = embedded if embedded is not None and embedded.uri.rstrip("/") == uri else None
    return handle.artifact_store() if handle is not None else None


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
