"""The service on a real Ray head (Jobs API), a real MLflow server, and the real HTTP app.

One Ray head (``ray start --head --block`` with a private token, its own ports and temp dir),
one MLflow server and one API process (uvicorn) for the module; the restart test kills the API
with SIGKILL and starts it again on the same database.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
FINAL = {"SUCCEEDED", "FAILED", "CANCELLED"}
SHAPES = {"num_train": 16, "num_val": 8, "image_size": 64, "seed": 0}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(what: str, check: Any, timeout: float, every: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout:.0f}s")
        time.sleep(every)


@dataclass
class RayHead:
    proc: subprocess.Popen[bytes]
    dashboard: str
    token: str
    temp_dir: str
    log: Path

    def env(self) -> dict[str, str]:
        return {
            "RAY_ADDRESS": self.dashboard,
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": self.token,
        }

    def answers(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"ray start exited:\n{self.log.read_text()[-3000:]}")
        try:
            headers = {"Authorization": f"Bearer {self.token}"}
            r = httpx.get(f"{self.dashboard}/api/version", headers=headers, timeout=2)
            return r.status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self) -> None:
        """SIGTERM the blocking ``ray start`` (it stops what it started), then its group."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(60)
        # leftovers of this head only: it is its own session and process group
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def _start_ray(home: Path) -> RayHead:
    token = secrets.token_hex(32)
    temp_dir = tempfile.mkdtemp(prefix="fgdray-", dir="/tmp")  # short: Unix socket paths
    log = home / "ray.log"
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # `python` of the entrypoint
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": token,
        "FGD_HOME": str(home),
    }
    env.pop("RAY_ADDRESS", None)
    dash = _free_port()
    cmd = [
        str(BIN / "ray"),
        "start",
        "--head",
        f"--port={_free_port()}",
        f"--dashboard-port={dash}",
        "--dashboard-host=127.0.0.1",
        f"--ray-client-server-port={_free_port()}",
        f"--dashboard-agent-listen-port={_free_port()}",
        "--num-cpus=2",
        "--num-gpus=0",
        f"--object-store-memory={150 * 1024**2}",
        "--include-dashboard=true",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
        "--block",
    ]
    with log.open("wb") as out:
        proc = subprocess.Popen(
            cmd, env=env, cwd=home, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    head = RayHead(proc, f"http://127.0.0.1:{dash}", token, temp_dir, log)
    try:
        _wait("the Ray dashboard", head.answers, timeout=120)
    except BaseException:
        head.stop()
        raise
    return head


class ApiProcess:
    """``uvicorn service.main:app`` in a subprocess, dispatching to the Ray head."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.env, self.log = env, log
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        cmd = [sys.executable, "-m", "uvicorn", "service.main:app", "--port", str(self.port)]
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                cmd, env=self.env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT
            )
        _wait("the API", self._healthy, timeout=60)

    def _healthy(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"the API exited:\n{self.log.read_text()[-3000:]}")
        try:
            return httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@dataclass
class Stack:
    api: ApiProcess
    headers: dict[str, str]
    data: Path
    ray: RayHead

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.api.url, headers=self.headers, timeout=30)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    from service.cli_tokens import create
    from workers.convert import resolve_data
    from workers.spec import DataSpec
    from workers.tracking_server import start_server

    home = tmp_path_factory.mktemp("fgd_ray_home")
    data = home / "data" / "shapes-tiny"
    resolve_data(DataSpec.model_validate({"shapes": {"root": str(data), **SHAPES}}))
    mlflow = start_server(
        f"sqlite:///{home / 'mlflow.db'}", str(home / "artifacts"), log_path=home / "mlflow.log"
    )
    ray = None
    api = None
    try:
        ray = _start_ray(home)
        db_url = f"sqlite:///{home / 'jobs.db'}"
        env = {
            **os.environ,
            **ray.env(),
            "FGD_HOME": str(home),
            "FGD_DATABASE_URL": db_url,
            "FGD_DISPATCH": "ray",
            "FGD_DISPATCH_INTERVAL": "0.5",
            "FGD_DATA_ROOTS": str(home / "data"),
            "MLFLOW_TRACKING_URI": mlflow.uri,
            "PYTHONPATH": str(ROOT),
        }
        api = ApiProcess(env, home / "api.log")
        api.start()
        token = create("ray-tests", database_url=db_url)
        yield Stack(api, {"Authorization": f"Bearer {token}"}, data, ray)
    finally:
        if api is not None:
            api.stop()
        if ray is not None:
            ray.stop()
        mlflow.stop()


def _tiny_sweep(data: Path, **sweep: Any) -> dict[str, Any]:
    from sweep_helpers import tiny_job

    return tiny_job(
        data,
        None,
        sweep={"num_samples": 2, "max_concurrent_trials": 2, **sweep},
        iterations=4,
        eval_every=2,
    )


def _post(stack: Stack, spec: dict[str, Any], name: str) -> str:
    with stack.client() as c:
        r = c.post("/jobs", json={"name": name, "spec": spec, "max_attempts": 1})
    assert r.status_code in (200, 201), r.text
    return str(r.json()["id"])


def _job(stack: Stack, job_id: str) -> dict[str, Any]:
    with stack.client() as c:
        r = c.get(f"/jobs/{job_id}")
    assert r.status_code == 200, r.text
    return dict(r.json())


def _until(stack: Stack, job_id: str, states: set[str], timeout: float) -> dict[str, Any]:
    last: dict[str, Any] = {}

    def reached() -> bool:
        last.update(_job(stack, job_id))
        return last["state"] in states

    try:
        _wait(f"job {job_id} in {states}", reached, timeout=timeout, every=1.0)
    except TimeoutError as exc:
        raise AssertionError(
            f"job stuck in {last.get('state')}: {last}\n{_logs(stack, job_id)}"
        ) from exc
    return last


def _logs(stack: Stack, job_id: str) -> str:
    with stack.client() as c:
        return c.get(f"/jobs/{job_id}/logs").text


def _assert_finished_sweep(stack: Stack, job: dict[str, Any]) -> None:
    job_id = job["id"]
    logs = _logs(stack, job_id)
    assert job["state"] == "SUCCEEDED", f"{job}\n{logs}"
    assert job["attempt"] == 1 and job["error"] is None
    assert job["mlflow"]["run_id"] and job["mlflow"]["experiment_id"]
    assert job["progress"]["trials_done"] == 2
    with stack.client() as c:
        trials = c.get(f"/jobs/{job_id}/trials").json()
        results = c.get(f"/jobs/{job_id}/results").json()
    assert len(trials) == 2 and {t["status"] for t in trials} == {"FINISHED"}
    ranks = [row["rank"] for row in results["rows"]]  # equal trials may tie
    assert len(ranks) == 2 and ranks == sorted(ranks) and ranks[0] == 1
    assert results["metric"] == "bbox_AP"
    assert all(row["value"] is not None for row in results["rows"])
    # the final log lines were copied before the job was marked SUCCEEDED
    assert f"job {job_id} attempt 1" in logs and "2 trials, 0 errored" in logs


def test_a_sweep_runs_end_to_end_over_http(stack: Stack) -> None:
    t0 = time.monotonic()
    job_id = _post(stack, _tiny_sweep(stack.data), "e2e")
    job = _until(stack, job_id, FINAL, timeout=240)
    _assert_finished_sweep(stack, job)
    print(f"end to end: {time.monotonic() - t0:.0f}s")


def test_a_job_no_node_can_run_fails_at_once_naming_the_gpu(stack: Stack) -> None:
    spec = _tiny_sweep(stack.data, resources={"cpu": 1, "gpu": 1})
    job_id = _post(stack, spec, "needs-a-gpu")
    job = _until(stack, job_id, FINAL, timeout=20)
    assert job["state"] == "FAILED"
    assert "GPU 1" in job["error"] and "0 GPU" in job["error"], job["error"]


def test_the_api_killed_mid_job_adopts_it_after_a_restart(stack: Stack) -> None:
    job_id = _post(stack, _tiny_sweep(stack.data), "restart")
    _until(stack, job_id, {"RUNNING", *FINAL}, timeout=90)
    with stack.client() as c:  # in the middle of the sweep: a trial has started
        _wait("a trial line", lambda: "started" in c.get(f"/jobs/{job_id}/logs").text, 120)
    assert _job(stack, job_id)["state"] == "RUNNING"
    stack.api.kill()
    time.sleep(2)  # Ray and MLflow carry on without the service
    stack.api.start()
    job = _until(stack, job_id, FINAL, timeout=240)
    _assert_finished_sweep(stack, job)
    assert job["failures"] == []


def test_the_dispatcher_submits_once_and_reports_failures_briefly(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    from service.dispatch import DispatchState, JobSubmission
    from service.ray_dispatch import RayJobsDispatcher

    for name, value in stack.ray.env().items():
        monkeypatch.setenv(name, value)
    noop = RayJobsDispatcher(stack.ray.dashboard, noop=True, inline_limit=100)
    big = {"kind": "baseline", "padding": "x" * 1000}  # past inline_limit: sent as a file
    job = JobSubmission(job_id="noop", attempt=1, name="noop", spec=big, resources={"CPU": 1.0})
    assert noop.submit(job) == noop.submit(job) == "fgd-noop-1"  # the second is a no-op
    client = noop.client()
    assert [j.submission_id for j in client.list_jobs()].count("fgd-noop-1") == 1
    assert "spec.json" in client.get_job_info("fgd-noop-1").entrypoint
    _wait("the noop job", lambda: noop.status("fgd-noop-1")[0] == DispatchState.SUCCEEDED, 60)
    assert "noop job noop attempt 1" in noop.logs("fgd-noop-1")
    with pytest.raises(KeyError):
        noop.status("fgd-nobody-1")

    real = RayJobsDispatcher(stack.ray.dashboard)
    bad = JobSubmission(job_id="bad", attempt=2, name="bad", spec={"kind": "nope"}, resources={})
    sid = real.submit(bad)
    state, message = _wait(
        "the bad job", lambda: (s := real.status(sid))[0] == DispatchState.FAILED and s, 60
    )
    assert message.startswith("fgd job bad failed: bad spec:") and len(message) < 2000, message
