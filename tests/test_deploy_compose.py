"""docker-compose.yml: valid for Docker Compose, and the topology's invariants hold.

Validation is the Compose CLI's own (``config``: the compose specification's schema, then
interpolation from an env file); it needs no Docker engine. The checks below read the model it
resolves, and the file as written where what matters is the text (no literal secrets).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest
from deploy_support import (
    COMPOSE_FILE,
    ROOT,
    compose_config,
    env_example,
    fgd_env_names,
    filled_env,
    mlflow_accepts_host,
    raw_compose,
    run_compose,
    unknown_env_names,
)

# The processes of the project (the api and mlflow images, the Ray nodes) and the others.
FGD_SERVICES = ("api", "mlflow", "ray-head", "ray-worker")
RAY_NODES = ("ray-head", "ray-worker")
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY")
REQUIRED_REF = re.compile(r"\$\{(\w+):\?[^}]*\}")


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return compose_config(filled_env(), tmp_path_factory.mktemp("compose"))


def _services(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return dict(config["services"])


def _env(config: dict[str, Any], service: str) -> dict[str, str]:
    return {k: str(v) for k, v in (_services(config)[service].get("environment") or {}).items()}


def test_docker_compose_accepts_the_file_with_the_example_env_filled_in(tmp_path: Path) -> None:
    out = run_compose(["config", "--quiet"], filled_env(), tmp_path)
    assert out.returncode == 0, out.stderr
    services = run_compose(["config", "--services"], filled_env(), tmp_path).stdout.split()
    expected = {"postgres", "minio", "minio-init", "mlflow", "ray-head", "ray-worker", "api"}
    assert set(services) == expected


def test_docker_compose_refuses_a_file_off_the_specification(tmp_path: Path) -> None:
    broken = tmp_path / "docker-compose.yml"
    text = COMPOSE_FILE.read_text()
    broken.write_text(text.replace("\n  api:\n", "\n  api:\n    healthcheckk: {}\n", 1))
    assert broken.read_text() != text
    out = run_compose(["config", "--quiet"], filled_env(), tmp_path, compose_file=broken)
    assert out.returncode != 0
    assert "services.api.healthcheckk" in out.stderr, out.stderr


def test_every_secret_must_come_from_the_env_file(tmp_path: Path) -> None:
    # .env.example as shipped leaves the secrets empty: compose stops and names each one
    out = run_compose(["config", "--quiet"], env_example(), tmp_path)
    assert out.returncode != 0
    secrets_ = {k for k, v in env_example().items() if not v}
    assert secrets_ == {
        "POSTGRES_PASSWORD",
        "MINIO_ROOT_USER",
        "MINIO_ROOT_PASSWORD",
        "RAY_AUTH_TOKEN",
        "FGD_SECRET_KEY",
    }
    for name in secrets_:
        assert f"required variable {name} is missing a value" in out.stderr, name
    # every variable the file refers to is in .env.example
    lines = [ln for ln in COMPOSE_FILE.read_text().splitlines() if not ln.lstrip().startswith("#")]
    referenced = set(re.findall(r"\$\{(\w+)", "\n".join(lines)))
    assert referenced <= set(env_example()), referenced - set(env_example())


def test_no_secret_is_written_in_the_file() -> None:
    raw = raw_compose()
    text = COMPOSE_FILE.read_text()
    for name, service in raw["services"].items():
        for key, value in (service.get("environment") or {}).items():
            if SECRET_NAME.search(key):
                # nothing but a required reference to a variable of the env file
                assert REQUIRED_REF.fullmatch(str(value)), f"{name}.{key} = {value!r}"
    # credentials inside URLs too: scheme://user:${PASSWORD:?...}@host
    userinfo = re.findall(r"://(\$\{[^}]*\}|[^:/@\s]+):(\$\{[^}]*\}|[^@\s]+)@", text)
    assert len(userinfo) == 2, userinfo  # the job store's URL and MLflow's backend
    for user, password in userinfo:
        assert REQUIRED_REF.fullmatch(password), (user, password)


def test_long_running_services_have_healthchecks_and_dependencies_wait_for_them(
    config: dict[str, Any],
) -> None:
    services = _services(config)
    one_shot = {name for name, s in services.items() if s.get("restart") == "no"}
    assert one_shot == {"minio-init"}
    for name, service in services.items():
        if name not in one_shot:
            check = service.get("healthcheck") or {}
            assert check.get("test") and not check.get("disable"), f"{name} has no healthcheck"
            assert check["test"][0] in ("CMD", "CMD-SHELL"), name
        for dep, how in (service.get("depends_on") or {}).items():
            wanted = "service_completed_successfully" if dep in one_shot else "service_healthy"
            assert how["condition"] == wanted, f"{name} -> {dep}: {how['condition']}"
    # the api starts last: after its store, MLflow and the Ray head are healthy
    assert set(services["api"]["depends_on"]) == {"postgres", "mlflow", "ray-head"}
    assert set(services["ray-worker"]["depends_on"]) == {"ray-head"}


def test_state_lives_in_named_volumes(config: dict[str, Any]) -> None:
    declared = set(config.get("volumes") or {})
    used: dict[str, set[str]] = {}
    for name, service in _services(config).items():
        for mount in service.get("volumes") or []:
            if mount["type"] == "bind":  # only read-only configuration from deploy/
                assert mount.get("read_only"), f"{name}: writable bind mount {mount['source']}"
                assert Path(mount["source"]).is_relative_to(ROOT / "deploy"), mount["source"]
                assert Path(mount["source"]).is_file(), mount["source"]
                continue
            assert mount["type"] == "volume" and mount["source"] in declared, (name, mount)
            used.setdefault(mount["source"], set()).add(f"{name}:{mount['target']}")
    assert used["pg-data"] == {"postgres:/var/lib/postgresql/data"}
    assert used["minio-data"] == {"minio:/data"}
    assert declared == set(used), declared ^ set(used)


def test_the_datasets_are_at_one_path_on_every_node_and_the_api(config: dict[str, Any]) -> None:
    services = _services(config)
    targets = {
        name: {m["target"] for m in services[name]["volumes"] if m["source"] == "fgd-data"}
        for name in (*RAY_NODES, "api")
    }
    assert all(t == {"/fgd/data"} for t in targets.values()), targets
    assert _env(config, "api")["FGD_DATA_ROOTS"] == "/fgd/data"
    for node in RAY_NODES:  # where the workers generate and read datasets: $FGD_HOME/data
        assert _env(config, node)["FGD_HOME"] + "/data" == "/fgd/data"


def test_ray_workers_scale(config: dict[str, Any]) -> None:
    worker = _services(config)["ray-worker"]
    for fixed in ("container_name", "hostname", "ports", "mac_address"):
        assert fixed not in worker, f"ray-worker sets {fixed}: it could not be scaled"
    assert "--address=ray-head:6379" in worker["command"]
    assert "--port=6379" in _services(config)["ray-head"]["command"]


def test_environment_names_are_the_ones_the_code_reads(config: dict[str, Any]) -> None:
    for name in FGD_SERVICES:
        unknown = unknown_env_names(set(_env(config, name)))
        assert not unknown, f"{name}: nothing reads {sorted(unknown)}"
        assert {n for n in _env(config, name) if n.startswith("FGD_")} <= fgd_env_names()
    # the images' own variables, or ones their commands or init scripts use
    image_env = {
        "postgres": {"POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB"},
        "minio": {"MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD"},
        "minio-init": set(),
    }
    init = (ROOT / "deploy" / "compose" / "postgres-init.sh").read_text()
    for name, own in image_env.items():
        used = init + " ".join(_services(config)[name].get("command") or [])
        for var in set(_env(config, name)) - own:
            assert f"${var}" in used or f"${{{var}}}" in used, f"{name}: {var} is not used"


def test_the_processes_agree_on_the_shared_settings(config: dict[str, Any]) -> None:
    shared = ("FGD_HOME", "FGD_TUNE_STORAGE", "MLFLOW_TRACKING_URI", "RAY_AUTH_MODE")
    for var in (*shared, "RAY_AUTH_TOKEN"):
        values = {_env(config, s)[var] for s in (*RAY_NODES, "api")}
        assert len(values) == 1, (var, values)
    api = _env(config, "api")
    assert api["RAY_AUTH_MODE"] == "token"
    assert api["RAY_ADDRESS"] == "http://ray-head:8265"
    assert "--dashboard-port=8265" in _services(config)["ray-head"]["command"]


def test_the_settings_classes_accept_the_values(
    config: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    from service.core.config import Settings
    from workers.settings import FgdSettings, MlflowSettings, tune_storage

    for name in (*RAY_NODES, "api"):
        for var in list(os.environ):
            if var.startswith(("FGD_", "MLFLOW_", "RAY_")):
                monkeypatch.delenv(var)
        for var, value in _env(config, name).items():
            monkeypatch.setenv(var, value)
        assert FgdSettings().home == Path("/fgd")
        assert tune_storage() == "s3://fgd/tune"
        assert MlflowSettings().tracking_uri == "http://mlflow:5000"
        if name == "api":
            settings = Settings()  # production: refuses the placeholder secret, needs RAY_ADDRESS
            assert settings.ENVIRONMENT == "production" and settings.dispatch_to_ray
            assert not settings.is_sqlite
            assert [Path("/fgd/data")] == settings.DATA_ROOTS


def test_tune_storage_and_artifacts_are_on_s3(config: dict[str, Any]) -> None:
    for node in RAY_NODES:  # pyarrow on each node reads these for s3:// Tune storage
        env = _env(config, node)
        assert env["FGD_TUNE_STORAGE"].startswith("s3://")
        assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(env)
        assert env["AWS_ENDPOINT_URL"] == "http://minio:9000"
    mlflow = _services(config)["mlflow"]
    flags = dict(a.partition("=")[::2] for a in mlflow["command"] if a.startswith("--"))
    assert "--serve-artifacts" in flags
    assert flags["--artifacts-destination"].startswith("s3://")
    assert _env(config, "mlflow")["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert _env(config, "mlflow")["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql+psycopg://")
    # MLflow 3 checks the Host header: the name the other services use must be allowed
    uri = _env(config, "api")["MLFLOW_TRACKING_URI"]
    assert mlflow_accepts_host(flags["--allowed-hosts"], uri)
    assert not mlflow_accepts_host(flags["--allowed-hosts"], "http://evil.example:5000")
    # the job store and MLflow share the server, not the database
    api_db = _env(config, "api")["FGD_DATABASE_URL"].rsplit("/", 1)[1]
    mlflow_db = _env(config, "mlflow")["MLFLOW_BACKEND_STORE_URI"].rsplit("/", 1)[1]
    assert api_db != mlflow_db
    assert _env(config, "postgres")["MLFLOW_DB"] == mlflow_db
