"""Job logs: plain text, and the server-sent event stream that follows a job to its end."""

from __future__ import annotations

import json
import threading
import time

from test_service_support import Api

from service import crud
from service.models import Job, JobState

pytest_plugins = ["test_service_support"]  # the store / api fixtures


def _running_job(api: Api) -> str:
    job_id = api.submit().json()["id"]
    with api.store.session() as session:
        job = session.get(Job, job_id)
        assert job is not None
        crud.mark_dispatched(session=session, job=job, submission_id=f"fgd-{job_id}-1")
        crud.mark_running(session=session, job=job)
    return job_id


def _append(api: Api, job_id: str, *chunks: str) -> None:
    with api.store.session() as session:
        crud.append_logs(session=session, job_id=job_id, attempt=1, chunks=list(chunks))


def _finish(api: Api, job_id: str) -> None:
    with api.store.session() as session:
        job = session.get(Job, job_id)
        assert job is not None
        crud.mark_finished(session=session, job=job, state=JobState.SUCCEEDED)


def _events(text: str) -> list[dict[str, str]]:
    events = []
    for block in text.strip().split("\n\n"):
        event: dict[str, str] = {}
        for line in block.split("\n"):
            key, _, value = line.partition(": ")
            event[key] = f"{event[key]}\n{value}" if key in event else value
        events.append(event)
    return events


def test_plain_logs_and_cursor(api: Api) -> None:
    job_id = _running_job(api)
    _append(api, job_id, "step 1\n", "step 2\n")
    r = api.get(f"/jobs/{job_id}/logs")
    assert r.status_code == 200 and r.text == "step 1\nstep 2\n"
    assert r.headers["content-type"].startswith("text/plain")
    cursor = r.headers["X-Log-Cursor"]
    _append(api, job_id, "step 3\n")
    assert api.get(f"/jobs/{job_id}/logs", params={"after": cursor}).text == "step 3\n"


def test_follow_streams_stored_then_new_chunks_until_final(api: Api) -> None:
    job_id = _running_job(api)
    _append(api, job_id, "first\n", "multi\nline")

    def later() -> None:
        time.sleep(0.2)
        _append(api, job_id, "late\n")
        time.sleep(0.1)
        _finish(api, job_id)

    writer = threading.Thread(target=later)
    writer.start()
    started = time.monotonic()
    with api.client.stream(
        "GET", f"/jobs/{job_id}/logs", params={"follow": "true"}, headers=api.headers()
    ) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        text = "".join(r.iter_text())
    writer.join()
    assert time.monotonic() - started < 5
    events = _events(text)
    logs = [e["data"] for e in events if e.get("event") == "log"]
    assert logs == ["first\n", "multi\nline", "late\n"]
    assert events[-1]["event"] == "end" and json.loads(events[-1]["data"]) == {"state": "SUCCEEDED"}
    ids = [int(e["id"]) for e in events if e.get("event") == "log"]
    assert ids == sorted(ids)
    # A reconnecting EventSource sends Last-Event-ID and gets only what came after.
    r = api.get(
        f"/jobs/{job_id}/logs", params={"follow": "true"}, headers={"Last-Event-ID": str(ids[1])}
    )
    assert [e["data"] for e in _events(r.text) if e.get("event") == "log"] == ["late\n"]


def test_follow_of_a_finished_job_without_logs_ends_at_once(api: Api) -> None:
    job_id = api.submit().json()["id"]
    api.post(f"/jobs/{job_id}/cancel")
    r = api.get(f"/jobs/{job_id}/logs", params={"follow": "true"})
    assert _events(r.text) == [{"event": "end", "data": '{"state": "CANCELLED"}'}]
