"""MLflow tracking against real servers: embedded SQLite server, runs, artifacts, registry, report.

One SQLite-backed server (``mlflow_server``) is shared by the session; the embedded-server test
starts its own under a temp FGD_HOME, and the PostgreSQL test its own against localhost:5432.
Each test uses its own experiment name.
"""

from __future__ import annotations

import errno
import json
import math
import os
import socket
import subprocess
import sys
import time
import urllib.parse
import uuid
from pathlib import Path

import pytest

from workers import artifact_store, report
from workers.artifact_store import MARKER, STAGING_PREFIX, LocalArtifactStore
from workers.settings import env_var_names, layout
from workers.tracking import (
    FORMAT_TAG,
    PARENT_TAG,
    TRIAL_KEY_TAG,
    create_parent_run,
    download_run_artifact,
    finish_run,
    flatten_params,
    get_or_create_experiment,
    list_trial_runs,
    log_artifact_file,
    log_dict_as_table,
    log_json_artifact,
    log_metrics,
    make_client,
    open_trial_run,
    register_model_version,
)
from workers.tracking_server import (
    ServerHandle,
    TrackingServerError,
    check_tracking_server,
    embedded_server,
    local_artifact_store,
    start_server,
    stop_embedded_server,
    tracking_uri,
)

ROOT = Path(__file__).resolve().parents[1]
PG_URL = os.environ.get(
    "FGD_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
FGD_PARAMS = ("alpha", "beta", "gamma", "lambda", "temp")


def _healthy(uri: str) -> bool:
    return ServerHandle(uri, 0, "", 0, "", "", Path()).healthy(timeout=2)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory) -> ServerHandle:
    root = tmp_path_factory.mktemp("mlflow")
    handle = start_server(
        f"sqlite:///{root / 'mlflow.db'}", root / "artifacts", log_path=root / "server.log"
    )
    yield handle
    handle.stop()


@pytest.fixture
def client(mlflow_server):
    return make_client(mlflow_server.uri)


@pytest.fixture
def experiment_id(client, request) -> str:
    return get_or_create_experiment(client, f"{request.node.name}-{uuid.uuid4().hex[:8]}")


# --- settings --------------------------------------------------------------------------------


def test_settings_layout_and_env_names(tmp_path, monkeypatch):
    monkeypatch.setenv("FGD_HOME", str(tmp_path / "home"))
    lay = layout()
    assert lay.home == tmp_path / "home"
    assert lay.mlflow_db == tmp_path / "home" / "mlflow" / "mlflow.db"
    assert lay.mlflow_backend_store_uri == f"sqlite:///{tmp_path}/home/mlflow/mlflow.db"
    assert {"FGD_HOME", "MLFLOW_TRACKING_URI", "FGD_TUNE_STORAGE", "FGD_MLFLOW_PORT"} <= (
        env_var_names()
    )


