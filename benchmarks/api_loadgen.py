"""The open-loop load generator of ``api_load.py``: requests on a fixed schedule, each sent
when due on a keep-alive connection of its client, and percentiles of what came back."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import statistics
import uuid
from collections import Counter
from dataclasses import dataclass
from typing import Any

import httpx

ROUTES = ("post_jobs", "get_jobs", "healthz")
REQUEST_TIMEOUT = 60.0  # seconds; a request not answered by then counts as an error


@dataclass
class Sample:
    route: str
    due: float  # when it was due (loop clock)
    sent: float  # when the client could send it
    done: float
    status: int


def request_plan(n: int, mix: dict[str, float], seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return rng.choices(list(mix), weights=list(mix.values()), k=n)


class Connection:
    """A minimal HTTP/1.1 keep-alive client over asyncio streams: the load generator shares the
    machine's cores with the server, and a full client (httpx) costs several times the CPU."""

    def __init__(self, host: str, port: int, headers: dict[str, str]) -> None:
        self.host, self.port = host, port
        self.head = "".join(f"{k}: {v}\r\n" for k, v in {"Host": host, **headers}.items())
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, method: str, target: str, body: bytes = b"") -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        extra = f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n" if body else ""
        self.writer.write(f"{method} {target} HTTP/1.1\r\n{self.head}{extra}\r\n".encode() + body)
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        fields = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
        if fields.get("transfer-encoding", "").lower() == "chunked":
            data = bytearray()
            while size := int((await self.reader.readuntil(b"\r\n")).strip(), 16):
                data += await self.reader.readexactly(size + 2)
            await self.reader.readuntil(b"\r\n")
            payload = bytes(data)
        else:
            payload = await self.reader.readexactly(int(fields.get("content-length", "0")))
        if fields.get("connection", "").lower() == "close":
            await self.close()
        return status, payload

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(OSError):
                await self.writer.wait_closed()
        self.reader = self.writer = None


async def run_load(
    url: str,
    tokens: list[str],
    *,
    rate: float,
    clients: int,
    seconds: float,
    mix: dict[str, float],
    spec: dict[str, Any],
    max_inflight: int = 16,
) -> list[Sample]:
    """Send ``rate * seconds`` requests on a fixed schedule; return one sample per request.

    A POST submits ``spec`` under a name and idempotency key of its own.
    """
    target = httpx.URL(url)
    host, port = target.host, target.port or 80
    prefix = target.path.rstrip("/")
    n = int(rate * seconds)
    plan = request_plan(n, mix)
    loop = asyncio.get_running_loop()
    t0 = loop.time() + 1.0
    samples: list[Sample] = []
    run = uuid.uuid4().hex[:8]
    body = json.dumps({"name": "load", "spec": spec})  # the name and key are spliced in below

    async def send(conn: Connection, i: int) -> int:
        route = plan[i]
        if route == "post_jobs":
            named = f'"name": "load-{i}", "idempotency_key": "{run}-{i}"'
            content = body.replace('"name": "load"', named).encode()
            return (await conn.request("POST", f"{prefix}/jobs", content))[0]
        if route == "get_jobs":
            return (await conn.request("GET", f"{prefix}/jobs?limit=100"))[0]
        return (await conn.request("GET", f"{prefix}/healthz"))[0]

    async def client(c: int) -> None:
        """Client ``c``'s requests, each sent when due on an idle connection of the client (a
        new one when all are busy, up to ``max_inflight``): it never waits for an answer to
        send the next request, so the server's queueing shows in the latencies."""
        headers = {"Authorization": f"Bearer {tokens[c % len(tokens)]}"}
        idle: list[Connection] = []
        slots = asyncio.Semaphore(max_inflight)

        async def one(i: int, due: float) -> None:
            sent, status = loop.time(), 0
            try:
                while idle:  # a kept-alive connection the server closed meanwhile: the next
                    conn = idle.pop()
                    with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
                        status = await asyncio.wait_for(send(conn, i), REQUEST_TIMEOUT)
                        idle.append(conn)
                        return
                    await conn.close()
                conn = Connection(host, port, headers)
                status = await asyncio.wait_for(send(conn, i), REQUEST_TIMEOUT)
                idle.append(conn)
            except (OSError, asyncio.IncompleteReadError, ValueError, TimeoutError):
                await conn.close()
            finally:
                slots.release()
                samples.append(Sample(plan[i], due, sent, loop.time(), status))

        tasks = []
        for i in range(c, n, clients):
            due = t0 + i / rate
            delay = due - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            await slots.acquire()  # only past max_inflight does the client fall behind
            tasks.append(asyncio.create_task(one(i, due)))
        await asyncio.gather(*tasks)
        for conn in idle:
            await conn.close()

    await asyncio.gather(*(client(c) for c in range(clients)))
    return samples


def _pct(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    pos = (len(sorted_values) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def summarize(samples: list[Sample], since: float, until: float) -> dict[str, Any]:
    """Per route: count, errors, latency (due → done) and service time (sent → done) in ms."""
    ok = {"post_jobs": (200, 201), "get_jobs": (200,), "healthz": (200,)}
    out: dict[str, Any] = {}
    for route in ROUTES:
        mine = [s for s in samples if s.route == route and since <= s.due < until]
        lat = sorted((s.done - s.due) * 1e3 for s in mine)
        svc = sorted((s.done - s.sent) * 1e3 for s in mine)
        out[route] = {
            "requests": len(mine),
            "errors": sum(s.status not in ok[route] for s in mine),
            "error_statuses": dict(Counter(s.status for s in mine if s.status not in ok[route])),
            "p50_ms": _pct(lat, 0.50),
            "p90_ms": _pct(lat, 0.90),
            "p99_ms": _pct(lat, 0.99),
            "max_ms": lat[-1] if lat else float("nan"),
            "service_p50_ms": _pct(svc, 0.50),
            "service_p99_ms": _pct(svc, 0.99),
        }
    health = out["healthz"]
    for route in ROUTES:
        out[route]["p50_over_healthz"] = out[route]["p50_ms"] / health["p50_ms"]
        out[route]["p99_over_healthz"] = out[route]["p99_ms"] / health["p99_ms"]
    return out


def median_of(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Each figure's median over the rounds (the machine is shared: one round can be unlucky),
    the ratios to /healthz taken of the medians; the rounds themselves under ``rounds``."""
    if len(rounds) == 1:
        return {**rounds[0], "rounds": rounds}
    out: dict[str, Any] = {"rounds": rounds}
    for route in ROUTES:
        out[route] = {
            key: statistics.median(r[route][key] for r in rounds)
            for key, value in rounds[0][route].items()
            if isinstance(value, int | float)
        }
    for route in ROUTES:
        for q in ("p50", "p99"):
            out[route][f"{q}_over_healthz"] = out[route][f"{q}_ms"] / out["healthz"][f"{q}_ms"]
    out["cpu"] = {
        key: None if value is None else statistics.median(r["cpu"][key] for r in rounds)
        for key, value in rounds[0]["cpu"].items()
    }
    out["achieved_rate"] = statistics.median(r["achieved_rate"] for r in rounds)
    return out
