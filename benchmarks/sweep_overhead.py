"""Benchmark: the cost of running trainings as a Ray Tune sweep logged to MLflow.

Runs 8 trainings of about 20 s each (at one thread) on this machine's CPUs: through Tune and
MLflow with 2 concurrent trials, the same 8 trainings directly in a process pool of 2 workers,
and through Tune with 1 concurrent trial. Prints the overhead ratio (Tune / pool, target
<= 1.10) and the throughput of 2 concurrent trials against 1.

Both sides start from a parent that has imported its own code (the pool's parent fgd_core,
the sweep's driver Ray Tune and MLflow); the clock runs from the first training's submission
to the last one's end. Tune's trial processes are fresh Ray workers that import torch
themselves, so the headline pool is one of fresh processes too (``spawn``); the pool of
processes forked from the parent, which inherit its imports, is measured and reported as well.
The number of steps is calibrated so that a training takes ``--seconds`` alone on one thread,
unless ``--iterations`` is given.

A shared machine's speed drifts by several per cent over minutes. ``--repeat N`` measures N
rounds of the three 2-CPU runs (the sweep, the fresh pool, the forked pool), in an order that
rotates from round to round so that each is measured early and late, and reports each
round's ratios and their medians (the headline).

    python benchmarks/sweep_overhead.py [--trials 8] [--seconds 20 | --iterations N]
        [--repeat 1] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

ALPHAS = [1e-6, 3e-6, 1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2]


def job_dict(root: Path, iterations: int) -> dict[str, Any]:
    model = {
        "arch": "retinanet",
        "backbone": "resnet18",
        "fpn_channels": 32,
        "min_size": 128,
        "max_size": 128,
    }
    return {
        "kind": "baseline",
        "data": {
            "shapes": {
                "root": str(root / "shapes"),
                "num_train": 256,
                "num_val": 32,
                "image_size": 128,
                "seed": 0,
            }
        },
        "model": model,
        "train": {
            "batch_size": 8,
            "schedule": {"iterations": iterations, "warmup_iters": 5},
            "eval_every": iterations,
            "checkpoint_every": iterations,
            "log_every": 10,
            "eval_batch_size": 8,
        },
    }


def direct_training(args: tuple[dict[str, Any], float]) -> float:
    """One training in a pool worker, one torch thread, no Tune and no MLflow."""
    job, alpha = args
    import torch

    from fgd_core.training.jobs import run_job
    from workers.convert import job_config
    from workers.spec import JobSpec

    torch.set_num_threads(1)
    spec = JobSpec.model_validate({**job, "fgd": {"alpha": alpha}})
    t0 = time.perf_counter()
    run_job(job_config(spec))
    return time.perf_counter() - t0


def run_pool(job: dict[str, Any], trials: int, workers: int, start: str) -> float:
    context = multiprocessing.get_context(start)
    t0 = time.perf_counter()
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        list(pool.map(direct_training, [(job, a) for a in ALPHAS[:trials]]))
    return time.perf_counter() - t0


def calibrate(root: Path, seconds: float) -> int:
    """Steps for a training of about ``seconds`` alone on one thread (two timed trainings)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        short, long = (direct_training((job_dict(root, n), 1e-6)) for n in (8, 24))
    finally:
        torch.set_num_threads(threads)
    per_step = max((long - short) / 16, 1e-3)
    steps = round((seconds - (short - 8 * per_step)) / per_step)
    print(f"calibration: 8 steps {short:.1f} s, 24 steps {long:.1f} s -> {steps} steps")
    return max(8, steps)


def import_driver() -> None:
    """What the sweep's driver imports on its first sweep (outside the timings, as the pool's
    parent has imported fgd_core before it forks)."""
    import mlflow  # noqa: F401
    import ray.tune  # noqa: F401
    import ray.tune.schedulers  # noqa: F401

    import workers.distill_report  # noqa: F401
    import workers.report  # noqa: F401
    import workers.sweep  # noqa: F401
    import workers.trainable  # noqa: F401


