"""The benchmarks' service stack: a scratch PostgreSQL database seeded through the store, a
Ray head, the API in a subprocess, and the CPU each of them uses (``api_load.py``)."""

from __future__ import annotations

import contextlib
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PG_SERVER = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
DATA_ROOT = "/srv/fgd/data"  # the server's FGD_DATA_ROOTS; the paths need not exist here

SPEC: dict[str, Any] = {
    "kind": "distill",
    "data": {
        "coco": {
            "train_images": f"{DATA_ROOT}/coco/train2017",
            "train_ann": f"{DATA_ROOT}/coco/annotations/instances_train2017.json",
            "val_images": f"{DATA_ROOT}/coco/val2017",
            "val_ann": f"{DATA_ROOT}/coco/annotations/instances_val2017.json",
        }
    },
    "model": {"arch": "retinanet", "backbone": "resnet18", "min_size": 512, "max_size": 683},
    "teacher": {
        "checkpoint": f"{DATA_ROOT}/teachers/retinanet_r50.pt",
        "model": {"arch": "retinanet", "backbone": "resnet50", "min_size": 512, "max_size": 683},
    },
    "train": {"batch_size": 8, "schedule": {"iterations": 3000, "warmup_iters": 100}},
    "sweep": {
        "space": {"alpha": {"loguniform": [1e-5, 1e-3]}, "temp": {"choice": [0.5, 1.0]}},
        "num_samples": 8,
        "scheduler": "asha",
        "metric": "bbox_AP",
    },
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(what: str, check: Any, timeout: float, every: float = 0.25) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout:.0f}s")
        time.sleep(every)


# --- the store: a database of its own, tokens, 10,000 jobs --------------------------------------


