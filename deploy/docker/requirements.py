"""The pinned requirements of one image target, read from pyproject.toml (the one list of pins).

    python deploy/docker/requirements.py api   # the service and the MLflow server: no torch
    python deploy/docker/requirements.py ray   # a Ray node: everything, torch included

The Dockerfile installs these lists, then the project itself with ``--no-deps``, so every pin is
the one pyproject.toml gives. Standard library only: it runs before anything is installed.
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"

# Used by training only (fgd_core and the trainable); the service never imports them.
TRAINING_ONLY = ("torch", "torchvision", "pycocotools", "optuna")
# Optional groups each target adds: the MLflow server (api image) stores artifacts on S3.
EXTRAS = {"api": ("s3",), "ray": ()}


def requirement_name(requirement: str) -> str:
    """The normalized distribution name of a requirement line (``ray[tune]==2.6`` → ``ray``)."""
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    if match is None:
        raise ValueError(f"not a requirement: {requirement!r}")
    return re.sub(r"[-_.]+", "-", match.group(1)).lower()


def requirements(target: str, pyproject: Path = PYPROJECT) -> list[str]:
    """The requirement lines of ``target`` (``api`` or ``ray``), pins as written."""
    if target not in EXTRAS:
        raise ValueError(f"unknown target {target!r}; one of {sorted(EXTRAS)}")
    project = tomllib.loads(pyproject.read_text())["project"]
    deps: list[str] = list(project["dependencies"])
    for extra in EXTRAS[target]:
        deps += project["optional-dependencies"][extra]
    if target == "api":
        return [d for d in deps if requirement_name(d) not in TRAINING_ONLY]
    return deps


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    print("\n".join(requirements(argv[0])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
