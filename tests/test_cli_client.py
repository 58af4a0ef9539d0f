"""The `fgd` client commands against the real HTTP app served by uvicorn on a local port.

The app is the one of ``test_service_support`` (a real store, the in-process dispatcher whose
jobs the tests move along, MLflow results from a fake client); the commands reach it over TCP
with httpx, as they reach `fgd serve`.
"""

from __future__ import annotations

import io
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn
import yaml
from test_service_support import Api, fake_run, spec
from typer.testing import CliRunner

from fgd_cli.main import app
from fgd_cli.stack import free_port
from service import crud
from service.models import Job, JobState

pytest_plugins = ["test_service_support"]  # the store / api fixtures
# The client does not care which database the app keeps its jobs in: SQLite only.
sqlite_only = pytest.mark.parametrize("migrated_store", ["sqlite"], indirect=True)
SWEEP = {"space": {"alpha": {"loguniform": [1e-5, 1e-3]}}, "metric": "bbox_AP", "num_samples": 3}


class Live:
    """The fixture's app on a real port, and `fgd` pointed at it as alice."""

    def __init__(self, api: Api, url: str) -> None:
        self.api, self.url = api, url
        self.runner = CliRunner()

    def fgd(self, *args: Any, who: str = "alice", token: str | None = None) -> Any:
        env = {"FGD_URL": self.url, "FGD_TOKEN": token or self.api.tokens[who]}
        return self.runner.invoke(app, [str(a) for a in args], env=env)

    def move(self, job_id: str, *steps: str, **progress: Any) -> None:
        """Drive a job the way the dispatch loop does: dispatched, running, progress, final."""
        error = progress.pop("error", None)
        with self.api.store.session() as session:
            job = session.get(Job, job_id)
            assert job is not None
            if "dispatched" in steps:
                crud.mark_dispatched(session=session, job=job, submission_id=f"fgd-{job_id}-1")
            if "running" in steps:
                crud.mark_running(session=session, job=job)
            if progress:  # before the final state, as the loop stores it
                crud.update_progress(session=session, job=job, **progress)
            for step in set(steps) - {"dispatched", "running"}:
                crud.mark_finished(session=session, job=job, state=JobState(step), error=error)


@pytest.fixture
def live(api: Api) -> Iterator[Live]:
    port = free_port()
    config = uvicorn.Config(
        api.client.app, host="127.0.0.1", port=port, lifespan="off", log_level="warning"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield Live(api, f"http://127.0.0.1:{port}")
    finally:
        server.should_exit = True
        thread.join(10)


def ok(result: Any) -> str:
    assert result.exit_code == 0, result.output + repr(result.exception)
    return str(result.output)


def spec_file(tmp_path: Path, **over: Any) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(spec(**over)))
    return path


# --- the OpenAPI example ------------------------------------------------------------------------


@sqlite_only
def test_openapi_example_is_the_sweep_example_and_is_accepted(live: Live) -> None:
    from service.schemas import JobCreate
    from workers.spec import JobSpec

    schema = live.api.client.get("/openapi.json").json()
    body = schema["paths"]["/jobs"]["post"]["requestBody"]["content"]["application/json"]
    example = body["examples"]["shapes-sweep"]["value"]
    assert schema["components"]["schemas"]["JobCreate"]["examples"] == [example]
    job = JobCreate.model_validate(example)  # the spec model the API validates with
    assert job.spec.data.shapes is not None and job.spec.teacher.train
    assert job.spec.sweep is not None and job.spec.sweep.num_samples == 4
    printed = yaml.safe_load(ok(live.fgd("sweep", "--example")))
    assert JobSpec.model_validate(printed) == job.spec  # one example, shown everywhere
    r = live.api.post("/jobs", json=example)  # shapes data: no path to allow
    assert r.status_code == 201, r.text


# --- submit, jobs, status, cancel ---------------------------------------------------------------


