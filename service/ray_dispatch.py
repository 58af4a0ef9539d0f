"""The ``Dispatcher`` of a real Ray cluster: one Ray Job per attempt, over the Jobs REST API.

Each attempt runs ``python -m workers.entrypoint --job-id ID --attempt N --spec-json ...`` as a
Ray Job whose submission id is ``fgd-<job id>-<attempt>``; Ray refuses a second job with the same
id, which makes ``submit`` idempotent. The spec travels inline (``b64:`` + base64 JSON) while it
is small, else as ``spec.json`` in a ``working_dir`` Ray uploads with the job.

Only ``ray.job_submission`` and ``ray.util.state`` are imported (lazily), both HTTP clients of
the dashboard: the service process never connects a Ray driver and never loads torch.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import shlex
import shutil
import tempfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from service.dispatch import DispatchState, JobSubmission
from workers.entrypoint import encode_spec

log = logging.getLogger(__name__)

ENTRYPOINT_MODULE = "workers.entrypoint"
INLINE_SPEC_LIMIT = 32_000  # characters of the encoded spec kept on the command line
NODES_TTL_SECONDS = 10.0  # how long a read of the cluster's nodes is reused
_MAX_MESSAGE = 4_000
_FAILED_LINE = re.compile(r"^\s*fgd job \S+ failed: ")


def _timed_client(base: type, timeout: float) -> type:
    """``base`` (a Ray dashboard SDK client) whose HTTP requests time out after ``timeout`` s.

    Ray's SDK clients call ``requests`` without a timeout; a hung head would stall the loop.
    """

    class Timed(base):
        def _do_request(self, method: str, endpoint: str, **kwargs: Any) -> Any:
            kwargs["timeout"] = min(float(kwargs.get("timeout") or timeout), timeout)
            return super()._do_request(method, endpoint, **kwargs)

    return Timed


def _is_missing(exc: Exception) -> bool:
    text = str(exc)
    return "status code 404" in text or "does not exist" in text


class RayJobsDispatcher:
    """Submits, follows, and stops service jobs as Ray Jobs on the cluster at ``address``.

    Args:
        address: the dashboard URL (``http://head:8265``), as ``RAY_ADDRESS`` gives it.
        env_vars: set in every job (``MLFLOW_TRACKING_URI``, ``FGD_HOME``, ...).
        python: the interpreter the entrypoint command runs on the cluster.
        timeout: seconds for one HTTP request to the dashboard.
        inline_limit: longest encoded spec put on the command line; longer ones go as a file.
        noop: add ``--noop`` to every command (jobs exit 0 at once: load benchmarks).
    """

    def __init__(
        self,
        address: str,
        *,
        env_vars: Mapping[str, str] | None = None,
        python: str = "python",
        timeout: float = 10.0,
        inline_limit: int = INLINE_SPEC_LIMIT,
        noop: bool = False,
    ) -> None:
        self.address = address
        self.env_vars = {k: str(v) for k, v in (env_vars or {}).items() if v}
        self.python = python
        self.timeout = timeout
        self.inline_limit = inline_limit
        self.noop = noop
        self._client: Any = None
        self._nodes: tuple[float, list[dict[str, float]]] | None = None
        self._lock = threading.Lock()

    def preload(self) -> None:
        """Import Ray's client modules now (seconds, holding the GIL much of the time): at
        start-up, not in the first dispatch pass while the API is answering requests."""
        import ray.job_submission  # noqa: F401
        import ray.util.state  # noqa: F401

    # --- the Dispatcher protocol -----------------------------------------------------------

    def submit(self, job: JobSubmission) -> str:
        sid = job.submission_id
        runtime_env: dict[str, Any] = {"env_vars": dict(self.env_vars)}
        spec_arg = encode_spec(job.spec)
        spec_dir = None
        if len(spec_arg) > self.inline_limit:
            spec_dir = tempfile.mkdtemp(prefix="fgd-spec-")
            (Path(spec_dir) / "spec.json").write_text(json.dumps(job.spec))
            runtime_env["working_dir"] = spec_dir  # uploaded; the job's cwd on the cluster
            spec_arg = "spec.json"
        command = [
            self.python,
            "-m",
            ENTRYPOINT_MODULE,
            "--job-id",
            job.job_id,
            "--attempt",
            str(job.attempt),
            "--spec-json",
            spec_arg,
            *(["--noop"] if self.noop else []),
        ]
        metadata = {**job.metadata, "fgd_attempt": str(job.attempt), "fgd_name": job.name[:200]}
        try:
            self.client().submit_job(
                entrypoint=shlex.join(command),
                submission_id=sid,
                runtime_env=runtime_env,
                metadata=metadata,
            )
        except RuntimeError as exc:
            if "already exists" not in str(exc):
                raise
            log.info("submission %s already on the cluster; not submitted again", sid)
        finally:
            if spec_dir is not None:
                shutil.rmtree(spec_dir, ignore_errors=True)
        return sid

    def status(self, submission_id: str) -> tuple[DispatchState, str]:
        info = self._call("get_job_info", submission_id)
        return DispatchState(str(info.status)), _short(info.message or "")

    def logs(self, submission_id: str) -> str:
        return str(self._call("get_job_logs", submission_id))

    def stop(self, submission_id: str) -> None:
        with contextlib.suppress(KeyError):  # nothing to stop
            self._call("stop_job", submission_id)

    def cluster_can_fit(self, resources: dict[str, float]) -> bool:
        """Whether one alive node has at least ``resources`` in total (not free right now).

        A cluster that autoscales to nodes not yet started is not seen here. With no alive node
        at all (a head still starting) nothing can be judged: True, and Ray holds the job.
        """
        needed = {k: v for k, v in resources.items() if v > 0}
        nodes = self.nodes()
        return not nodes or any(all(n.get(k, 0.0) >= v for k, v in needed.items()) for n in nodes)

    # --- cluster details -------------------------------------------------------------------

    def nodes(self) -> list[dict[str, float]]:
        """The total resources of each alive node (cached for ``NODES_TTL_SECONDS``)."""
        with self._lock:
            if self._nodes is not None and time.monotonic() - self._nodes[0] < NODES_TTL_SECONDS:
                return self._nodes[1]
        from ray.util.state import StateApiClient
        from ray.util.state.common import ListApiOptions, StateResource

        client = _timed_client(StateApiClient, self.timeout)(address=self.address)
        states = client.list(
            StateResource.NODES,
            options=ListApiOptions(timeout=int(self.timeout), limit=10_000),
            raise_on_missing_output=False,
        )
        nodes = [
            {str(k): float(v) for k, v in (_get(s, "resources_total") or {}).items()}
            for s in states
            if str(_get(s, "state")) == "ALIVE"
        ]
        with self._lock:
            self._nodes = (time.monotonic(), nodes)
        return nodes

    def describe_capacity(self) -> str:
        """The largest CPU and GPU counts of one node, for messages."""
        nodes = self.nodes()
        cpu = max((n.get("CPU", 0.0) for n in nodes), default=0.0)
        gpu = max((n.get("GPU", 0.0) for n in nodes), default=0.0)
        return f"{len(nodes)} alive node(s), at most {cpu:g} CPU and {gpu:g} GPU on one"

    def client(self) -> Any:
        """The Jobs API client, made on first use (the head may be down when the service starts)."""
        with self._lock:
            if self._client is None:
                from ray.job_submission import JobSubmissionClient

                self._client = _timed_client(JobSubmissionClient, self.timeout)(self.address)
            return self._client

    def _call(self, method: str, submission_id: str) -> Any:
        try:
            return getattr(self.client(), method)(submission_id)
        except RuntimeError as exc:
            if _is_missing(exc):
                raise KeyError(f"Ray knows no job {submission_id!r}") from exc
            raise
        except OSError:  # connection refused / reset: make a fresh client next time
            with self._lock:
                self._client = None
            raise


def _get(obj: Any, name: str) -> Any:
    return obj.get(name) if isinstance(obj, dict) else getattr(obj, name, None)


def _short(message: str) -> str:
    """Ray's message, short: the entrypoint's own failure line when it quotes one (Ray's
    message on failure quotes the log's tail), else its first line and its end."""
    reasons = [line for line in message.splitlines() if _FAILED_LINE.match(line)]
    if reasons:
        return f"{reasons[-1].strip()} ({message.splitlines()[0].split(',')[0]})"
    if len(message) <= _MAX_MESSAGE:
        return message
    first = message.splitlines()[0][:500]
    return f"{first}\n...\n{message[-(_MAX_MESSAGE - len(first) - 5) :]}"
