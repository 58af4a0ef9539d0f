"""Service settings from the environment."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from service.core.config import Settings


def test_defaults_live_under_fgd_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FGD_HOME", str(tmp_path))
    for name in ("FGD_DATABASE_URL", "FGD_DATA_ROOTS", "FGD_ENVIRONMENT", "FGD_SECRET_KEY"):
        monkeypatch.delenv(name, raising=False)
    settings = Settings()
    assert f"sqlite:///{tmp_path / 'service' / 'jobs.db'}" == settings.DATABASE_URL
    assert [(tmp_path / "data").resolve()] == settings.DATA_ROOTS
    assert settings.ENVIRONMENT == "development" and settings.is_sqlite


def test_environment_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FGD_DATA_ROOTS", f"{tmp_path}/a:{tmp_path}/b")
    monkeypatch.setenv("FGD_MAX_CONCURRENT_JOBS", "4")
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    settings = Settings()
    assert [tmp_path / "a", tmp_path / "b"] == settings.DATA_ROOTS
    assert settings.MAX_CONCURRENT_JOBS == 4 and settings.RAY_ADDRESS == "ray://head:10001"
    assert settings.MLFLOW_TRACKING_URI == "http://mlflow:5000"
    monkeypatch.setenv("FGD_DATA_ROOTS", f'["{tmp_path}/c"]')
    assert [tmp_path / "c"] == Settings().DATA_ROOTS


def test_placeholder_secret_refused_outside_development(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FGD_ENVIRONMENT", "production")
    monkeypatch.delenv("FGD_SECRET_KEY", raising=False)
    with pytest.raises(ValidationError, match="FGD_SECRET_KEY"):
        Settings()
    monkeypatch.setenv("FGD_SECRET_KEY", "a-real-secret-from-the-vault")
    assert Settings().ENVIRONMENT == "production"
