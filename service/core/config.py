"""Service settings, read from the environment (full-stack-fastapi-template's ``core/config.py``).

Variables (all optional in development)::

    FGD_DATABASE_URL        SQLAlchemy URL; default sqlite under $FGD_HOME/service/jobs.db
    FGD_ENVIRONMENT         development | production
    FGD_SECRET_KEY          must be set to a real secret outside development
    FGD_MAX_CONCURRENT_JOBS jobs the dispatcher keeps on Ray at once
    FGD_DATA_ROOTS          allowed data path prefixes (os.pathsep-separated or a JSON list);
                            default $FGD_HOME/data
    FGD_MAX_BODY_BYTES      request body limit (413 above it)
    FGD_DEFAULT_QUOTA       concurrent (non-final) jobs per token unless the token says otherwise
    FGD_LOG_POLL_SECONDS    how often a followed log stream looks for new chunks
    RAY_ADDRESS             the Ray cluster the dispatcher submits to (Ray's own variable):
                            its dashboard URL, http://head:8265 (with RAY_AUTH_MODE=token and
                            RAY_AUTH_TOKEN, Ray's own, when the cluster requires a token)
    FGD_DISPATCH            ray | none; default ray when RAY_ADDRESS is set. With ray the app
                            runs the dispatch loop (service.loop) against RAY_ADDRESS
    FGD_DISPATCH_INTERVAL   seconds between dispatch passes
    FGD_RAY_PYTHON          the interpreter of the Ray Job entrypoint command on the cluster
    FGD_DISPATCH_NOOP       true: every Ray Job runs the entrypoint with --noop and exits at
                            once (load benchmarks: dispatch runs, nothing trains)
    FGD_THREADS             worker threads per API process for the routes that use the
                            database (each holds at most one pooled connection)
    FGD_UNFIT_JOBS          fail | wait: a job whose trials no node can run fails at once, or
                            waits (for a cluster that autoscales to such nodes)
    MLFLOW_TRACKING_URI     where results are read (MLflow's own variable); default: the
                            embedded server recorded under $FGD_HOME/mlflow, if running
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AliasChoices, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from workers.settings import layout

PLACEHOLDER_SECRET = "changethis"


class Settings(BaseSettings):
    """Everything the service reads from its environment."""

    model_config = SettingsConfigDict(env_prefix="FGD_", extra="ignore", env_ignore_empty=True)

    DATABASE_URL: str = Field(default_factory=lambda: f"sqlite:///{layout().service / 'jobs.db'}")
    ENVIRONMENT: Literal["development", "production"] = "development"
    SECRET_KEY: str = PLACEHOLDER_SECRET
    MAX_CONCURRENT_JOBS: int = Field(default=2, ge=1)
    DATA_ROOTS: Annotated[list[Path], NoDecode] = Field(default_factory=lambda: [layout().data])
    MAX_BODY_BYTES: int = Field(default=1_000_000, ge=1024)
    DEFAULT_QUOTA: int = Field(default=10, ge=1)
    LOG_POLL_SECONDS: float = Field(default=1.0, gt=0)
    RAY_ADDRESS: str | None = Field(default=None, validation_alias=AliasChoices("RAY_ADDRESS"))
    DISPATCH: Literal["ray", "none"] | None = None
    DISPATCH_INTERVAL: float = Field(default=1.0, gt=0)
    RAY_PYTHON: str = "python"
    DISPATCH_NOOP: bool = False
    THREADS: int = Field(default=8, ge=1)
    TOKEN_CACHE_SECONDS: float = Field(default=2.0, ge=0)  # how long a revoked token still works
    UNFIT_JOBS: Literal["fail", "wait"] = "fail"
    MLFLOW_TRACKING_URI: str | None = Field(
        default=None, validation_alias=AliasChoices("MLFLOW_TRACKING_URI")
    )

    @field_validator("DATA_ROOTS", mode="before")
    @classmethod
    def _split_roots(cls, v: Any) -> Any:
        if isinstance(v, str):
            text = v.strip()
            parts = json.loads(text) if text.startswith("[") else text.split(os.pathsep)
            return [p for p in parts if p]
        return v

    @field_validator("DATA_ROOTS")
    @classmethod
    def _absolute_roots(cls, v: list[Path]) -> list[Path]:
        if not v:
            raise ValueError("at least one data root is needed")
        return [p.expanduser().resolve() for p in v]

    @model_validator(mode="after")
    def _real_secret(self) -> Settings:
        if self.SECRET_KEY == PLACEHOLDER_SECRET and self.ENVIRONMENT != "development":
            raise ValueError(
                f"FGD_SECRET_KEY is the placeholder {PLACEHOLDER_SECRET!r}; set a real secret "
                f"when FGD_ENVIRONMENT={self.ENVIRONMENT}"
            )
        return self

    @model_validator(mode="after")
    def _ray_address_for_dispatch(self) -> Settings:
        if self.DISPATCH == "ray" and not self.RAY_ADDRESS:
            raise ValueError("FGD_DISPATCH=ray needs RAY_ADDRESS (the Ray dashboard's URL)")
        return self

    @property
    def dispatch_to_ray(self) -> bool:
        """Whether the app runs the dispatch loop against ``RAY_ADDRESS``."""
        return self.DISPATCH == "ray" or (self.DISPATCH is None and bool(self.RAY_ADDRESS))

    @property
    def is_sqlite(self) -> bool:
        return self.DATABASE_URL.startswith("sqlite")


@lru_cache
def get_settings() -> Settings:
    """The settings of this process (read once; tests build ``Settings(...)`` directly)."""
    return Settings()
