"""Shared fixtures of the service tests (imported by the other ``test_service_*`` modules).

``store`` runs each test on SQLite and on PostgreSQL (a fresh schema for the session, dropped
at the end; skipped with the reason when the server is unreachable).
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import delete

from service.auth import create_token
from service.core.config import Settings
from service.db import Store
from service.dispatch import InProcessDispatcher
from service.main import create_app
from service.models import Job, JobLog, Token
from service.results import ResultsReader

PG_SERVER = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
_STORES: dict[str, Store] = {}


def _pg_store() -> Store:
    import psycopg

    try:
        with psycopg.connect(
            "host=127.0.0.1 port=5432 user=postgres dbname=test", connect_timeout=3
        ):
            pass
    except psycopg.OperationalError as exc:
        pytest.skip(f"PostgreSQL at 127.0.0.1:5432 is not reachable: {exc}")
    schema = f"svc_test_{uuid.uuid4().hex[:12]}"
    admin = Store.from_url(PG_SERVER)
    with admin.engine.begin() as conn:
        conn.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
    admin.dispose()
    store = Store.from_url(f"{PG_SERVER}?options=-csearch_path%3D{schema}")
    store.schema = schema  # type: ignore[attr-defined]
    return store


def _drop_pg(store: Store) -> None:
    store.dispose()
    admin = Store.from_url(PG_SERVER)
    with admin.engine.begin() as conn:
        conn.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{store.schema}" CASCADE')  # type: ignore[attr-defined]
    admin.dispose()


@pytest.fixture(scope="session", params=["sqlite", "postgresql"])
def migrated_store(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Store:
    """One migrated store per backend for the whole session."""
    backend = request.param
    if backend not in _STORES:
        if backend == "sqlite":
            path = tmp_path_factory.mktemp("service") / "jobs.db"
            store = Store.from_url(f"sqlite:///{path}")
        else:
            store = _pg_store()
            request.session.config.add_cleanup(lambda: _drop_pg(store))
        store.migrate()
        _STORES[backend] = store
    return _STORES[backend]


@pytest.fixture
def store(migrated_store: Store) -> Iterator[Store]:
    """The backend's store, emptied after the test."""
    yield migrated_store
    with migrated_store.engine.begin() as conn:
        for table in (JobLog, Job, Token):
            conn.execute(delete(table))


@pytest.fixture
def data_root(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    root.mkdir()
    return root


class FakeResults(ResultsReader):
    """A ResultsReader over a fake MLflow client holding ``runs``."""

    def __init__(self, runs: list[Any] | None = None) -> None:
        self.runs = runs if runs is not None else []
        super().__init__(tracking_uri="http://mlflow.test:5000", client_factory=self._client)

    def _client(self, uri: str) -> Any:
        return FakeClient(self.runs)


def fake_run(parent: str, run_id: str, ap: float | None, status: str = "FINISHED") -> Any:
    """A stand-in for an MLflow ``Run``: one trial under ``parent``."""
    metrics = {"loss": 1.0} if ap is None else {"bbox_AP": ap, "loss": 1.0}
    return SimpleNamespace(
        info=SimpleNamespace(
            run_id=run_id,
            run_name=f"trial-{run_id}",
            status=status,
            start_time=1_700_000_000_000,
            end_time=None,
        ),
        data=SimpleNamespace(
            tags={"mlflow.parentRunId": parent, "fgd.trial_key": f"k-{run_id}"},
            params={"alpha": "1e-4"},
            metrics=metrics,
        ),
    )


class _Page(list):  # type: ignore[type-arg]
    token = None


class FakeClient:
    def __init__(self, runs: list[Any]) -> None:
        self.runs = runs

    def search_runs(self, experiment_ids: list[str], filter_string: str = "", **_: Any) -> _Page:
        parent = filter_string.split("= '")[1].rstrip("'")
        return _Page(r for r in self.runs if r.data.tags.get("mlflow.parentRunId") == parent)

    def list_artifacts(self, run_id: str, path: str | None = None) -> list[Any]:
        return []  # no run here has artifacts (no distillation report)


def settings_for(store_url: str, data_root: Path, **over: Any) -> Settings:
    return Settings(
        DATABASE_URL=store_url,
        DATA_ROOTS=[data_root],
        LOG_POLL_SECONDS=0.02,
        MAX_BODY_BYTES=over.pop("MAX_BODY_BYTES", 64_000),
        **over,
    )


class Api:
    """A TestClient plus the pieces behind it, and two tenants' tokens and an admin's."""

    def __init__(
        self,
        client: TestClient,
        store: Store,
        dispatcher: InProcessDispatcher,
        results: FakeResults,
        tokens: dict[str, str],
        data_root: Path,
    ) -> None:
        self.client, self.store, self.dispatcher = client, store, dispatcher
        self.results, self.tokens, self.data_root = results, tokens, data_root

    def headers(self, who: str = "alice") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[who]}"}

    def get(self, url: str, who: str = "alice", **kw: Any) -> Any:
        headers = {**self.headers(who), **kw.pop("headers", {})}
        return self.client.get(url, headers=headers, **kw)

    def post(self, url: str, who: str = "alice", **kw: Any) -> Any:
        headers = {**self.headers(who), **kw.pop("headers", {})}
        return self.client.post(url, headers=headers, **kw)

    def submit(self, who: str = "alice", **body: Any) -> Any:
        return self.post("/jobs", who, json=job_body(**body))


@pytest.fixture
def api(store: Store, data_root: Path) -> Iterator[Api]:
    dispatcher = InProcessDispatcher()
    results = FakeResults()
    settings = settings_for(str(store.engine.url), data_root)
    app = create_app(settings, store=store, dispatcher=dispatcher, results=results, migrate=False)
    tokens = {}
    with store.session() as session:
        tokens["alice"], _ = create_token(session, "alice", quota=3)
        tokens["bob"], _ = create_token(session, "bob", quota=3)
        tokens["admin"], _ = create_token(session, "root", admin=True, quota=3)
    with TestClient(app) as client:
        yield Api(client, store, dispatcher, results, tokens, data_root)


def spec(**over: Any) -> dict[str, Any]:
    """A small valid distill spec (shapes data, teacher trained first)."""
    base: dict[str, Any] = {
        "kind": "distill",
        "data": {"shapes": {"num_train": 16, "num_val": 8, "image_size": 64, "max_size": 32}},
        "model": {"backbone": "resnet18", "fpn_channels": 16, "min_size": 64, "max_size": 64},
        "teacher": {"train": True},
        "train": {"schedule": {"iterations": 10, "warmup_iters": 2}, "device": "cpu"},
    }
    base.update(over)
    return base


def job_body(**over: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"name": "tiny", "spec": spec()}
    body.update(over)
    return body


def make_owner(store: Store, name: str = "alice", quota: int = 50) -> Token:
    """A new token (the owner of jobs) in ``store``."""
    with store.session() as session:
        return create_token(session, name, quota=quota)[1]


def submit_at_once(store: Store, owner: Token, n: int) -> list[str]:
    """``n`` submissions of ``owner`` released together from ``n`` threads, each on a session of
    its own; each comes back ``"ok"`` or ``"quota"`` (``crud.QuotaExceeded``)."""
    from service import crud
    from service.schemas import JobCreate

    barrier = threading.Barrier(n)

    def create(i: int) -> str:
        job_in = JobCreate.model_validate(job_body(name=f"j{i}"))
        barrier.wait()
        with store.session() as session:
            try:
                crud.create_job(session=session, owner=owner, job_in=job_in)
                return "ok"
            except crud.QuotaExceeded:
                return "quota"

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(create, range(n)))