def run_tune(
    job: dict[str, Any], trials: int, concurrent: int, uri: str, storage: Path, name: str
) -> float:
    from workers.spec import JobSpec
    from workers.sweep import run_sweep

    sweep = {
        "space": {"alpha": {"grid": ALPHAS[:trials]}},
        "max_concurrent_trials": concurrent,
        "resources": {"cpu": 1},
    }
    spec = JobSpec.model_validate({**job, "sweep": sweep})
    t0 = time.perf_counter()
    result = run_sweep(spec, name=name, tracking_uri=uri, storage_path=str(storage))
    elapsed = time.perf_counter() - t0
    print(f"{name}: {elapsed:.1f} s, driver phases {result.timings}")
    return elapsed


def _tune_round(
    job: dict[str, Any], trials: int, concurrent: int, uri: str, work: Path, index: int
) -> float:
    """One sweep on a fresh 2-CPU Ray runtime."""
    import ray

    from workers.sweep import start_local_ray

    start_local_ray(num_cpus=2)  # as `fgd sweep` starts one without RAY_ADDRESS
    try:
        name = f"concurrent-{concurrent}-round-{index + 1}"
        return run_tune(job, trials, concurrent, uri, work / "tune", name)
    finally:
        ray.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=20.0, help="a training alone, about")
    parser.add_argument("--iterations", type=int, help="steps per training (else calibrated)")
    parser.add_argument("--repeat", type=int, default=1, help="rounds; medians reported")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()

    from workers.convert import resolve_data
    from workers.spec import JobSpec
    from workers.tracking_server import start_server

    work = Path(tempfile.mkdtemp(prefix="fgd-sweep-bench-"))
    resolve_data(JobSpec.model_validate(job_dict(work, 8)).data)  # the data, outside timings
    iterations = args.iterations or calibrate(work, args.seconds)
    job = job_dict(work, iterations)
    import_driver()
    server = start_server(
        f"sqlite:///{work / 'mlflow.db'}", str(work / "artifacts"), log_path=work / "mlflow.log"
    )
    cpus = 2
    runs: dict[str, Callable[[int], float]] = {
        "tune_2_concurrent_s": lambda r: _tune_round(job, args.trials, 2, server.uri, work, r),
        "pool_2_workers_s": lambda r: run_pool(job, args.trials, cpus, "spawn"),
        "pool_2_workers_fork_s": lambda r: run_pool(job, args.trials, cpus, "fork"),
    }
    names = list(runs)
    rounds: list[dict[str, float]] = []
    try:
        for r in range(args.repeat):
            turn = r % len(names)  # each run goes first in turn
            row = {name: runs[name](r) for name in names[turn:] + names[:turn]}
            row["overhead_ratio"] = row["tune_2_concurrent_s"] / row["pool_2_workers_s"]
            row["overhead_ratio_fork_pool"] = (
                row["tune_2_concurrent_s"] / row["pool_2_workers_fork_s"]
            )
            rounds.append(row)
            print(f"round {r + 1}/{args.repeat}: {json.dumps(row)}", flush=True)
        tune_1 = _tune_round(job, args.trials, 1, server.uri, work, args.repeat)
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    results: dict[str, Any] = {
        "trials": args.trials,
        "iterations": iterations,
        "repeat": args.repeat,
        **{key: statistics.median(r[key] for r in rounds) for key in rounds[0]},
        "tune_1_concurrent_s": tune_1,
    }
    tune_2, pool_2, pool_fork = (results[k] for k in names)
    results |= {
        "throughput_2_over_1": tune_1 / tune_2,
        "mean_training_s": pool_fork * cpus / args.trials,
        "rounds": rounds,
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": sys.version.split()[0],
        },
    }
    print(
        f"{args.trials} trainings of {iterations} steps: Tune+MLflow (2 concurrent) {tune_2:.1f} s, "
        f"process pool (2 workers) {pool_2:.1f} s fresh, {pool_fork:.1f} s forked, "
        f"Tune (1 concurrent) {tune_1:.1f} s"
    )
    print(f"mean training {results['mean_training_s']:.1f} s")
    median = f"median of {args.repeat} rounds" if args.repeat > 1 else "one round"
    print(f"overhead ratio {results['overhead_ratio']:.2f}  (target <= 1.10; {median})")
    print(f"overhead ratio against the forked pool {results['overhead_ratio_fork_pool']:.2f}")
    print(f"throughput 2 concurrent / 1 concurrent {results['throughput_2_over_1']:.2f}x")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sweep_overhead.json").write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out / 'sweep_overhead.json'}")


if __name__ == "__main__":
    main()