@contextlib.contextmanager
def scratch_database(server_url: str) -> Iterator[str]:
    """A fresh PostgreSQL database on ``server_url``'s server, dropped afterwards."""
    from sqlalchemy import create_engine
    from sqlalchemy.engine import make_url

    name = f"fgd_bench_{uuid.uuid4().hex[:10]}"
    admin = create_engine(server_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    try:
        yield make_url(server_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


def seed_store(database_url: str, *, tenants: int, jobs: int) -> tuple[list[str], list[int]]:
    """Migrate, make ``tenants`` tokens (unlimited quota) and insert ``jobs`` finished jobs.

    The jobs are spread over the tenants, created over the last 30 days; 70 % SUCCEEDED (with
    progress and MLflow ids), 15 % FAILED (with failures), 15 % CANCELLED. Returns the plain
    tokens and their ids.
    """
    from sqlalchemy import insert

    from service.auth import create_token
    from service.db import Store
    from service.models import Job, JobState
    from service.schemas import JobCreate, canonical_hash

    store = Store.from_url(database_url)
    try:
        store.migrate()
        with store.session() as session:
            made = [
                create_token(session, f"bench-{i}", quota=1_000_000_000) for i in range(tenants)
            ]
        plain, ids = [p for p, _ in made], [row.id for _, row in made]
        spec = JobCreate.model_validate({"name": "x", "spec": SPEC}).spec.to_dict()
        spec_hash = canonical_hash(spec)
        rng = random.Random(0)
        now = datetime.now(UTC)
        rows = []
        for i in range(jobs):
            created = now - timedelta(days=30) + timedelta(seconds=i * 30 * 86400 / max(jobs, 1))
            finished = created + timedelta(minutes=rng.uniform(5, 300))
            roll = rng.random()
            row: dict[str, Any] = {
                "id": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
                "owner_id": ids[i % tenants],
                "name": f"seed-{i:05d}",
                "priority": rng.choice((0, 0, 0, 5, 10)),
                "idempotency_key": f"seed-{i:05d}",
                "request_hash": canonical_hash({"name": f"seed-{i:05d}", "spec": spec}),
                "spec": spec,
                "spec_hash": spec_hash,
                "attempt": 1,
                "max_attempts": 2,
                "submission_id": None,
                "created_at": created,
                "updated_at": finished,
                "started_at": created + timedelta(seconds=20),
                "finished_at": finished,
                "error": None,
                "progress": None,
                "mlflow_experiment_id": None,
                "mlflow_run_id": None,
                "failures": [],
            }
            if roll < 0.70:
                best = {"name": "bbox_AP", "value": rng.uniform(0.2, 0.4), "mode": "max"}
                row |= {
                    "state": JobState.SUCCEEDED,
                    "submission_id": f"fgd-{row['id']}-1",
                    "progress": {"trials_done": 8, "trials_running": 0, "best": best},
                    "mlflow_experiment_id": "1",
                    "mlflow_run_id": uuid.UUID(int=rng.getrandbits(128)).hex,
                }
            elif roll < 0.85:
                at = finished.isoformat()
                row |= {
                    "state": JobState.FAILED,
                    "attempt": 2,
                    "submission_id": f"fgd-{row['id']}-2",
                    "error": "CUDA out of memory",
                    "failures": [
                        {"attempt": 1, "reason": "node died", "at": at},
                        {"attempt": 2, "reason": "CUDA out of memory", "at": at},
                    ],
                }
            else:
                row |= {"state": JobState.CANCELLED, "error": "cancelled before it was dispatched"}
                row |= {"attempt": 0, "started_at": None}
            rows.append(row)
        with store.session() as session:
            for start in range(0, len(rows), 1000):
                session.execute(insert(Job), rows[start : start + 1000])
            session.commit()
        # A store that grew over 30 days has been autovacuumed: statistics and visibility map.
        with store.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.exec_driver_sql("VACUUM ANALYZE")
        return plain, ids
    finally:
        store.dispose()


def job_states(database_url: str) -> dict[str, int]:
    from sqlalchemy import func, select

    from service.db import Store
    from service.models import Job

    store = Store.from_url(database_url)
    try:
        with store.session() as session:
            rows = session.execute(select(Job.state, func.count()).group_by(Job.state)).all()
            return {str(state): int(n) for state, n in rows}
    finally:
        store.dispose()


def remove_tenants(database_url: str, ids: list[int]) -> None:
    """Delete the benchmark's tokens and their jobs from a store it did not create."""
    from sqlalchemy import delete, select

    from service.db import Store
    from service.models import Job, JobLog, Token

    store = Store.from_url(database_url)
    try:
        with store.session() as session:
            mine = select(Job.id).where(Job.owner_id.in_(ids))
            session.execute(delete(JobLog).where(JobLog.job_id.in_(mine)))
            session.execute(delete(Job).where(Job.owner_id.in_(ids)))
            session.execute(delete(Token).where(Token.id.in_(ids)))
            session.commit()
    finally:
        store.dispose()


# --- the processes: a Ray head (nice 19) and the API ---------------------------------------------


@dataclass
class RayHead:
    """``ray start --head --block`` (then at nice 19), its own ports and temp dir.

    ``idle``: the head's processes (and all they start) run under SCHED_IDLE on the machine's
    last CPU, as a remote cluster would take nothing from the API's CPUs. ``cpus``: they run on
    these CPUs instead (at nice 19 alone, unless ``idle``), as on a machine of their own when
    nothing else runs there. ``temp_root`` holds its session directory.
    """

    home: Path
    proc: subprocess.Popen[bytes] | None = None
    dashboard: str = ""
    temp_dir: str = ""
    token: str = field(default_factory=lambda: secrets.token_hex(32))
    idle: bool = False  # SCHED_IDLE instead of nice 19 alone
    temp_root: str = "/tmp"
    cpus: set[int] | None = None

    def env(self) -> dict[str, str]:
        """What a client of this head needs (Ray requires a token for its dashboard)."""
        return {
            "RAY_ADDRESS": self.dashboard,
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": self.token,
        }

    def start(self) -> None:
        # Short socket paths: Ray's session directory holds its sockets.
        self.temp_dir = tempfile.mkdtemp(prefix="fgdbench-", dir=self.temp_root)
        dash = _free_port()
        self.dashboard = f"http://127.0.0.1:{dash}"
        env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
        env |= {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token}
        env.pop("RAY_ADDRESS", None)
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
            f"--temp-dir={self.temp_dir}",
            "--disable-usage-stats",
            "--block",
        ]
        log = (self.home / "ray.log").open("wb")
        self.proc = subprocess.Popen(
            cmd,
            env=env,
            cwd=self.home,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        _wait("the Ray dashboard", self._answers, timeout=300, every=0.5)
        # Started at normal priority (it starts in time on a busy machine), then niced: what it
        # starts later (job supervisors, the entrypoints) inherits nice 19 from its raylet.
        cpus = self.cpus or ({max(os.sched_getaffinity(0))} if self.idle else None)
        for pid in _tree(self.proc.pid):
            with contextlib.suppress(OSError):
                os.setpriority(os.PRIO_PROCESS, pid, 19)
            if self.idle:
                with contextlib.suppress(OSError):
                    os.sched_setscheduler(pid, os.SCHED_IDLE, os.sched_param(0))
            if cpus:
                with contextlib.suppress(OSError):
                    os.sched_setaffinity(pid, cpus)

    def _answers(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"ray start exited:\n{(self.home / 'ray.log').read_text()[-3000:]}")
        try:
            headers = {"Authorization": f"Bearer {self.token}"}
            r = httpx.get(f"{self.dashboard}/api/version", headers=headers, timeout=2)
            return r.status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(60)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)  # its own session: this head only
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@dataclass
class ApiServer:
    """``uvicorn service.main:app --workers N`` in a subprocess."""

    env: dict[str, str]
    workers: int
    log: Path
    port: int = field(default_factory=_free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        cmd = [
            sys.executable,
            "-m",
            "uvicorn",
            "service.main:app",
            "--host=127.0.0.1",
            f"--port={self.port}",
            f"--workers={self.workers}",
            "--no-access-log",
            "--log-level=warning",
        ]
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                cmd, env=self.env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT
            )
        _wait("the API", self._ready, timeout=120)

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"the API exited:\n{self.log.read_text()[-3000:]}")
        try:
            return httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def cpu_seconds(self) -> float:
        """CPU time of the server and its worker processes so far."""
        assert self.proc is not None
        return sum(_cpu_seconds(pid) for pid in _tree(self.proc.pid))

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def _tree(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def _cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def postgres_cpu_seconds() -> float:
    """CPU time of all PostgreSQL processes on this machine (the server is shared: others' too)."""
    total = 0.0
    for comm in Path("/proc").glob("[0-9]*/comm"):
        with contextlib.suppress(OSError):
            if comm.read_text().strip() == "postgres":
                total += _cpu_seconds(int(comm.parent.name))
    return total


def machine_busy() -> tuple[float, float]:
    """(busy, total) jiffies of all CPUs so far (from /proc/stat)."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]
    return float(sum(values) - idle), float(sum(values))
