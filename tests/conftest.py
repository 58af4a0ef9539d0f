"""Shared test set-up: the plain loop implementation of FGD lives with the benchmarks."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_shapes(tmp_path_factory):
    """A tiny shapes dataset (16 train / 8 val images of 64 px), generated once per session."""
    from fgd_core.data import ShapesConfig, generate_shapes

    root = tmp_path_factory.mktemp("data") / "shapes"
    return generate_shapes(root, ShapesConfig(seed=0, num_train=16, num_val=8, image_size=64))


@pytest.fixture(scope="session")
def tiny_data(tiny_shapes):
    from fgd_core.training import DataConfig

    s = tiny_shapes
    return DataConfig(str(s.train_images), str(s.train_ann), str(s.val_images), str(s.val_ann))
