"""Artifacts written straight into the local artifact store of an MLflow server on this machine.

``mlflow server --artifacts-destination DIR --serve-artifacts`` keeps the artifact
``mlflow-artifacts:/<path>`` in ``DIR/<path>``, and its clients upload over HTTP. Every byte then
costs the server CPU: about 0.45 s for a 138 MB checkpoint, on the CPUs the trials train on. A
trial on the server's own machine can put the file there itself, as the server would: under a
staging name first, then renamed into place, so a reader never sees half a file.

A server this project starts marks its local store with a token (``.fgd-artifact-store`` in
``DIR``). The driver hands the store's path and token to its trials; a trial writes directly
only where it finds the same token at that path (the same machine, or a filesystem shared with
it), and uploads over HTTP otherwise or on any error. Trials on other nodes, servers started by
someone else and S3 stores always go over HTTP.

``mlflow`` is not imported here.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlparse

log = logging.getLogger(__name__)

MARKER = ".fgd-artifact-store"
# The MLflow server stages its own uploads under this prefix and leaves such files out of
# artifact listings; a direct write stages under it too.
STAGING_PREFIX = ".artifact.uploading."


@dataclass(frozen=True)
class LocalArtifactStore:
    """A server's local artifact directory and the token that names it."""

    root: str
    token: str

    @classmethod
    def mark(cls, root: str | Path) -> LocalArtifactStore:
        """The store at ``root``, marked with a new token unless it already has one (a store
        keeps its token across server restarts)."""
        root = Path(root)
        root.mkdir(parents=True, exist_ok=True)
        marker = root / MARKER
        with contextlib.suppress(FileExistsError):
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            with os.fdopen(fd, "w") as f:
                f.write(uuid.uuid4().hex + "\n")
        store = cls.read(root)
        if store is None:
            raise OSError(f"cannot read the artifact store marker {marker}")
        return store

    @classmethod
    def read(cls, root: str | Path) -> LocalArtifactStore | None:
        """The store at ``root`` if it is marked."""
        try:
            token = (Path(root) / MARKER).read_text().strip()
        except OSError:
            return None
        return cls(str(root), token) if token else None

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> LocalArtifactStore | None:
        if not data:
            return None
        return cls(str(data["root"]), str(data["token"]))

    def to_dict(self) -> dict[str, str]:
        return {"root": self.root, "token": self.token}

    def reachable(self) -> bool:
        """This process sees the same store at ``root``."""
        found = LocalArtifactStore.read(self.root)
        return found is not None and found.token == self.token

    def path_of(self, artifact_uri: str, artifact_path: str | None, name: str) -> Path | None:
        """Where the server keeps the file ``name`` under ``artifact_path`` of the run whose
        artifact URI is ``artifact_uri``; None for a URI this store does not serve."""
        parsed = urlparse(artifact_uri)
        if parsed.scheme != "mlflow-artifacts" or parsed.netloc:
            return None  # another scheme, or a URI naming a server of its own
        rel = PurePosixPath(parsed.path.lstrip("/")) / (artifact_path or "") / name
        if not rel.parts or any(p in ("..", ".") for p in rel.parts) or rel.is_absolute():
            return None
        return Path(self.root, *rel.parts)

    def write_file(
        self, artifact_uri: str, local_path: str | Path, artifact_path: str | None
    ) -> bool:
        """Put the file ``local_path`` into the run's artifacts: a hard link to it where the
        filesystem allows (no copy: the caller must not change the file afterwards), else a
        copy. False when this store cannot take it (another URI, an OS error), for the caller
        to upload instead. The caller checks ``reachable()`` first, before it looks up the run's
        artifact URI."""
        local_path = Path(local_path)
        dst = self.path_of(artifact_uri, artifact_path, local_path.name)
        if dst is None:
            return False
        tmp = dst.with_name(f"{STAGING_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}")
        try:
            dst.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(local_path, tmp)
            except OSError:  # another filesystem, or one without hard links
                shutil.copyfile(local_path, tmp)
            os.chmod(tmp, 0o666 & ~_umask())
            os.replace(tmp, dst)
        except OSError:
            log.warning(
                "direct write of %s to %s failed; uploading", local_path, dst, exc_info=True
            )
            with contextlib.suppress(OSError):
                tmp.unlink()
            return False
        return True


@functools.cache
def _umask() -> int:
    """This process's umask, read without setting it (os.umask would change it for every thread
    for a moment)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
