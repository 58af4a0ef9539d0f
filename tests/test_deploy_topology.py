"""The compose topology's processes, run directly on this machine, carry a job end to end.

No Docker engine runs here, so each service of ``docker-compose.yml`` that the job needs runs as a
plain process with the environment and command the compose file gives it, as the Compose CLI
resolves them (interpolated from an env file): service host names become 127.0.0.1 and container
ports free ones. PostgreSQL is the machine's own (two databases made for the test, the second by
``deploy/compose/postgres-init.sh`` as the postgres image would run it); MLflow serves on that
backend; a Ray head and one Ray worker (``ray start``, each with its own temp dir) form the
cluster; the api is the Dockerfile's CMD. Each compose healthcheck (and each image HEALTHCHECK)
is then run against its process.

No S3 server can run here: MinIO and its bucket step are left out, MLflow's artifacts go to a
local directory instead of ``s3://.../mlflow``, and Tune's storage (FGD_TUNE_STORAGE) to a local
directory instead of ``s3://.../tune``; the S3 variables are still set, pointing at nothing.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from deploy_support import ROOT, compose_config, dockerfile_stages, filled_env
from test_service_ray import (
    FINAL,
    SHAPES,
    RayHead,
    Stack,
    _assert_finished_sweep,
    _free_port,
    _post,
    _tiny_sweep,
    _until,
    _wait,
)

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
PG = {"host": "127.0.0.1", "port": "5432", "user": "postgres"}
CONTAINER_HOME = "/fgd"  # FGD_HOME in the images and the compose file
OBJECT_STORE = 150 * 1024**2  # bytes per Ray node: CI has 2 cores and shares the machine
# Variables of the test process that must not reach the services (they get the compose file's).
OWN_PREFIXES = ("FGD_", "RAY_", "MLFLOW_", "AWS_", "PG")


@dataclass
class Topology:
    """The compose model and how its names, ports and paths map onto this machine."""

    config: dict[str, Any]
    home: Path
    ports: dict[tuple[str, int], int] = field(default_factory=dict)

    def port(self, service: str, container_port: int) -> int:
        if (service, container_port) not in self.ports:
            self.ports[(service, container_port)] = _free_port()
        return self.ports[(service, container_port)]

    def value(self, service: str, text: str) -> str:
        """One value of ``service``: host names, its own ports, binds and /fgd paths mapped."""
        hosts = "|".join(re.escape(s) for s in [*self.config["services"], "127.0.0.1", "localhost"])

        def to_local(m: re.Match[str]) -> str:
            # another service by name, or this one's own port on its loopback
            owner = m.group(1) if m.group(1) in self.config["services"] else service
            return f"127.0.0.1:{self.port(owner, int(m.group(2)))}"

        text = re.sub(rf"(?<![\w.-])({hosts}):(\d+)(?![\w@])", to_local, text)
        text = text.replace("0.0.0.0", "127.0.0.1")  # bind loopback only
        if text.startswith("s3://"):  # no S3 server here: local directories stand in
            text = str(self.home / "s3" / text.removeprefix("s3://"))
        if text == CONTAINER_HOME or text.startswith(CONTAINER_HOME + "/"):
            text = str(self.home / "fgd") + text[len(CONTAINER_HOME) :]
        return text

    def command(self, service: str, args: list[str]) -> list[str]:
        """``args`` of ``service`` mapped: ports (``--x-port=N``, ``--port N``) and values."""
        out: list[str] = []
        for i, arg in enumerate(args):
            flag, eq, value = arg.partition("=") if arg.startswith("--") else ("", "", arg)
            if flag and not eq:  # a flag alone
                out.append(arg)
                continue
            port_flag = flag if eq else (args[i - 1] if i else "")
            if re.fullmatch(r"--[\w-]*port", port_flag) and value.isdigit():
                value = str(self.port(service, int(value)))
            value = self.value(service, value)
            out.append(f"{flag}={value}" if eq else value)
        if out and (BIN / out[0]).exists():  # the image's executables are the venv's here
            out[0] = str(BIN / out[0])
        return out

    def env(self, service: str, **extra: str) -> dict[str, str]:
        """The service's compose environment, mapped, over this machine's basic environment."""
        base = {k: v for k, v in os.environ.items() if not k.startswith(OWN_PREFIXES)}
        base["PATH"] = f"{BIN}{os.pathsep}{base.get('PATH', '')}"  # `python` of the entrypoint
        base["PYTHONPATH"] = str(ROOT)
        declared = self.config["services"][service].get("environment") or {}
        mapped = {k: self.value(service, str(v)) for k, v in declared.items() if v is not None}
        return {**base, **mapped, **extra}

    def healthcheck(self, service: str, test: list[str] | None = None) -> bool:
        """Run the service's compose healthcheck (or ``test``) here: True when it passes."""
        test = test or self.config["services"][service]["healthcheck"]["test"]
        kind, rest = test[0], test[1:]
        args = ["sh", "-c", rest[0]] if kind == "CMD-SHELL" else list(rest)
        args = [sys.executable if a == "python" else self.value(service, a) for a in args]
        env = self.env(service, PGHOST=PG["host"], PGPORT=PG["port"])
        return subprocess.run(args, env=env, capture_output=True, timeout=30).returncode == 0


