"""A small client of the REST API (httpx): one method per route, errors as one-line messages.

Every HTTP or connection error becomes an ``ApiError`` (a ``CliError``) whose message is the
API's own: ``detail`` for most errors, ``message`` (each field named) for a 422.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx

from fgd_cli.console import CliError

DEFAULT_URL = "http://127.0.0.1:8000"
FINAL_STATES = ("SUCCEEDED", "FAILED", "CANCELLED")


class ApiError(CliError):
    """The API answered an error, or could not be reached."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def error_message(response: httpx.Response) -> str:
    """The API's message in ``response`` (a 4xx or 5xx), prefixed with the status code."""
    try:
        body = response.json()
    except ValueError:
        body = None
    text = response.text.strip()[:500] or response.reason_phrase
    if isinstance(body, dict):
        if isinstance(body.get("message"), str):  # 422: "body.spec.x: msg; ..."
            text = body["message"]
        elif isinstance(body.get("detail"), str):
            text = body["detail"]
        elif body.get("detail") is not None:
            text = json.dumps(body["detail"])
    hint = ""
    if response.status_code == 401:
        hint = " (give a token with --token or FGD_TOKEN; make one with `fgd token create`)"
    return f"{response.status_code} {text}{hint}"


class ApiClient:
    """The API at ``url`` as the holder of ``token``."""

    def __init__(self, url: str, token: str | None, *, timeout: float = 30.0) -> None:
        self.url = url.rstrip("/")
        self.token = token
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> ApiClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _need_token(self) -> None:
        if not self.token:
            raise ApiError(
                "no API token: pass --token or set FGD_TOKEN "
                "(make one with `fgd token create` on the server's machine)"
            )

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        self._need_token()
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.TimeoutException:
            raise ApiError(f"the API at {self.url} did not answer in time") from None
        except httpx.HTTPError as exc:
            raise ApiError(
                f"cannot reach the API at {self.url} ({exc}); is `fgd serve` running? "
                "(set --url or FGD_URL)"
            ) from None
        if response.is_error:
            raise ApiError(error_message(response), response.status_code)
        return response

    # --- one method per route -------------------------------------------------------------

    def submit(
        self,
        spec: dict[str, Any],
        *,
        name: str,
        priority: int = 0,
        idempotency_key: str | None = None,
        max_attempts: int | None = None,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"name": name, "priority": priority, "spec": spec}
        if idempotency_key:
            body["idempotency_key"] = idempotency_key
        if max_attempts is not None:
            body["max_attempts"] = max_attempts
        return dict(self.request("POST", "/jobs", json=body).json())

    def jobs(self, *, state: str | None = None, limit: int = 100) -> dict[str, Any]:
        params: dict[str, Any] = {"limit": limit}
        if state:
            params["state"] = state.upper()
        return dict(self.request("GET", "/jobs", params=params).json())

    def job(self, job_id: str) -> dict[str, Any]:
        return dict(self.request("GET", f"/jobs/{job_id}").json())

    def cancel(self, job_id: str) -> dict[str, Any]:
        return dict(self.request("POST", f"/jobs/{job_id}/cancel").json())

    def logs(self, job_id: str) -> str:
        return self.request("GET", f"/jobs/{job_id}/logs").text

    def results(self, job_id: str) -> dict[str, Any]:
        return dict(self.request("GET", f"/jobs/{job_id}/results").json())

    def compare(self, job_ids: list[str]) -> dict[str, Any]:
        params = [("job", j) for j in job_ids]
        return dict(self.request("GET", "/compare", params=params).json())

    def follow_logs(self, job_id: str) -> Iterator[tuple[str, str]]:
        """The server-sent events of ``GET /jobs/{id}/logs?follow=true`` as (event, data).

        ``log`` events carry a chunk of the log; the last one is ``end`` (data: the final state
        as JSON). Keep-alive comments are skipped.
        """
        self._need_token()
        url = f"/jobs/{job_id}/logs"
        try:
            with self.http.stream(
                "GET", url, params={"follow": "true"}, timeout=httpx.Timeout(30.0, read=None)
            ) as response:
                if response.is_error:
                    response.read()
                    raise ApiError(error_message(response), response.status_code)
                yield from parse_sse(response.iter_lines())
        except httpx.HTTPError as exc:
            raise ApiError(f"the log stream from {self.url} broke off ({exc})") from None


def parse_sse(lines: Iterator[str]) -> Iterator[tuple[str, str]]:
    """(event, data) of each event in a text/event-stream given line by line.

    Multi-line data (several ``data:`` lines) is joined with newlines, as EventSource does.
    """
    event, data = "message", list[str]()
    for line in lines:
        if line == "":
            if data:
                yield event, "\n".join(data)
            event, data = "message", list[str]()
            continue
        if line.startswith(":"):
            continue
        key, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if key == "event":
            event = value
        elif key == "data":
            data.append(value)
    if data:
        yield event, "\n".join(data)
