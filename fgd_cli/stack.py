"""The local stack behind `fgd serve` and `fgd demo`: a Ray head, an MLflow server, the REST API.

Each part is its own process in its own session, so a Ctrl-C in the terminal reaches only this
supervisor, which stops the parts in reverse order:

- Ray: ``ray start --head --block`` with a fresh token (Ray's token auth), its own temp dir
  under /tmp and free ports (the dashboard on 8265 when free). Not started when ``RAY_ADDRESS``
  names a cluster.
- MLflow: the embedded server of ``FGD_HOME`` (SQLite, local artifacts; ``workers.tracking_server``),
  reused when it already runs (and then left running). Not started when
  ``MLFLOW_TRACKING_URI`` is set.
- The API: ``python -m uvicorn service.main:app`` dispatching to that Ray head. This process
  imports no torch, and neither does the API's.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import importlib.util
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import httpx

from fgd_cli.console import CliError

BIN = Path(sys.executable).parent
RAY_DASHBOARD_PORT = 8265


class Interrupted(CliError):
    """A signal asked the stack to stop while it was starting or waiting."""


@dataclass
class StackOptions:
    """What `fgd serve` and `fgd demo` may choose about the stack."""

    host: str = "127.0.0.1"  # the API's bind address
    port: int = 8000  # the API's port; 0 picks a free one
    num_cpus: int | None = None  # CPUs of the Ray head (default: Ray counts them)
    num_gpus: int | None = None  # GPUs of the Ray head (default: Ray counts them)
    object_store_mb: int | None = None  # Ray's object store (default: Ray's share of memory)
    api_log: Path | None = None  # the API's output; None: this terminal
    max_concurrent_jobs: int | None = None  # FGD_MAX_CONCURRENT_JOBS of the API


@contextlib.contextmanager
def stop_on_signals() -> Iterator[threading.Event]:
    """SIGINT, SIGTERM and SIGHUP set the event (the caller stops cleanly) instead of killing
    this process."""
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(signum: int, frame: Any) -> None:
        stop.set()

    signals = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)  # HUP: the terminal went away
    previous = {s: signal.signal(s, handler) for s in signals}
    try:
        yield stop
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the supervisor dies, even by SIGKILL (Linux)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _spawn(cmd: list[str], env: dict[str, str], cwd: Path, log: Path | None) -> subprocess.Popen:
    out: IO[bytes] | None = None
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        out = log.open("ab")
    try:
        return subprocess.Popen(
            cmd,
            env=env,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT if out else None,
            start_new_session=True,  # own group: no stray Ctrl-C, and its leftovers killable
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )
    finally:
        if out is not None:
            out.close()


def _terminate(proc: subprocess.Popen, timeout: float) -> None:
    """SIGTERM the process, SIGKILL it after ``timeout``, then whatever is left in its group."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def _tail(path: Path | None, chars: int = 3000) -> str:
    if path is None or not path.exists():
        return ""
    return "\n" + path.read_text(errors="replace")[-chars:]


def _python_path() -> str:
    """PYTHONPATH naming the project root too, so children import it even uninstalled."""
    spec = importlib.util.find_spec("service")
    root = str(Path(spec.origin).parents[1]) if spec and spec.origin else ""
    return os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)


