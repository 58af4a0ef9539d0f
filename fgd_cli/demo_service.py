"""`fgd demo`: the service end to end on this machine, over REST.

1. starts the stack of `fgd serve` (Ray head, MLflow server, API) on a free port,
2. creates an API token,
3. submits the example sweep on the shapes data (`fgd sweep --example`) with ``POST /jobs``,
4. follows it with a progress bar,
5. prints the leaderboard and how to open these runs in the MLflow UI,

then stops the stack. A few minutes on 2 CPU cores.
"""

from __future__ import annotations

import shutil
import time
from typing import Any
from urllib.parse import urlparse

from fgd_cli.console import print_wide, say
from fgd_cli.stack import BIN, Stack, StackOptions, port_free, stop_on_signals

DEMO_NAME = "demo-shapes-sweep"


def quick_spec() -> dict[str, Any]:
    """A smoke-test variant of the example: 16 tiny images, a few steps, two trials."""
    from workers.examples import small_sweep

    spec = small_sweep()
    spec["data"] = {"shapes": {"num_train": 16, "num_val": 8, "image_size": 64, "seed": 0}}
    tiny = {"arch": "retinanet", "fpn_channels": 16, "min_size": 64, "max_size": 64}
    spec["model"] = {**tiny, "backbone": "resnet18"}
    spec["teacher"]["model"] = {**tiny, "backbone": "resnet18", "fpn_channels": 32}
    spec["teacher"]["training"] = {
        "batch_size": 4,
        "schedule": {"iterations": 2, "warmup_iters": 1},
    }
    spec["train"] = {
        "batch_size": 4,
        "schedule": {"iterations": 4, "warmup_iters": 1},
        "eval_every": 2,
        "checkpoint_every": 2,
        "log_every": 1,
        "eval_batch_size": 4,
    }
    spec["evaluate_teacher"] = False
    spec["sweep"].update(num_samples=2, scheduler="fifo")
    return spec


def _print_mlflow(stack: Stack, job: dict[str, Any], mlflow_stopped: bool) -> None:
    """How to open the job's runs: the running server's link, or a command that serves the
    embedded store again (on FGD_MLFLOW_PORT, 5151 by default, when free) and the link there."""
    links = job.get("mlflow") or {}
    url = links.get("run_url") or links.get("experiment_url") or stack.mlflow_uri
    if not mlflow_stopped:
        say(f"MLflow UI on these runs: {url}")
        return
    from workers.settings import DEFAULT_MLFLOW_PORT, layout, mlflow_settings

    port = mlflow_settings().port or DEFAULT_MLFLOW_PORT
    if not port_free("127.0.0.1", port):  # taken here: the demo's own port, free once it stops
        port = urlparse(stack.mlflow_uri).port or port
    mlflow = "mlflow" if shutil.which("mlflow") == str(BIN / "mlflow") else str(BIN / "mlflow")
    lay = layout(stack.home)
    say("MLflow UI on these runs (the demo's server stops with it):")
    say(
        f"  {mlflow} ui --backend-store-uri {lay.mlflow_backend_store_uri} "
        f"--artifacts-destination {lay.mlflow_artifacts} --port {port}"
    )
    old = urlparse(stack.mlflow_uri)
    say(f"  then open {url.replace(old.netloc, f'127.0.0.1:{port}', 1)}")


def run_service_demo(*, port: int = 0, quick: bool = False) -> int:
    """Run the five steps; return the exit status (1 when the job did not succeed)."""
    from fgd_cli.api import ApiClient, ApiError
    from fgd_cli.client import report_finished, wait_for_job
    from fgd_cli.views import results_view
    from workers.settings import fgd_home

    t0 = time.monotonic()
    options = StackOptions(port=port, api_log=fgd_home() / "serve" / "api.log")
    with stop_on_signals() as stop, Stack(options) as stack:
        say(f"[1/5] starting the stack under FGD_HOME={stack.home}", style="bold")
        stack.start(stop, say=lambda line: say(f"      {line}"))
        say(f"      API log {stack.options.api_log}")

        say("[2/5] creating an API token (fgd token create --name demo)", style="bold")
        from service.cli_tokens import create

        token = create("demo")
        say(f"      {token}")

        spec = quick_spec() if quick else _example()
        say("[3/5] POST /jobs: the example sweep on the shapes data", style="bold")
        with ApiClient(stack.api_url, token) as api:
            job = api.submit(spec, name=DEMO_NAME + ("-quick" if quick else ""), max_attempts=1)
            say(f"      job {job['id']} {job['state']}")
            say(f"[4/5] waiting for job {job['id']} (GET /jobs/{{id}})", style="bold")
            job = wait_for_job(api, job["id"], stop=stop, check=stack.check_alive, interval=1.0)
            status = report_finished(job)
            say("[5/5] GET /jobs/{id}/results", style="bold")
            try:
                print_wide(results_view(api.results(job["id"])))
            except ApiError as exc:  # a job that failed before any trial has no leaderboard
                say(f"      no leaderboard: {exc}", style="red")
        _print_mlflow(stack, job, mlflow_stopped="mlflow" in stack.started)
        say("stopping the stack")
    say(f"demo done in {time.monotonic() - t0:.0f} s")
    return status


def _example() -> dict[str, Any]:
    from workers.examples import small_sweep

    return small_sweep()
