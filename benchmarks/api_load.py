"""Benchmark: REST API latency under an open-loop load, on PostgreSQL, while jobs are dispatched.

``--clients`` clients (50) send requests at a fixed total arrival rate (``--rate``, 200/s):
request ``i`` is due at ``t0 + i / rate`` and goes to client ``i % clients``, which sends it
then, whether or not its earlier ones were answered (on an idle keep-alive connection of its
own, or a new one: at most 16 in flight per client). Latency runs from the due time to the
last byte of the response, so it includes the server's queueing (no coordinated omission).
The mix is POST /jobs, GET /jobs (one page of 100) and GET /healthz (``--mix``); p50/p99 of
each route are compared with /healthz's, measured in the same run.

The server is ``uvicorn service.main:app`` in a subprocess (``--workers`` processes) on a fresh
PostgreSQL database (created on 127.0.0.1:5432, dropped at the end) holding ``--jobs`` finished
jobs before the load starts, all of the one tenant whose token the clients share (``--tenants``
spreads clients and jobs over more tenants): its listing counts and pages over all of them.

Dispatch runs during the load: the app's dispatch loop submits the queued jobs as Ray Jobs to a
local Ray head started here (``FGD_DISPATCH_NOOP``: each runs ``workers.entrypoint --noop`` and
exits at once). The head stands in for a remote cluster: it and every process it starts run
under SCHED_IDLE (nice 19 is not enough: each Ray job starts new Python processes, whose kernel
work is not preempted) on the machine's last CPU only, with its session directory in
/dev/shm. Even so, on a 2-CPU machine the cluster's processes delay the API's (see
docs/api_load.md). ``--ray-cpus 8-15`` gives the head those CPUs instead (normal scheduling,
nice 19) and keeps this process, the server and the load generator off them, as if the
cluster ran on a machine of its own (start PostgreSQL on the other CPUs too, with taskset).
``--dispatch none`` runs without it.

The machine may be shared: ``--repeat N`` measures N rounds on the same server and reports
each figure's median, and the JSON records the CPU the server, PostgreSQL, the load generator
and the whole machine used meanwhile.

    python benchmarks/api_load.py [--rate 200] [--clients 50] [--duration 30] [--jobs 10000]
        [--workers 1 [2 ...]] [--threads 8] [--repeat 1] [--dispatch ray|none] [--ray-cpus 8-15]
        [--out benchmarks/results]
    python benchmarks/api_load.py --url http://host:8000 --database-url postgresql+psycopg://...
    python benchmarks/api_load.py --url http://host:8000 --token fgd_...   # no seeding
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from api_loadgen import ROUTES, median_of, run_load, summarize
from api_stack import (
    DATA_ROOT,
    PG_SERVER,
    SPEC,
    ApiServer,
    RayHead,
    job_states,
    machine_busy,
    postgres_cpu_seconds,
    remove_tenants,
    scratch_database,
    seed_store,
)

TARGET_P99_MS = {"post_jobs": 50.0, "get_jobs": 100.0}


def measure(
    url: str, tokens: list[str], args: argparse.Namespace, server: ApiServer | None
) -> dict[str, Any]:
    """Warm up, then load for ``args.duration`` s; the summary of the measured window."""
    seconds = args.warmup + args.duration
    cpu0, busy0, server0, pg0 = time.process_time(), machine_busy(), 0.0, postgres_cpu_seconds()
    if server is not None:
        server0 = server.cpu_seconds()
    wall0 = time.monotonic()
    samples = asyncio.run(
        run_load(
            url,
            tokens,
            rate=args.rate,
            clients=args.clients,
            seconds=seconds,
            mix=args.mix,
            spec=SPEC,
        )
    )
    wall = time.monotonic() - wall0
    busy1 = machine_busy()
    t0 = min(s.due for s in samples)
    result = summarize(samples, t0 + args.warmup, t0 + seconds)
    ncpu = os.cpu_count() or 1
    result["cpu"] = {  # over warm-up and measurement together, in cores
        "load_generator": (time.process_time() - cpu0) / wall,
        "server": None if server is None else (server.cpu_seconds() - server0) / wall,
        "postgres": (postgres_cpu_seconds() - pg0) / wall,
        "machine_busy": (busy1[0] - busy0[0]) / max(busy1[1] - busy0[1], 1.0) * ncpu,
        "machine_cores": ncpu,
    }
    last_due = max(s.due for s in samples)
    result["achieved_rate"] = len(samples) / (last_due - t0) if last_due > t0 else float("nan")
    return result


# --- main ----------------------------------------------------------------------------------------


def _mix(text: str) -> dict[str, float]:
    names = {"post": "post_jobs", "list": "get_jobs", "health": "healthz"}
    out = {}
    for part in text.split(","):
        key, _, weight = part.partition("=")
        if key.strip() not in names:
            raise argparse.ArgumentTypeError(f"unknown route {key!r}: post, list or health")
        out[names[key.strip()]] = float(weight)
    if set(out) != set(ROUTES):
        raise argparse.ArgumentTypeError("--mix needs post=, list= and health= weights")
    return out


def _cpu_list(text: str) -> set[int]:
    """``0-3,8`` -> {0, 1, 2, 3, 8}: CPUs this machine has."""
    cpus: set[int] = set()
    try:
        for part in text.split(","):
            first, _, last = part.strip().partition("-")
            cpus.update(range(int(first), int(last or first) + 1))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a CPU list: {text!r} (e.g. 8-15 or 6,7)") from None
    mine = os.sched_getaffinity(0)
    if not cpus or not cpus < mine:
        raise argparse.ArgumentTypeError(
            f"--ray-cpus must be some, not all, of this process's CPUs {_cpu_text(mine)}"
        )
    return cpus


def _cpu_text(cpus: set[int] | None) -> str:
    return ",".join(str(c) for c in sorted(cpus or ()))


def _server_env(home: Path, database_url: str, ray: RayHead | None, args: Any) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FGD_")}
    env.pop("RAY_ADDRESS", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    env |= {
        "FGD_HOME": str(home),
        "FGD_DATABASE_URL": database_url,
        "FGD_DATA_ROOTS": DATA_ROOT,
        "FGD_MAX_CONCURRENT_JOBS": str(args.max_concurrent_jobs),
        "FGD_THREADS": str(args.threads),
        "FGD_DISPATCH": "none",
    }
    if ray is not None:
        env |= ray.env() | {
            "FGD_DISPATCH": "ray",
            "FGD_DISPATCH_NOOP": "true",
            "FGD_RAY_PYTHON": sys.executable,
        }
    return env


def run_local(args: argparse.Namespace, home: Path) -> dict[str, Any]:
    """Start the Ray head (unless ``--dispatch none``), then per worker count: a fresh database,
    the seeded store, the server, the load."""
    runs: dict[str, Any] = {}
    ray = None
    if args.dispatch == "ray":
        own_cpus = args.ray_cpus is not None
        ray = RayHead(home, idle=not own_cpus, temp_root="/dev/shm", cpus=args.ray_cpus)
    try:
        if ray is not None:
            where = f"on CPUs {_cpu_text(ray.cpus)}" if ray.cpus else "under SCHED_IDLE"
            print(f"starting a Ray head {where} ...", flush=True)
            ray.start()
        for workers in args.workers:
            with scratch_database(args.pg) as database_url:
                t = time.monotonic()
                tokens, _ = seed_store(database_url, tenants=args.tenants, jobs=args.jobs)
                print(f"seeded {args.jobs} jobs in {time.monotonic() - t:.1f}s", flush=True)
                log = home / f"api-{workers}.log"
                server = ApiServer(_server_env(home, database_url, ray, args), workers, log)
                server.start()
                try:
                    before = job_states(database_url)
                    rounds = []
                    for i in range(args.repeat):
                        what = f"{workers} worker(s), {args.rate:g} req/s"
                        print(f"load: {what}, round {i + 1}/{args.repeat} ...", flush=True)
                        rounds.append(measure(server.url, tokens, args, server))
                        if args.repeat > 1:
                            report(f"round {i + 1}", rounds[-1])
                    after = job_states(database_url)
                    result = median_of(rounds)
                finally:
                    server.stop()
                result["jobs_by_state_before"], result["jobs_by_state_after"] = before, after
                result["server_log_tail"] = log.read_text()[-2000:]
                runs[f"workers_{workers}"] = result
                title = f"{workers} worker(s), median of {args.repeat}" if args.repeat > 1 else ""
                report(title or f"{workers} worker(s)", result)
    finally:
        if ray is not None:
            ray.stop()
    return runs


def report(title: str, result: dict[str, Any]) -> None:
    print(f"\n{title}: achieved {result['achieved_rate']:.0f} req/s, cpu {result['cpu']}")
    print(
        f"{'route':<10} {'n':>6} {'err':>4} {'p50 ms':>8} {'p99 ms':>8} {'p50/hz':>7} {'p99/hz':>7}"
    )
    for route in ROUTES:
        r = result[route]
        print(
            f"{route:<10} {r['requests']:>6} {r['errors']:>4} {r['p50_ms']:>8.1f} "
            f"{r['p99_ms']:>8.1f} {r['p50_over_healthz']:>7.2f} {r['p99_over_healthz']:>7.2f}"
        )
    for route, target in TARGET_P99_MS.items():
        verdict = "met" if result[route]["p99_ms"] < target else "MISSED"
        print(f"target p99 {route} < {target:g} ms: {verdict}")
    after = result.get("jobs_by_state_after")
    if after is not None:
        print(f"jobs by state: before {result['jobs_by_state_before']}, after {after}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="an existing server (nothing is started)")
    parser.add_argument("--token", help="with --url: a token to use as is (no seeding)")
    parser.add_argument("--database-url", help="with --url: its store, to seed a tenant's jobs")
    parser.add_argument("--rate", type=float, default=200.0, help="requests per second, in all")
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--duration", type=float, default=30.0, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds of load not measured")
    parser.add_argument("--repeat", type=int, default=1, help="measured rounds; medians shown")
    parser.add_argument("--jobs", type=int, default=10_000, help="jobs in the store beforehand")
    parser.add_argument("--tenants", type=int, default=1, help="tokens the clients spread over")
    parser.add_argument("--mix", type=_mix, default=_mix("post=2,list=2,health=1"))
    parser.add_argument("--workers", type=int, nargs="+", default=[1], help="uvicorn workers")
    parser.add_argument("--threads", type=int, default=8, help="FGD_THREADS of each worker")
    parser.add_argument("--dispatch", choices=["ray", "none"], default="ray")
    parser.add_argument("--max-concurrent-jobs", type=int, default=2)
    parser.add_argument(
        "--ray-cpus",
        type=_cpu_list,
        help="CPUs of the Ray head alone (e.g. 8-15); default: "
        "the last CPU, shared, under SCHED_IDLE",
    )
    parser.add_argument("--pg", default=PG_SERVER, help="the PostgreSQL server to use")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    if args.ray_cpus is not None:  # the rest of the machine: this process and all it starts
        os.sched_setaffinity(0, os.sched_getaffinity(0) - args.ray_cpus)

    results: dict[str, Any] = {
        "config": {
            k: (str(v) if isinstance(v, Path) else sorted(v) if isinstance(v, set) else v)
            for k, v in vars(args).items()
            if k not in ("token", "database_url")
        },
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "cpus_of_api_and_load": _cpu_text(os.sched_getaffinity(0)),
        },
    }
    home = Path(tempfile.mkdtemp(prefix="fgd-api-load-"))
    try:
        if args.url:
            ids: list[int] = []
            if args.token:
                tokens = [args.token]
            elif args.database_url:
                tokens, ids = seed_store(args.database_url, tenants=args.tenants, jobs=args.jobs)
            else:
                parser.error("--url needs --token or --database-url")
            try:
                result = measure(args.url.rstrip("/"), tokens, args, None)
            finally:
                if ids:
                    remove_tenants(args.database_url, ids)
            results["runs"] = {"existing_server": result}
            report(args.url, result)
        else:
            results["runs"] = run_local(args, home)
    finally:
        shutil.rmtree(home, ignore_errors=True)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "api_load.json"
    path.write_text(json.dumps(results, indent=2))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