@sqlite_only
def test_submit_list_status_cancel(live: Live, tmp_path: Path) -> None:
    out = ok(live.fgd("submit", spec_file(tmp_path), "--name", "first", "--priority", "5"))
    job_id = out.strip().splitlines()[-1]  # alone on the last line
    assert f"job {job_id} QUEUED: first (priority 5)" in out
    second = ok(live.fgd("submit", spec_file(tmp_path))).strip().splitlines()[-1]
    live.move(second, "dispatched", "running")

    table = ok(live.fgd("jobs"))
    assert job_id in table and second in table and "2 of 2 jobs" in table
    assert "tiny" in table and "RUNNING" in table and "QUEUED" in table
    running = ok(live.fgd("jobs", "--state", "running"))
    assert second in running and job_id not in running and "1 of 1 jobs" in running
    page = json.loads(ok(live.fgd("jobs", "--json")))
    assert page["count"] == 2 and {j["id"] for j in page["data"]} == {job_id, second}
    assert ok(live.fgd("jobs", who="bob")).count("0 of 0 jobs") == 1  # tenants see their own

    status = ok(live.fgd("status", job_id))
    for text in (job_id, "first", "QUEUED", "alice", "0 of 2"):
        assert text in status, (text, status)
    assert json.loads(ok(live.fgd("status", job_id, "--json")))["priority"] == 5

    assert f"job {job_id} CANCELLED: cancelled" in ok(live.fgd("cancel", job_id))
    assert "CANCELLING: stopping on the cluster" in ok(live.fgd("cancel", second))
    assert live.api.dispatcher.stopped == [f"fgd-{second}-1"]
    finished = live.api.submit(name="finished").json()["id"]
    live.move(finished, "dispatched", "running", "SUCCEEDED")
    result = live.fgd("cancel", finished)
    assert result.exit_code == 1 and "409" in result.output and "already finished" in result.output


@sqlite_only
def test_http_errors_are_one_line_naming_the_field(live: Live, tmp_path: Path) -> None:
    bad = spec_file(tmp_path, train={"schedule": {"iterations": 0}})
    result = live.fgd("submit", bad)
    assert result.exit_code == 1
    assert "error: 422 body.spec.train.schedule.iterations:" in result.output
    assert "Traceback" not in result.output

    outside = spec_file(tmp_path, data={"shapes": {"root": "/etc/shapes"}})
    result = live.fgd("submit", outside)
    assert result.exit_code == 1 and "body.spec.data.shapes.root" in result.output

    result = live.fgd("status", "nope")
    assert result.exit_code == 1 and "404 no job 'nope'" in result.output
    result = live.fgd("jobs", token="fgd_wrong")
    assert result.exit_code == 1 and "401 invalid or revoked token" in result.output
    assert "FGD_TOKEN" in result.output
    result = live.runner.invoke(app, ["jobs"], env={"FGD_URL": live.url, "FGD_TOKEN": ""})
    assert result.exit_code == 1 and "no API token" in result.output
    dead = f"http://127.0.0.1:{free_port()}"
    result = live.runner.invoke(app, ["jobs", "--url", dead, "--token", "t"])
    assert result.exit_code == 1 and f"cannot reach the API at {dead}" in result.output
    result = live.fgd("submit", tmp_path / "missing.yaml")
    assert result.exit_code == 1 and "missing.yaml" in result.output


# --- submit --wait ------------------------------------------------------------------------------


def _submit_and_drive(live: Live, tmp_path: Path, final: str, **finish: Any) -> Any:
    """`fgd submit --wait` while a thread moves the job along as the dispatch loop would."""
    seen: list[str] = []

    def drive() -> None:
        deadline = time.monotonic() + 20
        while not seen and time.monotonic() < deadline:
            jobs = live.api.get("/jobs").json()["data"]
            seen.extend(j["id"] for j in jobs)
            time.sleep(0.05)
        job_id = seen[0]
        best = {"name": "bbox_AP", "value": 0.25, "mode": "max", "run_id": "r1"}
        live.move(job_id, "dispatched", "running", progress={"trials_done": 1, "best": best})
        time.sleep(0.3)
        best = {**best, "value": 0.375}
        done = {"trials_done": 2, "trials_failed": 1, "best": best}
        live.move(job_id, final, progress=done, **finish)

    driver = threading.Thread(target=drive)
    driver.start()
    result = live.fgd("submit", spec_file(tmp_path, sweep=SWEEP), "--wait", "--poll-seconds", 0.1)
    driver.join()
    return result


@sqlite_only
def test_submit_wait_follows_progress_to_success(live: Live, tmp_path: Path) -> None:
    result = _submit_and_drive(live, tmp_path, "SUCCEEDED")
    assert result.exit_code == 0, result.output
    assert "3/3 trials" in result.output  # the spec's num_samples is the total
    assert "best bbox_AP 0.375" in result.output and "SUCCEEDED" in result.output


