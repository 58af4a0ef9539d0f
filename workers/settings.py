"""Where FGD keeps its state, and the environment variables that move it.

Everything lives under one home directory, ``fgd_home()`` (``FGD_HOME``, default ``~/.fgd``)::

    $FGD_HOME/
      mlflow/        embedded MLflow tracking server
        mlflow.db      SQLite backend store (runs, params, metrics, model registry)
        artifacts/     artifact store, served over HTTP by the server (--serve-artifacts)
        server.json    pid / port / backend of the running embedded server
        server.log     its stdout + stderr
        server.lock    file lock taken while a server is checked or started
      tune/          Ray Tune storage (experiment state, trial checkpoints)
      data/          generated / downloaded datasets
      cache/         rebuildable: inductor kernels, teacher features (fgd_core.teacher_cache)
      service/       the service's job store

Settings are read from the environment through pydantic-settings each time they are asked for
(cheap, and a test's ``monkeypatch.setenv`` takes effect at once). ``env_var_names()`` lists every
variable these classes read, so deployment files can be checked against them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_MLFLOW_PORT = 5151  # not 5000: macOS AirPlay and many dev servers sit on 5000


class FgdSettings(BaseSettings):
    """Paths: ``FGD_HOME`` and ``FGD_TUNE_STORAGE``."""

    model_config = SettingsConfigDict(env_prefix="FGD_", extra="ignore", env_ignore_empty=True)

    home: Path = Path("~/.fgd")  # FGD_HOME: root of all local state
    # FGD_TUNE_STORAGE: Ray Tune storage_path (local dir or a pyarrow URI such as s3://...);
    # default $FGD_HOME/tune. Multi-node sweeps need a path every node sees (NFS or a bucket).
    tune_storage: str | None = None


class MlflowSettings(BaseSettings):
    """The tracking server: ``MLFLOW_TRACKING_URI`` or the embedded one (``FGD_MLFLOW_*``)."""

    model_config = SettingsConfigDict(
        env_prefix="FGD_MLFLOW_", extra="ignore", env_ignore_empty=True
    )

    # MLFLOW_TRACKING_URI: an external server (http://mlflow:5000); when set nothing is started.
    tracking_uri: str | None = Field(
        default=None, validation_alias=AliasChoices("MLFLOW_TRACKING_URI")
    )
    port: int = Field(default=DEFAULT_MLFLOW_PORT, ge=0, le=65535)  # FGD_MLFLOW_PORT; 0 = any
    host: str = "127.0.0.1"  # FGD_MLFLOW_HOST: bind address of the embedded server
    workers: int = Field(default=1, ge=1)  # FGD_MLFLOW_WORKERS: uvicorn worker processes
    start_timeout: float = Field(default=60.0, gt=0)  # FGD_MLFLOW_START_TIMEOUT: seconds
    # FGD_MLFLOW_ALLOWED_HOSTS: passed to `mlflow server --allowed-hosts` (needed when the server
    # binds 0.0.0.0 and is reached by a public name; MLflow's default allows localhost + private IPs)
    allowed_hosts: str | None = None


SETTINGS_CLASSES: tuple[type[BaseSettings], ...] = (FgdSettings, MlflowSettings)


def env_var_names(*classes: type[BaseSettings]) -> set[str]:
    """Every environment variable the given settings classes read (default: this module's)."""
    names: set[str] = set()
    for cls in classes or SETTINGS_CLASSES:
        prefix = cls.model_config.get("env_prefix", "")
        for field_name, field in cls.model_fields.items():
            alias = field.validation_alias
            if isinstance(alias, AliasChoices):
                names.update(str(a).upper() for a in alias.choices)
            elif isinstance(alias, str):
                names.add(alias.upper())
            else:
                names.add(f"{prefix}{field_name}".upper())
    return names


def fgd_home() -> Path:
    """The absolute FGD home directory (``FGD_HOME``, default ``~/.fgd``); not created here."""
    return FgdSettings().home.expanduser().absolute()


@dataclass(frozen=True)
class FgdLayout:
    """The directories and files under one FGD home."""

    home: Path

    @property
    def mlflow(self) -> Path:
        return self.home / "mlflow"

    @property
    def mlflow_db(self) -> Path:
        return self.mlflow / "mlflow.db"

    @property
    def mlflow_artifacts(self) -> Path:
        return self.mlflow / "artifacts"

    @property
    def server_json(self) -> Path:
        return self.mlflow / "server.json"

    @property
    def server_log(self) -> Path:
        return self.mlflow / "server.log"

    @property
    def server_lock(self) -> Path:
        return self.mlflow / "server.lock"

    @property
    def tune(self) -> Path:
        return self.home / "tune"

    @property
    def data(self) -> Path:
        return self.home / "data"

    @property
    def service(self) -> Path:
        return self.home / "service"

    @property
    def mlflow_backend_store_uri(self) -> str:
        """SQLAlchemy URI of the embedded server's SQLite store (four slashes: absolute path)."""
        return f"sqlite:///{self.mlflow_db}"

    def ensure(self) -> FgdLayout:
        """Create the directories (not the files); return self."""
        for d in (self.mlflow, self.mlflow_artifacts, self.tune, self.data, self.service):
            d.mkdir(parents=True, exist_ok=True)
        return self


def layout(home: Path | None = None) -> FgdLayout:
    """The layout under ``home`` (default ``fgd_home()``)."""
    return FgdLayout(Path(home).expanduser().absolute() if home is not None else fgd_home())


def tune_storage() -> str:
    """Ray Tune ``storage_path``: ``FGD_TUNE_STORAGE`` or ``$FGD_HOME/tune``."""
    configured = FgdSettings().tune_storage
    if configured:
        if "://" in configured:
            return configured
        return str(Path(configured).expanduser().absolute())
    return str(layout().tune)


def mlflow_settings() -> MlflowSettings:
    """The MLflow settings as the environment has them now."""
    return MlflowSettings()
