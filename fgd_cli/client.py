"""The `fgd` commands that talk to the REST API: submit, jobs, status, cancel, logs, results,
compare.

The API is ``--url`` (or ``FGD_URL``, default http://127.0.0.1:8000, where `fgd serve` listens)
and the caller ``--token`` (or ``FGD_TOKEN``). httpx and rich are imported when a command runs.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    from fgd_cli.api import ApiClient

DEFAULT_URL = "http://127.0.0.1:8000"

UrlOpt = Annotated[
    str, typer.Option("--url", envvar="FGD_URL", help="The API's base URL.", show_envvar=True)
]
TokenOpt = Annotated[
    str | None,
    typer.Option(
        "--token", envvar="FGD_TOKEN", help="API token.", show_envvar=True, show_default=False
    ),
]
JobIdArg = Annotated[str, typer.Argument(help="Job id.", show_default=False)]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the API's JSON answer.")]


def _client(url: str, token: str | None) -> ApiClient:
    from fgd_cli.api import ApiClient

    return ApiClient(url, token)


def _print_json(data: Any) -> None:
    import json

    typer.echo(json.dumps(data, indent=2))


def wait_for_job(
    api: ApiClient,
    job_id: str,
    *,
    interval: float = 2.0,
    stop: threading.Event | None = None,
    check: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Poll ``GET /jobs/{id}`` with a progress bar (trials ended of all, best metric so far)
    until the job is in a final state; return it. ``check`` runs before each poll (it may
    raise: a stack whose part died).

    Raises:
        Interrupted: ``stop`` was set (a signal) before the job finished.
        ApiError: the API refused, or stayed unreachable for a minute.
    """
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
    )

    from fgd_cli.api import FINAL_STATES, ApiError
    from fgd_cli.console import console
    from fgd_cli.stack import Interrupted
    from fgd_cli.views import STATE_STYLES, best_text, trial_counts

    stop = stop or threading.Event()
    columns = (
        SpinnerColumn(),
        TextColumn("[{task.fields[style]}]{task.fields[state]:<10}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("trials"),
        TextColumn("{task.fields[best]}"),
        TimeElapsedColumn(),
    )
    unreachable_since: float | None = None
    with Progress(*columns, console=console) as bar:
        task = bar.add_task(job_id, total=None, state="", style="dim", best="")
        while True:
            if check is not None:
                check()
            try:
                job = api.job(job_id)
                unreachable_since = None
            except ApiError as exc:
                if exc.status is not None:
                    raise
                unreachable_since = unreachable_since or time.monotonic()
                if time.monotonic() - unreachable_since > 60:
                    raise
            else:
                ended, total = trial_counts(job)
                state = job["state"]
                best = best_text(job)
                bar.update(
                    task,
                    total=total,
                    completed=ended,
                    state=state,
                    style=STATE_STYLES.get(state, "dim"),
                    best=f"best {best}" if best else "",
                )
                if state in FINAL_STATES:
                    return job
            if stop.wait(interval):
                raise Interrupted(f"stopped waiting for job {job_id}")


def report_finished(job: dict[str, Any]) -> int:
    """Print how the job ended; the exit status of a command that waited for it."""
    from fgd_cli.console import say
    from fgd_cli.views import best_text, duration, trial_counts

    state = job["state"]
    took = duration(job.get("started_at"), job.get("finished_at"))
    ended, total = trial_counts(job)
    line = f"job {job['id']} {state}" + (f" after {took}" if took else "")
    line += f": {ended}/{total if total is not None else '?'} trials"
    failed = (job.get("progress") or {}).get("trials_failed")
    if failed:
        line += f" ({failed} stopped or failed)"
    if job.get("best_metric"):
        line += f", best {best_text(job)}"
    say(line, style="green" if state == "SUCCEEDED" else "red")
    if job.get("error"):
        say(f"error: {job['error']}", style="red")
    if state != "SUCCEEDED":
        say(f"see `fgd logs {job['id']}`")
        return 1
    return 0


# --- the commands -------------------------------------------------------------------------------


def submit(
    spec: Annotated[Path, typer.Argument(help="Job spec (.yaml, .yml or .json).")],
    name: Annotated[str | None, typer.Option(help="Job name [default: the file's stem].")] = None,
    priority: Annotated[int, typer.Option(help="Higher runs first (-100 to 100).")] = 0,
    wait: Annotated[bool, typer.Option("--wait", help="Follow the job to its end.")] = False,
    idempotency_key: Annotated[
        str | None, typer.Option(help="Resending with the same key returns the same job.")
    ] = None,
    max_attempts: Annotated[
        int | None, typer.Option(help="Dispatches before giving up [default: 2].")
    ] = None,
    poll_seconds: Annotated[
        float, typer.Option(min=0.05, help="--wait: seconds between polls of the job.")
    ] = 2.0,
    url: UrlOpt = DEFAULT_URL,
    token: TokenOpt = None,
) -> None:
    """Submit a job spec; the job id is printed alone on the last line unless --wait.

    With --wait: a progress bar of trials done and the best metric so far until the job ends;
    the exit status is 1 when the job did not succeed.
    """
    from fgd_cli.console import say, user_errors
    from fgd_cli.stack import Interrupted

    with user_errors():
        from workers.spec import read_spec_file

        body = read_spec_file(spec)  # the API validates it (and names the field at fault)
        with _client(url, token) as api:
            job = api.submit(
                body,
                name=name or spec.stem,
                priority=priority,
                idempotency_key=idempotency_key,
                max_attempts=max_attempts,
            )
            say(f"job {job['id']} {job['state']}: {job['name']} (priority {job['priority']})")
            if not wait:
                typer.echo(job["id"])
                return
            try:
                finished = wait_for_job(api, job["id"], interval=poll_seconds)
            except (KeyboardInterrupt, Interrupted):
                say(f"stopped waiting; the job goes on (fgd status {job['id']})", style="yellow")
                raise typer.Exit(130) from None
        raise typer.Exit(report_finished(finished))


def jobs(
    state: Annotated[
        str | None, typer.Option(help="Only jobs in this state (e.g. RUNNING).")
    ] = None,
    limit: Annotated[int, typer.Option(help="At most this many.")] = 100,
    as_json: JsonOpt = False,
    url: UrlOpt = DEFAULT_URL,
    token: TokenOpt = None,
) -> None:
    """List your jobs, newest first (an admin token sees everyone's)."""
    from fgd_cli.console import print_wide, user_errors
    from fgd_cli.views import jobs_table

    with user_errors(), _client(url, token) as api:
        page = api.jobs(state=state, limit=limit)
        if as_json:
            _print_json(page)
        else:
            print_wide(jobs_table(page))


def status(
    job_id: JobIdArg, as_json: JsonOpt = False, url: UrlOpt = DEFAULT_URL, token: TokenOpt = None
) -> None:
    """State, progress, best metric, errors and MLflow links of one job."""
    from fgd_cli.console import print_wide, user_errors
    from fgd_cli.views import job_view

    with user_errors(), _client(url, token) as api:
        job = api.job(job_id)
        if as_json:
            _print_json(job)
        else:
            print_wide(job_view(job))


def cancel(job_id: JobIdArg, url: UrlOpt = DEFAULT_URL, token: TokenOpt = None) -> None:
    """Cancel a job: a queued one at once, one on Ray is stopped there."""
    from fgd_cli.console import say, user_errors

    with user_errors(), _client(url, token) as api:
        answer = api.cancel(job_id)
        say(f"job {answer['id']} {answer['state']}: {answer['message']}")


def logs(
    job_id: JobIdArg,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Stream new lines until the job ends.")
    ] = False,
    url: UrlOpt = DEFAULT_URL,
    token: TokenOpt = None,
) -> None:
    """The job's log as copied out of Ray (all attempts); -f follows it to the job's end."""
    import json
    import sys

    from fgd_cli.console import say, user_errors

    with user_errors(), _client(url, token) as api:
        if not follow:
            sys.stdout.write(api.logs(job_id))
            sys.stdout.flush()
            return
        for event, data in api.follow_logs(job_id):
            if event == "log":
                sys.stdout.write(data)
                sys.stdout.flush()
            elif event == "end":
                state = json.loads(data).get("state", "?")
                say(f"-- job {job_id} {state}", style="dim")


def results(
    job_id: JobIdArg, as_json: JsonOpt = False, url: UrlOpt = DEFAULT_URL, token: TokenOpt = None
) -> None:
    """The leaderboard of a finished job (trials ranked by its metric), and any other sections
    the API returns with it."""
    from fgd_cli.console import print_wide, user_errors
    from fgd_cli.views import results_view

    with user_errors(), _client(url, token) as api:
        answer = api.results(job_id)
        if as_json:
            _print_json(answer)
        else:
            print_wide(results_view(answer))


def compare(
    job_ids: Annotated[list[str], typer.Argument(help="Two or more job ids.")],
    as_json: JsonOpt = False,
    url: UrlOpt = DEFAULT_URL,
    token: TokenOpt = None,
) -> None:
    """The best trial of each job side by side."""
    from fgd_cli.console import print_wide, user_errors
    from fgd_cli.views import compare_table

    with user_errors(), _client(url, token) as api:
        answer = api.compare(job_ids)
        if as_json:
            _print_json(answer)
        else:
            print_wide(compare_table(answer))


def register(app: typer.Typer) -> None:
    """Add the client commands to the `fgd` app."""
    for command in (submit, jobs, status, cancel, logs, results, compare):
        app.command(command.__name__)(command)