@sqlite_only
def test_submit_wait_exits_non_zero_when_the_job_fails(live: Live, tmp_path: Path) -> None:
    result = _submit_and_drive(live, tmp_path, "FAILED", error="trial 2 ran out of memory")
    assert result.exit_code == 1, result.output
    assert "FAILED" in result.output and "trial 2 ran out of memory" in result.output
    assert "fgd logs" in result.output


# --- logs ---------------------------------------------------------------------------------------


@sqlite_only
def test_logs_plain_and_followed_over_server_sent_events(live: Live) -> None:
    job_id = live.api.submit().json()["id"]
    live.move(job_id, "dispatched", "running")
    with live.api.store.session() as session:
        crud.append_logs(session=session, job_id=job_id, attempt=1, chunks=["one\n", "two\n"])
    assert ok(live.fgd("logs", job_id)) == "one\ntwo\n"

    def later() -> None:
        time.sleep(0.3)
        with live.api.store.session() as session:
            chunks = ["three\nfour\n", "five\n"]
            crud.append_logs(session=session, job_id=job_id, attempt=1, chunks=chunks)
        time.sleep(0.2)
        live.move(job_id, "SUCCEEDED")

    writer = threading.Thread(target=later)
    writer.start()
    started = time.monotonic()
    out = ok(live.fgd("logs", job_id, "-f"))
    writer.join()
    assert out.startswith("one\ntwo\nthree\nfour\nfive\n"), out
    assert f"-- job {job_id} SUCCEEDED" in out
    assert time.monotonic() - started < 10
    result = live.fgd("logs", "nope", "--follow")
    assert result.exit_code == 1 and "404" in result.output


# --- results and compare ------------------------------------------------------------------------


def _finished_with_trials(live: Live, parent: str, name: str) -> str:
    job_id = live.api.submit(name=name, spec=spec(sweep=SWEEP)).json()["id"]
    live.move(job_id, "dispatched", "running", mlflow_experiment_id="1", mlflow_run_id=parent)
    live.move(job_id, "SUCCEEDED")
    return job_id


@sqlite_only
def test_results_and_compare_tables(live: Live) -> None:
    live.api.results.runs += [
        fake_run("p1", "a", 0.30),
        fake_run("p1", "b", None, "FAILED"),
        fake_run("p1", "c", 0.41),
        fake_run("p2", "d", 0.25),
    ]
    live.api.results.runs[2].data.params = {"alpha": "2e-4"}  # the searched value differs
    done = _finished_with_trials(live, "p1", "done")
    other = _finished_with_trials(live, "p2", "other")

    board = ok(live.fgd("results", done))
    lines = [line for line in board.splitlines() if "trial-" in line]
    assert [line.split()[1] for line in lines] == ["1", "2", "-"]  # rank column
    assert "trial-c" in lines[0] and "0.41" in lines[0] and "0.0002" in lines[0]
    assert "alpha" in board and f"job {done}: 3 trials by bbox_AP (max)" in board
    assert json.loads(ok(live.fgd("results", done, "--json")))["rows"][0]["value"] == 0.41

    table = ok(live.fgd("compare", done, other))
    row = {name: line for line in table.splitlines() for name in ("done", "other") if name in line}
    assert "0.41" in row["done"] and "trial-c" in row["done"] and "3" in row["done"]
    assert "0.25" in row["other"] and "trial-d" in row["other"]

    queued = live.api.submit(name="queued").json()["id"]
    result = live.fgd("results", queued)
    assert result.exit_code == 1 and "404" in result.output and "QUEUED" in result.output


def test_results_render_sections_the_api_adds() -> None:
    from rich.console import Console

    from fgd_cli.views import results_view

    trial = {"run_id": "r", "name": "t0", "status": "FINISHED", "params": {}, "metrics": {}}
    answer = {
        "job_id": "j",
        "metric": "bbox_AP",
        "mode": "max",
        "rows": [{"rank": 1, "value": 0.5, "trial": trial}],
        "extra": {
            "summary": {"teacher_AP": 0.61, "student_AP": 0.5, "gain": 0.04},
            "pairs": [{"seed": 0, "baseline": 0.46, "fgd": 0.5}],
            "note": "two seeds",
        },
        "plots": ["alpha.png", "temp.png"],
    }
    console = Console(width=120, record=True, file=io.StringIO())
    console.print(results_view(answer))
    text = console.export_text()
    for part in ("extra.summary", "teacher_AP", "0.61", "extra.pairs", "baseline", "0.46"):
        assert part in text, (part, text)
    assert "extra.note: two seeds" in text and "plots: alpha.png, temp.png" in text