@dataclass
class Stack:
    """The three processes; ``start()`` brings up what is missing, ``stop()`` takes it down."""

    options: StackOptions = field(default_factory=StackOptions)
    home: Path = field(default_factory=lambda: _home())
    api_url: str = ""
    ray_address: str = ""
    ray_token: str | None = None
    mlflow_uri: str = ""
    started: list[str] = field(default_factory=list)  # what this stack started, in order
    _ray: subprocess.Popen | None = None
    _ray_temp: str | None = None
    _api: subprocess.Popen | None = None
    _mlflow_started: bool = False
    _lock: IO[str] | None = None

    @property
    def ray_log(self) -> Path:
        return self.home / "serve" / "ray.log"

    def start(
        self, stop: threading.Event | None = None, say: Callable[[str], None] = print
    ) -> None:
        """Start Ray, MLflow and the API; on any failure stop what was started and raise."""
        stop = stop or threading.Event()
        opts = self.options
        port = opts.port or free_port(opts.host)
        if not port_free(opts.host, port):
            raise CliError(f"port {port} on {opts.host} is in use; choose another with --port")
        self._lock_home()
        try:
            self.ray_address = os.environ.get("RAY_ADDRESS", "")
            if not self.ray_address:
                self._start_ray()  # in the background while MLflow starts
            self._start_mlflow(say)
            if self._ray is not None:
                self._wait("the Ray head", self._ray_answers, 180, stop)
                say(f"Ray head      {self.ray_address} (dashboard; log {self.ray_log})")
            else:
                say(f"Ray cluster   {self.ray_address} (RAY_ADDRESS)")
            self._start_api(opts.host, port)
            self._wait("the API", self._api_answers, 120, stop)
            say(f"API           {self.api_url} (docs {self.api_url}/docs)")
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop what this stack started, the API first; idempotent."""
        if self._api is not None:
            _terminate(self._api, 30)
            self._api = None
        if self._ray is not None:
            _terminate(self._ray, 60)  # `ray start --block` stops its processes on SIGTERM
            self._ray = None
        if self._ray_temp is not None:
            shutil.rmtree(self._ray_temp, ignore_errors=True)
            self._ray_temp = None
        if self._mlflow_started:
            from workers.tracking_server import stop_embedded_server

            stop_embedded_server()
            self._mlflow_started = False
        if self._lock is not None:
            self._lock.close()  # releases the flock
            self._lock = None

    def __enter__(self) -> Stack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def check_alive(self) -> None:
        """Raise naming the part that exited (with its log's tail) when one did."""
        if self._ray is not None and self._ray.poll() is not None:
            raise CliError(f"the Ray head exited ({self._ray.returncode}){_tail(self.ray_log)}")
        if self._api is not None and self._api.poll() is not None:
            raise CliError(f"the API exited ({self._api.returncode}){_tail(self.options.api_log)}")

    def wait(self, stop: threading.Event) -> None:
        """Block until ``stop`` is set; raise when a part exits on its own."""
        while not stop.wait(0.5):
            self.check_alive()

    # --- the parts ---------------------------------------------------------------------------

    def _lock_home(self) -> None:
        """One stack per FGD_HOME: two would dispatch the same job store twice."""
        path = self.home / "serve" / "serve.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = path.open("a+")
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.seek(0)
            holder = lock.read().strip() or "?"
            lock.close()
            raise CliError(
                f"the service already runs on FGD_HOME={self.home} (pid {holder}); stop it, "
                "or set FGD_HOME to another folder"
            ) from None
        lock.truncate(0)
        lock.write(str(os.getpid()))
        lock.flush()
        self._lock = lock

    def _start_ray(self) -> None:
        opts = self.options
        self.ray_token = secrets.token_hex(32)
        self._ray_temp = tempfile.mkdtemp(prefix="fgdray-", dir="/tmp")  # short socket paths
        dash = RAY_DASHBOARD_PORT if port_free("127.0.0.1", RAY_DASHBOARD_PORT) else free_port()
        env = {
            **os.environ,
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # `python` of the jobs
            "PYTHONPATH": _python_path(),
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": self.ray_token,
            "FGD_HOME": str(self.home),
        }
        env.pop("RAY_ADDRESS", None)
        cmd = [
            str(BIN / "ray"),
            "start",
            "--head",
            f"--port={free_port()}",
            f"--dashboard-port={dash}",
            "--dashboard-host=127.0.0.1",
            f"--ray-client-server-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}",
            "--include-dashboard=true",
            f"--temp-dir={self._ray_temp}",
            "--disable-usage-stats",
            "--block",
        ]
        if opts.num_cpus is not None:
            cmd.append(f"--num-cpus={opts.num_cpus}")
        if opts.num_gpus is not None:
            cmd.append(f"--num-gpus={opts.num_gpus}")
        if opts.object_store_mb is not None:
            cmd.append(f"--object-store-memory={opts.object_store_mb * 1024**2}")
        self.ray_address = f"http://127.0.0.1:{dash}"
        self._ray = _spawn(cmd, env, self.home, self.ray_log)
        self.started.append("ray")

    def _ray_answers(self) -> bool:
        self.check_alive()
        headers = {"Authorization": f"Bearer {self.ray_token}"}
        try:
            r = httpx.get(f"{self.ray_address}/api/version", headers=headers, timeout=2)
        except httpx.HTTPError:
            return False
        return r.status_code == 200

    def _start_mlflow(self, say: Callable[[str], None]) -> None:
        configured = os.environ.get("MLFLOW_TRACKING_URI")
        if configured:
            self.mlflow_uri = configured
            say(f"MLflow        {configured} (MLFLOW_TRACKING_URI)")
            return
        from workers.tracking_server import embedded_server, ensure_embedded_server

        running = embedded_server()
        handle = running or ensure_embedded_server()
        self._mlflow_started = running is None
        if self._mlflow_started:
            self.started.append("mlflow")
        self.mlflow_uri = handle.uri
        reused = "" if self._mlflow_started else ", already running: left running"
        say(f"MLflow        {handle.uri} (log {handle.log_path}{reused})")

    def _start_api(self, host: str, port: int) -> None:
        env = {
            **os.environ,
            "PYTHONPATH": _python_path(),
            "FGD_HOME": str(self.home),
            "FGD_DISPATCH": "ray",
            "RAY_ADDRESS": self.ray_address,
            "MLFLOW_TRACKING_URI": self.mlflow_uri,
        }
        env.setdefault("FGD_RAY_PYTHON", sys.executable)
        if self.ray_token is not None:
            env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=self.ray_token)
        if self.options.max_concurrent_jobs is not None:
            env["FGD_MAX_CONCURRENT_JOBS"] = str(self.options.max_concurrent_jobs)
        cmd = [sys.executable, "-m", "uvicorn", "service.main:app"]
        cmd += ["--host", host, "--port", str(port), "--timeout-graceful-shutdown", "10"]
        shown = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
        self.api_url = f"http://{shown}:{port}"
        self._api = _spawn(cmd, env, self.home, self.options.api_log)
        self.started.append("api")

    def _api_answers(self) -> bool:
        self.check_alive()
        try:
            return httpx.get(f"{self.api_url}/readyz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def _wait(
        self, what: str, ready: Callable[[], bool], timeout: float, stop: threading.Event
    ) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            if stop.is_set():
                raise Interrupted(f"interrupted while waiting for {what}")
            if time.monotonic() > deadline:
                raise CliError(f"{what} did not answer within {timeout:.0f}s")
            stop.wait(0.5)


def _home() -> Path:
    from workers.settings import fgd_home

    return fgd_home()
