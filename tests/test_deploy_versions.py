"""One version everywhere: Ray, Python and the image tags agree across pyproject.toml, the
Dockerfile, docker-compose.yml and deploy/k8s."""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterator
from string import Template
from typing import Any

import pytest
from deploy_support import (
    COMPOSE_FILE,
    K8S,
    PYPROJECT,
    ROOT,
    dockerfile_stages,
    k8s_documents,
    raw_compose,
)

OUR_IMAGES = {"fgd-service-api": "api", "fgd-service-ray": "ray", "fgd-service-ray-gpu": "ray"}
DEPLOY_FILES = [ROOT / "Dockerfile", COMPOSE_FILE, *sorted(K8S.glob("*.yaml"))]


def _project() -> dict[str, Any]:
    return dict(tomllib.loads(PYPROJECT.read_text()))


def _pin(name: str) -> str:
    for dep in _project()["project"]["dependencies"]:
        match = re.fullmatch(rf"{re.escape(name)}(\[[^\]]*\])?==([\w.]+)", dep)
        if match:
            return match.group(2)
    raise AssertionError(f"pyproject.toml pins no {name}")


@pytest.fixture(scope="module")
def versions() -> dict[str, str]:
    """Ray, Python (major.minor), its tag (py311) and the project's version, from pyproject."""
    project = _project()
    spec = project["project"]["requires-python"]  # ">=3.11,<3.12": exactly one minor
    lower = re.search(r">=\s*(\d+)\.(\d+)", spec)
    upper = re.search(r"<\s*(\d+)\.(\d+)", spec)
    assert lower and upper and (int(upper[1]), int(upper[2])) == (int(lower[1]), int(lower[2]) + 1)
    python = f"{lower[1]}.{lower[2]}"
    assert project["tool"]["ruff"]["target-version"] == f"py{lower[1]}{lower[2]}"
    assert project["tool"]["mypy"]["python_version"] == python
    return {
        "ray": _pin("ray"),
        "python": python,
        "py": f"py{lower[1]}{lower[2]}",
        "project": project["project"]["version"],
    }


def _image_refs() -> Iterator[tuple[str, str]]:
    """(where, image) for every image the compose file and the manifests name."""
    for name, service in raw_compose()["services"].items():
        yield f"docker-compose.yml:{name}", service["image"]

    def walk(node: Any, where: str) -> Iterator[tuple[str, str]]:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "image" and isinstance(value, str):
                    yield where, value
                else:
                    yield from walk(value, where)
        elif isinstance(node, list):
            for item in node:
                yield from walk(item, where)

    for path in sorted(K8S.glob("*.yaml")):
        if path.name != "kustomization.yaml":
            for doc in k8s_documents(path):
                yield from walk(doc, f"{path.name}:{doc['kind']}/{doc['metadata']['name']}")


def test_the_dockerfile_builds_the_pinned_versions(versions: dict[str, str]) -> None:
    args, stages = dockerfile_stages()
    assert args["PYTHON_VERSION"] == versions["python"]
    assert args["RAY_VERSION"] == versions["ray"]
    assert args["RAY_PY"] == versions["py"]
    assert args["FGD_VERSION"] == versions["project"]
    bases = {name: Template(stage[0].value[0]).substitute(args) for name, stage in stages.items()}
    assert bases["api"].startswith(f"python:{versions['python']}-")
    assert bases["ray"].startswith(f"rayproject/ray:{versions['ray']}-{versions['py']}-")
    # pip as the Makefile pins it
    makefile = (ROOT / "Makefile").read_text()
    assert f"pip=={args['PIP_VERSION']}" in makefile
    assert f"PYTHON ?= python{versions['python']}" in makefile


def test_every_image_of_ours_has_the_project_version_and_every_ray_image_its_pin(
    versions: dict[str, str],
) -> None:
    refs = list(_image_refs())
    assert refs
    ours = 0
    for where, image in refs:
        name, _, tag = image.rpartition(":")
        if name in OUR_IMAGES:
            assert tag == versions["project"], f"{where}: {image}"
            ours += 1
        elif name.endswith("rayproject/ray"):
            assert tag.startswith(f"{versions['ray']}-{versions['py']}"), f"{where}: {image}"
        else:  # third-party images are pinned to a version, never latest
            assert tag and tag != "latest", f"{where}: {image}"
    assert ours >= 8


def test_compose_builds_each_image_from_its_target(versions: dict[str, str]) -> None:
    _, stages = dockerfile_stages()
    for name, service in raw_compose()["services"].items():
        image = service["image"].rpartition(":")[0]
        if image in OUR_IMAGES:
            assert service["build"]["target"] == OUR_IMAGES[image], name
            assert service["build"]["target"] in stages, name


def test_the_manifests_name_the_pinned_ray_and_image_versions(versions: dict[str, str]) -> None:
    import yaml

    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert {i["name"]: i["newTag"] for i in kustomization["images"]} == dict.fromkeys(
        OUR_IMAGES, versions["project"]
    )
    specs = [d["spec"] for d in k8s_documents(K8S / "raycluster.yaml") if d["kind"] == "RayCluster"]
    specs += [
        d["spec"]["rayClusterSpec"]
        for d in k8s_documents(K8S / "rayjob-example.yaml")
        if d["kind"] == "RayJob"
    ]
    assert len(specs) == 2
    assert {s["rayVersion"] for s in specs} == {versions["ray"]}


def test_no_deployment_file_names_another_version(versions: dict[str, str]) -> None:
    # a Ray version, a py3XX tag or a Python version in a deployment file is the pinned one
    for path in DEPLOY_FILES:
        text = path.read_text()
        for found in re.findall(r"rayproject/ray:(\d+\.\d+\.\d+)", text):
            assert found == versions["ray"], f"{path.name}: rayproject/ray:{found}"
        for found in re.findall(r"rayVersion:\s*['\"]?([\d.]+)", text):
            assert found == versions["ray"], f"{path.name}: rayVersion {found}"
        for found in re.findall(r"\bpy3(\d+)\b", text):
            assert f"py3{found}" == versions["py"], f"{path.name}: py3{found}"
        for found in re.findall(r"python:(\d+\.\d+)", text):
            assert found == versions["python"], f"{path.name}: python:{found}"