def test_imports_stay_light():
    code = (
        "import sys, workers.tracking, workers.tracking_server, workers.report; "
        "print([m for m in ('torch', 'mlflow', 'matplotlib', 'ray') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.stdout.strip() == "[]", out.stderr


def test_flatten_params_dotted_and_lambda():
    flat = flatten_params({"fgd": {"alpha": 2e-5, "lambda_": 5e-6}, "sizes": [1, 2], "x": None})
    assert flat == {"fgd.alpha": "2e-05", "fgd.lambda": "5e-06", "sizes": "[1, 2]", "x": "None"}


# --- embedded server ---------------------------------------------------------------------------


@pytest.mark.slow
def test_embedded_server_started_once_reused_and_stopped(tmp_path, monkeypatch):
    home = tmp_path / "fgd"
    monkeypatch.setenv("FGD_HOME", str(home))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    monkeypatch.setenv("FGD_MLFLOW_PORT", str(busy.getsockname()[1]))  # the default is taken
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    code = (
        "import json; from workers.tracking_server import tracking_uri, embedded_server; "
        "u = tracking_uri(); print(json.dumps([u, embedded_server().pid]))"
    )
    try:
        # Two CLI-like processes at once: one server, and it outlives both.
        starters = [
            subprocess.Popen(
                [sys.executable, "-c", code], env=env, cwd=ROOT, stdout=subprocess.PIPE
            )
            for _ in range(2)
        ]
        outs = [json.loads(p.communicate(timeout=120)[0]) for p in starters]
        assert all(p.returncode == 0 for p in starters)
        assert outs[0] == outs[1]
        uri, pid = outs[0]
        assert uri.startswith("http://127.0.0.1:")
        assert int(uri.rsplit(":", 1)[1]) != busy.getsockname()[1]
        assert _healthy(uri)

        record = json.loads(layout().server_json.read_text())
        assert record["pid"] == pid and record["uri"] == uri
        assert record["backend_store_uri"] == f"sqlite:///{home}/mlflow/mlflow.db"
        assert layout().mlflow_db.exists()
        print(f"embedded mlflow server start: {record['start_seconds']}s")

        assert tracking_uri() == uri  # reused in this process: same port ...
        assert embedded_server().pid == pid  # ... same pid
        # Its artifact directory is marked: trials on this machine may write into it.
        store = local_artifact_store(uri)
        assert store is not None and store.reachable()
        assert Path(store.root) == home / "mlflow" / "artifacts"
        assert local_artifact_store("http://127.0.0.1:9") is None  # a server not ours

        monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
        assert tracking_uri() == "http://mlflow.example:5000"
        assert json.loads(layout().server_json.read_text())["pid"] == pid  # nothing started
        monkeypatch.delenv("MLFLOW_TRACKING_URI")
    finally:
        busy.close()
        stopped = stop_embedded_server()
    assert stopped
    assert not _healthy(uri)
    assert not layout().server_json.exists()
    assert embedded_server() is None
    assert stop_embedded_server() is False


@pytest.mark.slow
def test_check_tracking_server(mlflow_server):
    check_tracking_server(mlflow_server.uri)
    with pytest.raises(TrackingServerError, match="not reachable"):
        check_tracking_server("http://127.0.0.1:1", timeout=2)


@pytest.mark.slow
def test_start_server_failure_quotes_the_log(tmp_path):
    with pytest.raises(TrackingServerError, match="tail of"):
        start_server(
            "notascheme://nowhere", tmp_path / "a", log_path=tmp_path / "s.log", timeout=60
        )


# --- runs ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_parent_and_trial_runs_are_nested_and_never_duplicated(client, experiment_id):
    np = pytest.importorskip("numpy")
    parent = create_parent_run(
        client,
        experiment_id,
        name="sweep",
        params={"fgd": {"alpha": 2e-5, "lambda_": 5e-6}, "lr": 0.01},
        tags={"fgd.job_id": "job-1"},
    )
    pr = client.get_run(parent)
    assert pr.data.params == {"fgd.alpha": "2e-05", "fgd.lambda": "5e-06", "lr": "0.01"}
    assert pr.data.tags["fgd.job_id"] == "job-1"

    t0 = open_trial_run(
        client, experiment_id, parent, "t_00000", name="t0", params={"alpha": 1e-5, "temp": 0.5}
    )
    t1 = open_trial_run(
        client, experiment_id, parent, "t_00001", name="t1", params={"alpha": 1e-4, "temp": 1.0}
    )
    skipped = log_metrics(
        client,
        t0,
        {"map": 0.3, "loss": float("nan"), "inf": math.inf, "done": False, "id": "x"}
        | {"np": np.float32(0.5)},
        step=1,
    )
    assert sorted(skipped) == ["done", "id", "inf", "loss"]
    log_metrics(client, t0, {"map": 0.4}, step=2)
    finish_run(client, t0, "FAILED")

    runs = client.search_runs([experiment_id], f"tags.`{PARENT_TAG}` = '{parent}'")
    assert {r.info.run_id for r in runs} == {t0, t1}
    r0 = client.get_run(t0)
    assert r0.data.params == {"alpha": "1e-05", "temp": "0.5"}
    assert r0.data.tags[TRIAL_KEY_TAG] == "t_00000"
    assert r0.data.metrics == {"map": 0.4, "np": 0.5}
    assert [m.step for m in client.get_metric_history(t0, "map")] == [1, 2]
    assert r0.info.status == "FAILED"

    # Ray retries t0 without a checkpoint: same run, RUNNING again, new params added only.
    again = open_trial_run(
        client,
        experiment_id,
        parent,
        "t_00000",
        name="t0",
        params={"alpha": 1e-5, "temp": 0.7, "seed": 3},  # temp changed: kept as first logged
    )
    assert again == t0
    r0 = client.get_run(t0)
    assert r0.info.status == "RUNNING"
    assert r0.data.params == {"alpha": "1e-05", "temp": "0.5", "seed": "3"}
    # Restored from a checkpoint that stored the run id.
    assert (
        open_trial_run(client, experiment_id, parent, "t_00001", name="t1", params={}, run_id=t1)
        == t1
    )
    # A stale run id (deleted run) falls back to the trial key.
    client.delete_run(t1)
    t1b = open_trial_run(client, experiment_id, parent, "t_00001", name="t1", params={}, run_id=t1)
    assert t1b != t1
    assert [r.info.run_id for r in list_trial_runs(client, experiment_id, parent)] == [t0, t1b]


# --- artifacts and registry ------------------------------------------------------------------


def test_artifact_store_paths_and_marker(tmp_path):
    store = LocalArtifactStore.mark(tmp_path / "store")
    assert (tmp_path / "store" / MARKER).read_text().strip() == store.token
    assert LocalArtifactStore.mark(tmp_path / "store") == store  # a store keeps its token
    assert LocalArtifactStore.from_dict(store.to_dict()) == store
    assert LocalArtifactStore.from_dict(None) is None
    assert LocalArtifactStore.read(tmp_path) is None  # not marked
    assert store.reachable()
    assert not LocalArtifactStore(store.root, "another").reachable()
    assert not LocalArtifactStore(str(tmp_path / "nowhere"), store.token).reachable()

    run = "mlflow-artifacts:/3/abc/artifacts"
    assert store.path_of(run, "checkpoint", "state.pt") == (
        tmp_path / "store" / "3" / "abc" / "artifacts" / "checkpoint" / "state.pt"
    )
    assert store.path_of(run, None, "a.json") == tmp_path / "store/3/abc/artifacts/a.json"
    assert store.path_of("mlflow-artifacts://other:5000/3/abc/artifacts", "m", "x") is None
    assert store.path_of("s3://bucket/3/abc/artifacts", "m", "x") is None
    assert store.path_of(run, "../../..", "x") is None


@pytest.mark.slow
def test_artifacts_written_into_the_local_store_are_served(
    mlflow_server, client, experiment_id, tmp_path, monkeypatch
):
    """A trial on the server's machine writes its files into the server's artifact directory;
    the server lists and serves them as its own uploads. A store this process does not reach
    falls back to an upload."""
    store = local_artifact_store(mlflow_server.uri)
    assert store is not None and store == mlflow_server.artifact_store()
    assert Path(store.root) == Path(mlflow_server.artifacts_destination)
    run = create_parent_run(client, experiment_id, name="trial", params={})
    weights = tmp_path / "state.pt"
    weights.write_bytes(os.urandom(3 * 2**20))

    uploads: list[str] = []
    upload = client.log_artifact
    monkeypatch.setattr(
        client, "log_artifact", lambda *a, **k: uploads.append(a) or upload(*a, **k)
    )
    log_artifact_file(client, run, weights, "checkpoint", store=store)
    assert uploads == []  # written, not uploaded
    uri = client.get_run(run).info.artifact_uri
    direct = store.path_of(uri, "checkpoint", "state.pt")
    assert direct is not None and direct.read_bytes() == weights.read_bytes()
    assert not [p for p in direct.parent.iterdir() if p.name.startswith(STAGING_PREFIX)]
    listed = {f.path: f.file_size for f in client.list_artifacts(run, "checkpoint")}
    assert listed == {"checkpoint/state.pt": 3 * 2**20}
    fetched = download_run_artifact(
        f"runs:/{run}/checkpoint/state.pt", client=client, dst_path=tmp_path / "dl"
    )
    assert fetched.read_bytes() == weights.read_bytes()
    # No copy: the store holds the file's data through a hard link, with MLflow's file mode.
    assert direct.stat().st_ino == weights.stat().st_ino
    assert direct.stat().st_mode & 0o777 == 0o666 & ~artifact_store._umask()

    # A JSON artifact goes the same way; with the run's artifact URI given, nothing is looked up.
    lookups: list[str] = []
    get_run = client.get_run
    monkeypatch.setattr(client, "get_run", lambda r: lookups.append(r) or get_run(r))
    log_json_artifact(client, run, {"AP": 0.5}, "coco/m.json", store=store, artifact_uri=uri)
    assert uploads == [] and lookups == []
    assert json.loads(download_run_artifact(f"runs:/{run}/coco/m.json", client=client).read_text())

    # A filesystem without hard links (or another one than the source's): a copy.
    def no_link(*args: object) -> None:
        raise OSError(errno.EXDEV, "cross-device link")

    monkeypatch.setattr(os, "link", no_link)
    log_artifact_file(client, run, weights, "copied", store=store, artifact_uri=uri)
    copied = store.path_of(uri, "copied", "state.pt")
    assert copied is not None and copied.read_bytes() == weights.read_bytes()
    assert copied.stat().st_ino != weights.stat().st_ino
    assert uploads == [] and lookups == []

    # Another machine's store of the same path (another token), and a path not there: upload.
    elsewhere = LocalArtifactStore(str(tmp_path / "elsewhere"), store.token)
    for i, other in enumerate([LocalArtifactStore(store.root, "another"), elsewhere]):
        log_artifact_file(client, run, weights, f"model{i}", store=other)
        assert {f.path for f in client.list_artifacts(run, f"model{i}")} == {f"model{i}/state.pt"}
    assert len(uploads) == 2
    assert not (tmp_path / "elsewhere").exists()


@pytest.mark.slow
def test_artifacts_over_http_and_model_registry(client, experiment_id, tmp_path):
    run = create_parent_run(client, experiment_id, name="teacher", params={})
    assert client.get_run(run).info.artifact_uri.startswith("mlflow-artifacts:/")  # proxied

    note = tmp_path / "note.txt"
    note.write_text("hello")
    log_artifact_file(client, run, note, "notes")
    log_json_artifact(client, run, {"alpha": 2e-5}, "spec/job.json")
    log_dict_as_table(client, run, [{"a": 1, "b": 2}, {"a": 3}], "tables/t.csv")
    log_dict_as_table(client, run, [{"a": 1, "b": 2}, {"a": 3}], "tables/t.json")
    dl = tmp_path / "dl"
    assert (
        download_run_artifact(f"runs:/{run}/notes/note.txt", client=client, dst_path=dl).read_text()
        == "hello"
    )
    assert json.loads(
        download_run_artifact(f"runs:/{run}/spec/job.json", client=client).read_text()
    ) == {"alpha": 2e-5}
    assert (
        download_run_artifact(f"runs:/{run}/tables/t.csv", client=client).read_text()
        == "a,b\n1,2\n3,\n"
    )
    table = json.loads(
        download_run_artifact(f"runs:/{run}/tables/t.json", client=client).read_text()
    )
    assert table == {"columns": ["a", "b"], "data": [[1, 2], [3, None]]}

    weights = tmp_path / "teacher"
    weights.mkdir()
    (weights / "model.pt").write_bytes(b"\x80\x02fake state dict")
    (weights / "detector.json").write_text('{"arch": "retinanet"}')
    log_artifact_file(client, run, weights, "teacher")
    name = f"fgd-teacher-{uuid.uuid4().hex[:8]}"
    version = register_model_version(
        client, name=name, run_id=run, artifact_path="teacher", description="tiny teacher"
    )
    assert version == "1"
    mv = client.get_model_version(name, version)
    assert mv.run_id == run and mv.tags[FORMAT_TAG] == "state_dict"
    assert mv.description == "tiny teacher"

    local = download_run_artifact(f"models:/{name}/1", client=client, dst_path=tmp_path / "m1")
    assert (local / "model.pt").read_bytes() == b"\x80\x02fake state dict"
    one = download_run_artifact(f"models:/{name}/latest/detector.json", client=client)
    assert json.loads(one.read_text()) == {"arch": "retinanet"}
    client.set_registered_model_alias(name, "champion", version)
    assert (download_run_artifact(f"models:/{name}@champion", client=client) / "model.pt").exists()

    assert register_model_version(client, name=name, run_id=run, artifact_path="teacher") == "2"
    with pytest.raises(FileNotFoundError):
        register_model_version(client, name=name, run_id=run, artifact_path="nope")


# --- report ----------------------------------------------------------------------------------

ROWS = [
    {
        "trial": "t0",
        "alpha": 1e-5,
        "beta": 1e-6,
        "gamma": 1e-3,
        "lambda_": 5e-6,
        "temp": 0.5,
        "map": 0.30,
    },
    {
        "trial": "t1",
        "alpha": 1e-4,
        "beta": 5e-7,
        "gamma": 2e-3,
        "lambda_": 1e-6,
        "temp": 1.0,
        "map": 0.42,
    },
    {
        "trial": "t2",
        "alpha": 1e-3,
        "beta": 1e-5,
        "gamma": 5e-4,
        "lambda_": 5e-5,
        "temp": 0.8,
        "map": float("nan"),
    },
    {
        "trial": "t3",
        "alpha": 3e-5,
        "beta": 2e-6,
        "gamma": 1e-3,
        "lambda_": 1e-5,
        "temp": 0.5,
        "map": 0.35,
    },
    {
        "trial": "t4",
        "alpha": 5e-4,
        "beta": 1e-6,
        "gamma": 3e-3,
        "lambda_": 2e-6,
        "temp": 0.6,
        "map": 0.42,
    },
]


def test_leaderboard_order_max_min_ties_and_failures():
    best_first = report.leaderboard(ROWS, "map", "max")
    assert [r["trial"] for r in best_first] == ["t1", "t4", "t3", "t0", "t2"]
    assert [r["rank"] for r in best_first] == [1, 1, 3, 4, None]
    assert "lambda" in best_first[0] and "lambda_" not in best_first[0]
    low_first = report.leaderboard(ROWS, "map", "min")
    assert [r["trial"] for r in low_first] == ["t0", "t3", "t1", "t4", "t2"]
    with pytest.raises(ValueError):
        report.leaderboard(ROWS, "map", "best")


def test_write_leaderboard_and_plots(tmp_path):
    from PIL import Image

    board = report.leaderboard(ROWS, "map", "max")
    paths = report.write_leaderboard(board, tmp_path)
    assert paths["csv"].read_text().splitlines()[0].startswith("rank,trial,alpha")
    assert paths["md"].read_text().splitlines()[2].startswith("| 1 | t1 | 0.0001 |")
    assert json.loads(paths["json"].read_text())[-1]["map"] is None  # NaN → null

    assert report.stopped_early(ROWS) == [False] * len(ROWS)  # no steps: nothing to tell
    staged = [{**r, "step": 600 if i else 150} for i, r in enumerate(ROWS)]
    assert report.stopped_early(staged) == [True] + [False] * (len(ROWS) - 1)
    report.plot_metric_vs_params(staged, FGD_PARAMS, "map", tmp_path / "p" / "staged.png")
    a = report.plot_metric_vs_params(ROWS, FGD_PARAMS, "map", tmp_path / "p" / "mvp.png")
    b = report.plot_parallel_coordinates(ROWS, FGD_PARAMS, "map", tmp_path / "p" / "pc.png")
    for png in (a, b):
        with Image.open(png) as im:
            assert im.size[0] >= 600 and im.size[1] >= 400
            assert len(im.convert("RGB").getcolors(maxcolors=1 << 16) or range(1 << 16)) > 50
        assert png.stat().st_size > 20_000


@pytest.mark.slow
def test_log_sweep_summary_on_parent_run(client, experiment_id):
    parent = create_parent_run(client, experiment_id, name="sweep", params={"metric": "map"})
    board = report.log_sweep_summary(
        client, parent, ROWS, metric="map", mode="max", params=list(FGD_PARAMS)
    )
    assert board[0]["trial"] == "t1"
    top = {f.path for f in client.list_artifacts(parent)}
    assert {"leaderboard.csv", "leaderboard.md", "leaderboard.json", "plots"} <= top
    plots = {f.path: f.file_size for f in client.list_artifacts(parent, "plots")}
    assert plots["plots/metric_vs_params.png"] > 20_000
    assert plots["plots/parallel_coordinates.png"] > 20_000
    run = client.get_run(parent)
    assert run.data.tags["best.alpha"] == "0.0001" and run.data.tags["best.lambda"] == "1e-06"
    assert run.data.tags["best.trial"] == "t1"
    assert run.data.metrics["best_map"] == pytest.approx(0.42)


# --- PostgreSQL backend ----------------------------------------------------------------------


@pytest.mark.slow
def test_postgres_backend(tmp_path):
    import psycopg

    url = urllib.parse.urlsplit(PG_URL)
    conninfo = PG_URL.replace("postgresql+psycopg://", "postgresql://", 1)
    try:
        admin = psycopg.connect(conninfo, connect_timeout=3, autocommit=True)
    except psycopg.OperationalError as e:
        pytest.skip(f"PostgreSQL not reachable at {url.hostname}:{url.port}: {e}")
    schema = f"mlflow_test_{uuid.uuid4().hex[:10]}"  # own schema: MLflow's alembic_version table
    admin.execute(f'CREATE SCHEMA "{schema}"')
    backend = f"{PG_URL}?options=-csearch_path%3D{schema}"
    handle = None
    try:
        t0 = time.monotonic()
        handle = start_server(backend, tmp_path / "artifacts", log_path=tmp_path / "pg.log")
        print(f"mlflow server on PostgreSQL (fresh schema) start: {time.monotonic() - t0:.1f}s")
        client = make_client(handle.uri)
        exp = get_or_create_experiment(client, f"pg-{uuid.uuid4().hex[:8]}")
        run = create_parent_run(client, exp, name="pg", params={"alpha": 2e-5})
        log_metrics(client, run, {"map": 0.25}, step=3)
        finish_run(client, run)
        got = client.get_run(run)
        assert got.data.metrics == {"map": 0.25} and got.data.params == {"alpha": "2e-05"}
        assert got.info.status == "FINISHED"
        tables = admin.execute(
            "select count(*) from information_schema.tables where table_schema = %s", (schema,)
        ).fetchone()[0]
        assert tables > 10  # MLflow's tables went to the test schema, not public
    finally:
        if handle is not None:
            handle.stop()
        admin.execute(f'DROP SCHEMA "{schema}" CASCADE')
        admin.close()