class Service:
    """One compose service as a process in its own session (stopped with its children)."""

    def __init__(
        self, name: str, cmd: list[str], env: dict[str, str], log: Path, url: str = ""
    ) -> None:
        self.name, self.log, self.url = name, log, url
        with log.open("ab") as out:
            self.proc = subprocess.Popen(
                cmd,
                env=env,
                cwd=log.parent,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def alive(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited:\n{self.log.read_text()[-3000:]}")
        return True

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(30)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)


def _psql(sql: str, dbname: str = "postgres") -> None:
    import psycopg

    conninfo = " ".join(f"{k}={v}" for k, v in {**PG, "dbname": dbname}.items())
    with psycopg.connect(conninfo, autocommit=True, connect_timeout=3) as conn:
        conn.execute(sql)  # type: ignore[arg-type]


@contextlib.contextmanager
def _databases(values: dict[str, str], home: Path) -> Iterator[None]:
    """POSTGRES_DB as the postgres image makes it, then its init script (MLFLOW_DB); dropped."""
    try:
        _psql("SELECT 1")
    except Exception as exc:
        pytest.skip(f"PostgreSQL at 127.0.0.1:5432 is not reachable: {exc}")
    _psql(f'CREATE DATABASE "{values["POSTGRES_DB"]}"')
    try:
        env = {
            "PATH": os.environ.get("PATH", ""),
            "POSTGRES_USER": values["POSTGRES_USER"],
            "POSTGRES_DB": values["POSTGRES_DB"],
            "MLFLOW_DB": values["MLFLOW_DB"],
            "PGHOST": PG["host"],
            "PGPORT": PG["port"],
        }
        init = ROOT / "deploy" / "compose" / "postgres-init.sh"
        out = subprocess.run(["sh", str(init)], env=env, capture_output=True, text=True, cwd=home)
        assert out.returncode == 0, out.stderr
        yield
    finally:
        for name in (values["MLFLOW_DB"], values["POSTGRES_DB"]):
            _psql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _ray_node(topo: Topology, service: str, temp_dir: str, dashboard: str) -> RayHead:
    """``ray start --block`` of a compose Ray service, in its own session and temp dir."""
    cmd = topo.command(service, topo.config["services"][service]["command"])
    cmd += [f"--temp-dir={temp_dir}", f"--object-store-memory={OBJECT_STORE}"]
    env = topo.env(service)
    node = Service(service, cmd, env, topo.home / f"{service}.log")
    return RayHead(node.proc, dashboard, env["RAY_AUTH_TOKEN"], temp_dir, node.log)


def _alive_nodes(head: RayHead) -> list[dict[str, Any]]:
    headers = {"Authorization": f"Bearer {head.token}"}
    r = httpx.get(f"{head.dashboard}/api/v0/nodes?limit=100", headers=headers, timeout=5)
    r.raise_for_status()
    rows = r.json()["data"]["result"]["result"]
    return [n for n in rows if n["state"] == "ALIVE"]


@dataclass
class Running:
    topo: Topology
    stack: Stack
    tracking_uri: str
    head: RayHead


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    from workers.convert import resolve_data
    from workers.spec import DataSpec

    home = tmp_path_factory.mktemp("topology")
    suffix = uuid.uuid4().hex[:10]
    values = filled_env(
        POSTGRES_USER=PG["user"],  # trust authentication here: the password is not checked
        POSTGRES_DB=f"fgd_topo_{suffix}",
        MLFLOW_DB=f"fgd_topo_{suffix}_mlflow",
        RAY_AUTH_TOKEN=secrets.token_hex(32),
    )
    topo = Topology(compose_config(values, home), home)
    topo.ports[("postgres", 5432)] = int(PG["port"])
    services = topo.config["services"]
    data_root = Path(topo.env("api")["FGD_DATA_ROOTS"])
    data = data_root / "shapes-tiny"
    resolve_data(DataSpec.model_validate({"shapes": {"root": str(data), **SHAPES}}))

    started: list[Service | RayHead] = []
    with contextlib.ExitStack() as cleanup:
        cleanup.enter_context(_databases(values, home))
        cleanup.callback(lambda: [p.stop() for p in reversed(started)])
        assert topo.healthcheck("postgres")
        # MLflow and the Ray head start side by side (each takes seconds on 2 cores)
        mlflow = Service(
            "mlflow",
            topo.command("mlflow", services["mlflow"]["command"]),
            topo.env("mlflow"),
            home / "mlflow.log",
        )
        started.append(mlflow)
        head_temp = tempfile.mkdtemp(prefix="fgdtopo-", dir="/tmp")  # short: Unix socket paths
        dashboard = f"http://127.0.0.1:{topo.port('ray-head', 8265)}"
        head = _ray_node(topo, "ray-head", head_temp, dashboard)
        started.append(head)
        _wait("the Ray head", head.answers, timeout=120)
        assert topo.healthcheck("ray-head")
        worker = _ray_node(
            topo, "ray-worker", tempfile.mkdtemp(prefix="fgdtopo-", dir="/tmp"), dashboard
        )
        started.append(worker)
        _wait("MLflow", lambda: mlflow.alive() and topo.healthcheck("mlflow"), timeout=120)
        _wait(
            "the worker", lambda: worker.proc.poll() is None and len(_alive_nodes(head)) == 2, 120
        )
        assert topo.healthcheck("ray-worker")

        _, stages = dockerfile_stages()
        api_cmd = next(c.value for c in stages["api"] if c.cmd == "CMD")
        api_url = f"http://127.0.0.1:{topo.port('api', 8000)}"
        api_args = topo.command("api", list(api_cmd))
        api = Service("api", api_args, topo.env("api"), home / "api.log", url=api_url)
        started.append(api)
        _wait("the api", lambda: api.alive() and topo.healthcheck("api"), timeout=90)

        # the first token, as `docker compose exec api fgd token create NAME --admin` makes it
        out = subprocess.run(
            [str(BIN / "fgd"), "token", "create", "topology", "--admin"],
            env=topo.env("api"),
            capture_output=True,
            text=True,
            timeout=60,
            cwd=home,
        )
        assert out.returncode == 0, out.stderr
        token = out.stdout.strip().splitlines()[-1]
        headers = {"Authorization": f"Bearer {token}"}
        uri = topo.env("api")["MLFLOW_TRACKING_URI"]
        # the service tests' Stack: an api with a url, the headers, the data, the head
        yield Running(topo, Stack(api, headers, data, head), uri, head)  # type: ignore[arg-type]


def test_the_services_answer_their_healthchecks(running: Running) -> None:
    topo = running.topo
    for service, config in topo.config["services"].items():
        if service in ("minio", "minio-init"):  # no S3 server here
            continue
        assert topo.healthcheck(service), f"{service}: {config['healthcheck']['test']}"
    # the images' own HEALTHCHECKs: the api's /healthz, a Ray node's raylet
    _, stages = dockerfile_stages()
    for target, service in (("api", "api"), ("ray", "ray-worker")):
        check = next(c.value for c in stages[target] if c.cmd == "HEALTHCHECK")
        assert topo.healthcheck(service, list(check)), f"{target}: {check}"
    # the head offers no CPUs (compose's default): trials can only run on the worker
    nodes = sorted(_alive_nodes(running.head), key=lambda n: n["resources_total"].get("CPU", 0))
    assert nodes[0]["resources_total"].get("CPU", 0) == 0
    assert nodes[1]["resources_total"]["CPU"] >= 2


def test_a_sweep_runs_end_to_end_on_the_topology(running: Running) -> None:
    t0 = time.monotonic()
    stack = running.stack
    job_id = _post(stack, _tiny_sweep(stack.data), "topology")
    job = _until(stack, job_id, FINAL, timeout=240)
    _assert_finished_sweep(stack, job)
    print(f"topology job: {time.monotonic() - t0:.0f}s")

    # the results in MLflow (PostgreSQL backend): the parent run, its trials, their metrics
    from mlflow.tracking import MlflowClient

    client = MlflowClient(running.tracking_uri)
    parent = client.get_run(job["mlflow"]["run_id"])
    assert parent.data.tags["fgd.job_id"] == job_id
    assert parent.info.status == "FINISHED"
    trials = client.search_runs(
        [job["mlflow"]["experiment_id"]],
        filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'",
    )
    assert len(trials) == 2
    for trial in trials:
        assert trial.info.status == "FINISHED"
        assert "bbox_AP" in trial.data.metrics
        history = client.get_metric_history(trial.info.run_id, "train/loss")
        assert len(history) >= 2, [m.key for m in trial.data.metrics]  # per-step, not one value
        assert trial.info.artifact_uri.startswith("mlflow-artifacts:")  # served by the server
        assert client.list_artifacts(trial.info.run_id)

    # where compose keeps state on S3, the local stand-ins got it
    s3 = running.topo.home / "s3"
    assert any((s3 / "fgd" / "mlflow").rglob("*")), "no MLflow artifact stored"
    assert (s3 / "fgd" / "tune" / f"job-{job_id}").is_dir(), "no Tune experiment stored"
