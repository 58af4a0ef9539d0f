"""`fgd serve`: a Ray head, an MLflow server and the REST API on this machine, until Ctrl-C."""

from __future__ import annotations

from typing import Annotated

import typer


def serve(
    host: Annotated[str, typer.Option(help="The API's bind address.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="The API's port (0: any free one).")] = 8000,
    num_cpus: Annotated[
        int | None, typer.Option(help="CPUs of the Ray head [default: all].")
    ] = None,
    num_gpus: Annotated[
        int | None, typer.Option(help="GPUs of the Ray head [default: all].")
    ] = None,
    object_store_mb: Annotated[
        int | None, typer.Option(help="Ray's object store, MiB [default: Ray's].")
    ] = None,
    max_concurrent_jobs: Annotated[
        int | None, typer.Option(help="Jobs on Ray at once [default: FGD_MAX_CONCURRENT_JOBS].")
    ] = None,
) -> None:
    """Run the service locally: a Ray head, the embedded MLflow server and the API.

    RAY_ADDRESS or MLFLOW_TRACKING_URI, when set, are used instead of starting those. State
    (job store, MLflow runs, Tune storage, data) lives under FGD_HOME (default ~/.fgd).
    Ctrl-C or SIGTERM stops everything this command started.
    """
    from fgd_cli.console import say, user_errors
    from fgd_cli.stack import Stack, StackOptions, stop_on_signals

    options = StackOptions(
        host=host,
        port=port,
        num_cpus=num_cpus,
        num_gpus=num_gpus,
        object_store_mb=object_store_mb,
        max_concurrent_jobs=max_concurrent_jobs,
    )
    with user_errors(), stop_on_signals() as stop, Stack(options) as stack:
        say(f"FGD_HOME      {stack.home}")
        stack.start(stop, say=say)
        say("")
        say("ready. In another terminal:")
        say(f"  export FGD_URL={stack.api_url}")
        say("  export FGD_TOKEN=$(fgd token create --name me | tail -n 1)")
        say("  fgd sweep --example > sweep.yaml && fgd submit sweep.yaml --wait")
        say("Ctrl-C stops the service.", style="dim")
        stack.wait(stop)
        say("stopping")
    say("stopped")
