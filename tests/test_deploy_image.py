"""The Dockerfile's two targets, the build context, and the pins each target installs.

No image is built here (no Docker engine): the Dockerfile is parsed by BuildKit's own parser (the
``dockerfile`` package), and the api target is checked by running the service with only its
requirements importable (the closure of the api list over the installed packages' metadata).
"""

from __future__ import annotations

import fnmatch
import importlib.metadata as md
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from deploy_support import PYPROJECT, ROOT, dockerfile_stages
from packaging.requirements import Requirement

sys.path.insert(0, str(ROOT / "deploy" / "docker"))
import requirements as image_requirements  # noqa: E402

# What the api image's processes do: import the app (with its Ray and MLflow clients), the
# `fgd token` command and the MLflow server run from the same image, and answer /readyz. Run
# with every module outside the api requirements blocked, as in the image.
API_PROCESS = """
import importlib.abc, json, os, sys

BLOCKED = set(json.loads(os.environ["BLOCKED_MODULES"]))

class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"not in the api image: {name}", name=name)
        return None

sys.meta_path.insert(0, Blocker())
import service.main, service.ray_dispatch, service.loop, service.results, service.cli_tokens
import fgd_cli.main, uvicorn, psycopg
import ray.job_submission, ray.util.state
from mlflow.tracking import MlflowClient
import mlflow.server, mlflow.store.tracking.sqlalchemy_store
from fastapi.testclient import TestClient
with TestClient(service.main.create_app()) as client:
    assert client.get("/readyz").status_code == 200
print(json.dumps(sorted(m for m in BLOCKED if m in sys.modules)))
"""


def _stage_values(target: str, cmd: str) -> list[tuple[str, ...]]:
    _, stages = dockerfile_stages()
    return [c.value for c in stages[target] if c.cmd == cmd]


@pytest.mark.parametrize("target", ["api", "ray"])
def test_each_target_runs_as_a_user_and_checks_its_health(target: str) -> None:
    users = _stage_values(target, "USER")
    assert users and users[-1][0].split(":")[0] not in ("root", "0"), users
    (health,) = _stage_values(target, "HEALTHCHECK")
    assert health[0] == "CMD", health
    assert any(p in health[-1] for p in ("/healthz", "/api/local_raylet_healthz")), health


def test_the_api_target_serves_the_app_and_the_ray_target_installs_the_project() -> None:
    (cmd,) = _stage_values("api", "CMD")
    assert cmd[:2] == ("uvicorn", "service.main:app")
    for target in ("api", "ray"):
        copies = [v for v in _stage_values(target, "COPY")]
        assert (f"/src/requirements-{target}.txt", "/tmp/requirements.txt") in copies
        runs = " ".join(v[0] for v in _stage_values(target, "RUN"))
        assert "-r /tmp/requirements.txt" in runs
        assert "pip install --no-deps /tmp/src" in runs
    # the CUDA build: a build argument picks torch's index (the default is the CPU build)
    args = [v[0] for v in _stage_values("ray", "ARG")]
    assert "TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in args


def _ignored(path: str, rules: list[str]) -> bool:
    """Whether .dockerignore excludes ``path`` (the last matching rule wins)."""
    ignored = False
    for rule in rules:
        negate = rule.startswith("!")
        pattern = rule.lstrip("!").rstrip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatch(p, pattern.replace("**/", "*")) for p in prefixes):
            ignored = not negate
    return ignored


def test_the_build_context_holds_what_the_dockerfile_copies_and_no_secret() -> None:
    rules = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    _, stages = dockerfile_stages()
    sources = [
        src
        for stage in stages.values()
        for c in stage
        if c.cmd == "COPY" and not any(f.startswith("--from") for f in c.flags)
        for src in c.value[:-1]
    ]
    assert sources
    for src in sources:
        assert (ROOT / src).exists(), src
        assert not _ignored(src, rules), f"{src} is copied but .dockerignore drops it"
    for private in (".env", ".venv/bin/python", ".git/config", "tests/conftest.py", "runs/x.pt"):
        assert _ignored(private, rules), private


def test_the_target_requirements_are_pyprojects_pins() -> None:
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    deps = project["dependencies"]
    api = image_requirements.requirements("api")
    ray = image_requirements.requirements("ray")
    assert ray == deps
    names = {image_requirements.requirement_name(d) for d in api}
    assert not names & set(image_requirements.TRAINING_ONLY)
    assert set(api) == {
        d
        for d in deps + project["optional-dependencies"]["s3"]
        if image_requirements.requirement_name(d) not in image_requirements.TRAINING_ONLY
    }
    assert all("==" in d for d in api), api
    # the script's command line, as the Dockerfile runs it
    out = subprocess.run(
        [sys.executable, str(ROOT / "deploy" / "docker" / "requirements.py"), "api"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.split() == api


def _closure(requirements: list[str]) -> set[str]:
    """The installed distributions ``requirements`` pull in (extras and markers followed)."""
    seen: set[str] = set()
    todo = [Requirement(r) for r in requirements]
    while todo:
        req = todo.pop()
        name = image_requirements.requirement_name(req.name)
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue  # not installed here (boto3: the MLflow server's S3 store)
        key = f"{name}[{','.join(sorted(req.extras))}]"
        if key in seen:
            continue
        seen.add(key)
        for line in dist.requires or []:
            sub = Requirement(line)
            envs = [{"extra": e} for e in req.extras] or [{"extra": ""}]
            if sub.marker is None or any(sub.marker.evaluate(env) for env in envs):
                todo.append(sub)
    return {k.split("[")[0] for k in seen}


# The project itself, and what any Python image has (pip; setuptools builds the project).
IN_EVERY_IMAGE = {"fgd-service", "pip", "setuptools"}


def test_the_service_runs_on_the_api_requirements_alone(tmp_path: Path) -> None:
    closure = _closure(image_requirements.requirements("api"))
    assert {"ray", "mlflow", "fastapi", "uvicorn", "psycopg", "sqlalchemy"} <= closure
    assert not {"torch", "torchvision", "pycocotools", "optuna"} & closure
    # the modules of every installed distribution outside the closure (and not ours)
    owners = md.packages_distributions()
    blocked = {
        module
        for module, dists in owners.items()
        if not {image_requirements.requirement_name(d) for d in dists} & (closure | IN_EVERY_IMAGE)
    }
    assert {"torch", "torchvision", "pycocotools", "optuna"} <= blocked
    env = {
        **os.environ,
        "FGD_HOME": str(tmp_path),
        "PYTHONPATH": str(ROOT),
        "BLOCKED_MODULES": json.dumps(sorted(blocked)),
    }
    out = subprocess.run(
        [sys.executable, "-c", API_PROCESS],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert out.returncode == 0, f"the api image would lack a module:\n{out.stderr[-3000:]}"
    assert json.loads(out.stdout.splitlines()[-1]) == []
