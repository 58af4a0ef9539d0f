"""Does FGD help? Teacher, baseline students and FGD students on shapes data, per seed.

    python benchmarks/efficacy.py --scale cpu --seeds 3 --data-seed 0 --out DIR

The benchmark is two jobs of the project, run through Ray Tune and MLflow like any other:

1. a teacher job (a ResNet-34 RetinaNet), cached per data seed and configuration under
   ``$FGD_HOME/cache/efficacy/`` so that reruns reuse it;
2. a distill job with a sweep over ``kind: [distill, baseline] x train.seed: [0..N-1]``: per
   seed, the same ResNet-18 student with the same initialisation, data order and schedule,
   once alone and once with FGD. The FGD students share the teacher's features of each
   (image, flip) through ``fgd.teacher_cache`` (``fgd_core.teacher_cache``): the first student
   to meet an image runs the teacher on it, the others read its features from disk.

``DIR/efficacy_job.yaml`` is the same experiment as one self-contained job (the teacher trained
first), for ``fgd sweep`` or ``fgd submit``. Results: ``DIR/efficacy.json`` (AP on COCOeval's
0-1 scale), ``DIR/efficacy.md`` and two plots, also logged to the students' parent MLflow run.
The teacher must lead the baseline by ``MIN_LEAD`` (3 AP points) or nothing can be measured:
the benchmark says so and exits with status 3.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from efficacy_scales import MIN_LEAD, SCALES, Scale  # noqa: E402

from workers.spec import JobSpec  # noqa: E402

EXIT_WEAK_TEACHER = 3


def data_spec(scale: Scale, data_seed: int) -> dict[str, Any]:
    return {"shapes": {**scale.shapes, "seed": data_seed}}


def teacher_job(scale: Scale, data_seed: int) -> JobSpec:
    return JobSpec.model_validate(
        {
            "kind": "teacher",
            "data": data_spec(scale, data_seed),
            "model": scale.teacher_model,
            "train": scale.teacher_train,
            "sweep": {"resources": scale.teacher_resources},
        }
    )


def students_job(scale: Scale, data_seed: int, seeds: int, teacher: dict[str, Any]) -> JobSpec:
    """The distill job whose sweep trains baseline and FGD students for every seed."""
    return JobSpec.model_validate(
        {
            "kind": "distill",
            "data": data_spec(scale, data_seed),
            "model": scale.student_model,
            "teacher": {"model": scale.teacher_model, **teacher},
            "fgd": {**scale.fgd, "teacher_cache": scale.teacher_features_cached},
            "train": scale.student_train,
            "evaluate_teacher": False,  # the teacher job has just been evaluated
            "sweep": {
                "grid": {"kind": ["distill", "baseline"], "train.seed": list(range(seeds))},
                "search": "grid",
                "max_concurrent_trials": scale.max_concurrent,
                "resources": scale.student_resources,
                "max_failures": 1,
            },
        }
    )


def portable_job(scale: Scale, data_seed: int, seeds: int) -> JobSpec:
    """The whole experiment as one job: the teacher trained first, then the students' sweep."""
    training = teacher_job(scale, data_seed).train.model_dump(by_alias=True)
    return students_job(scale, data_seed, seeds, {"train": True, "training": training})


def search_job(scale: Scale, data_seed: int, samples: int, teacher: dict[str, Any]) -> JobSpec:
    """ASHA over the five hyperparameters, a decade either side of the default, at seed 0."""
    job = students_job(scale, data_seed, 1, teacher).to_dict()
    centre = {k: v for k, v in scale.fgd.items() if k != "temp"}
    space: dict[str, Any] = {
        k: {"loguniform": [v / 10, v * 10]} for k, v in centre.items() if v > 0
    }
    space["temp"] = {"uniform": [0.5, 4.0]}
    job["sweep"] = {
        "space": space,
        "search": "random",
        "scheduler": "asha",
        "asha": {"grace_period": 1, "reduction_factor": 2},
        "num_samples": samples,
        "max_concurrent_trials": scale.max_concurrent,
        "resources": scale.student_resources,
    }
    return JobSpec.model_validate(job)


def run_search(args: argparse.Namespace, scale: Scale, teacher: dict[str, Any], **kw: Any) -> int:
    """The sweep example: does search beat the default weights (the pairs' FGD at seed 0)?"""
    from workers.sweep import run_sweep

    job = search_job(scale, args.data_seed, args.search, {"checkpoint": teacher["weights"]})
    name = f"efficacy-search-ds{args.data_seed}-{args.scale}-{time.strftime('%Y%m%d-%H%M%S')}"
    t0 = time.perf_counter()
    result = run_sweep(job, name=name, teacher_metrics=teacher["metrics"], **kw)
    finished = [r for r in result.rows if r.run_status == "FINISHED" and "bbox_AP" in r.metrics]
    best = max(finished, key=lambda r: r.metrics["bbox_AP"]) if finished else None
    previous = args.out / "efficacy.json"
    default = None
    if previous.is_file():
        pairs = json.loads(previous.read_text())
        if (
            pairs["config"]["scale"] == args.scale
            and pairs["config"]["data_seed"] == args.data_seed
        ):
            default = pairs["fgd_ap"][0]
    out = {
        "trials": len(result.rows),
        "finished": len(finished),
        "best_ap": best.metrics["bbox_AP"] if best else None,
        "best_config": best.config if best else None,
        "default_fgd_ap_seed0": default,
        "search_beats_default": None
        if best is None or default is None
        else best.metrics["bbox_AP"] > default,
        "teacher_ap": teacher["metrics"]["bbox_AP"],
        "wall_time_s": time.perf_counter() - t0,
        "mlflow": {"parent_run_id": result.parent_run_id, "experiment_id": result.experiment_id},
        "space": job.sweep.model_dump() if job.sweep else None,
    }
    (args.out / "search.json").write_text(json.dumps(out, indent=1))
    print(json.dumps({k: v for k, v in out.items() if k != "space"}, indent=1))
    return 0


def teacher_key(job: JobSpec) -> str:
    blob = json.dumps(job.to_dict(), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def cached_teacher(job: JobSpec, cache_root: Path, *, uri: str, storage: str) -> dict[str, Any]:
    """The teacher's weights file and metrics, trained (as a one-trial sweep) when not cached."""
    from workers.sweep import run_sweep
    from workers.tracking import download_run_artifact, make_client

    folder = cache_root / f"teacher-{teacher_key(job)}"
    meta = folder / "teacher.json"
    if meta.is_file() and (folder / "model.pt").is_file():
        return {**json.loads(meta.read_text()), "cached": True}
    t0 = time.perf_counter()
    result = run_sweep(
        job,
        name=f"efficacy-teacher-{teacher_key(job)}",
        tracking_uri=uri,
        experiment="fgd-efficacy",
        storage_path=storage,
    )
    if result.best is None or not result.best.mlflow_run_id:
        raise RuntimeError("the teacher job produced no model")
    folder.mkdir(parents=True, exist_ok=True)
    weights = download_run_artifact(
        f"runs:/{result.best.mlflow_run_id}/model/state_dict.pt",
        client=make_client(uri),
        dst_path=folder,
    )
    Path(weights).replace(folder / "model.pt")
    info = {
        "weights": str(folder / "model.pt"),
        "metrics": result.best.metrics,
        "mlflow_run_id": result.best.mlflow_run_id,
        "train_wall_s": time.perf_counter() - t0,
        "spec": job.to_dict(),
    }
    meta.write_text(json.dumps(info, indent=1))
    return {**info, "cached": False}


def coco_stats(metrics: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if k.startswith("bbox_")}


def ap_history(client: Any, run_id: str | None, metric: str) -> list[tuple[int, float]]:
    if not run_id:
        return []
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, metric))


def summarise(result: Any, teacher: dict[str, Any], client: Any, seeds: int) -> dict[str, Any]:
    """efficacy.json's figures from the students' sweep and the teacher."""
    metric = "bbox_AP"
    by: dict[tuple[str, int], Any] = {
        (r.config["kind"], int(r.config["train.seed"])): r for r in result.rows
    }
    missing = [
        k
        for k in ((k, s) for s in range(seeds) for k in ("baseline", "distill"))
        if k not in by or metric not in by[k].metrics
    ]
    if missing:
        raise RuntimeError(f"trials without a final {metric}: {missing}")
    teacher_ap = float(teacher["metrics"][metric])
    baseline = [by[("baseline", s)].metrics[metric] for s in range(seeds)]
    fgd = [by[("distill", s)].metrics[metric] for s in range(seeds)]
    report = result.report or {}
    return {
        "teacher_ap": teacher_ap,
        "baseline_ap": baseline,
        "fgd_ap": fgd,
        "gap_closed": report.get("gap_closed"),
        "gap_closed_per_seed": [p["gap_closed"] for p in report.get("pairs", [])],
        "diff_mean": report.get("diff_mean"),
        "diff_se": report.get("diff_se"),
        "significant": report.get("significant"),
        "teacher_lead": teacher_ap - statistics.fmean(baseline),
        "teacher_leads": teacher_ap - statistics.fmean(baseline) >= MIN_LEAD,
        "coco": {
            "teacher": coco_stats(teacher["metrics"]),
            "baseline": [coco_stats(by[("baseline", s)].metrics) for s in range(seeds)],
            "fgd": [coco_stats(by[("distill", s)].metrics) for s in range(seeds)],
        },
        "history": {
            kind: [ap_history(client, by[(kind, s)].mlflow_run_id, metric) for s in range(seeds)]
            for kind in ("baseline", "distill")
        },
        "fgd_hparams_in_force": [
            {
                k.removeprefix("hp/"): v
                for k, v in by[("distill", s)].metrics.items()
                if k.startswith("hp/")
            }
            for s in range(seeds)
        ],
    }


def markdown(out: dict[str, Any]) -> str:
    pts = 100.0
    lines = [
        f"Shapes data seed {out['config']['data_seed']}, scale `{out['config']['scale']}`, "
        f"{out['config']['seeds']} seeds; box AP (COCOeval) in points.",
        "",
        "| seed | baseline | FGD | FGD - baseline | gap closed |",
        "|---|---|---|---|---|",
    ]
    for s, (b, f) in enumerate(zip(out["baseline_ap"], out["fgd_ap"], strict=True)):
        closed = out["gap_closed_per_seed"][s] if s < len(out["gap_closed_per_seed"]) else None
        lines.append(
            f"| {s} | {b * pts:.2f} | {f * pts:.2f} | {(f - b) * pts:+.2f} | "
            f"{'-' if closed is None else f'{closed * 100:.0f} %'} |"
        )
    se = out["diff_se"]
    closed_mean = "-" if out["gap_closed"] is None else f"{out['gap_closed'] * 100:.0f} %"
    teacher_time = "cached" if out["teacher_cached"] else f"{out['teacher_wall_s'] / 60:.1f} min"
    lines += [
        f"| mean | {statistics.fmean(out['baseline_ap']) * pts:.2f} | "
        f"{statistics.fmean(out['fgd_ap']) * pts:.2f} | {out['diff_mean'] * pts:+.2f}"
        f"{'' if se is None else f' ± {se * pts:.2f}'} | "
        f"{closed_mean} |",
        "",
        f"Teacher: {out['teacher_ap'] * pts:.2f} AP "
        f"({'leads' if out['teacher_leads'] else 'does NOT lead'} the baseline by "
        f"{out['teacher_lead'] * pts:.2f} points; {MIN_LEAD * pts:.0f} needed).",
        f"FGD beats the baseline by more than twice the standard error: "
        f"{'yes' if out['significant'] else 'no'}.",
        f"Wall time: {out['wall_time_s'] / 60:.1f} min (teacher "
        f"{teacher_time}, "
        f"students {out['students_wall_s'] / 60:.1f} min).",
    ]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "efficacy")
    p.add_argument("--seeds", type=int, default=3, help="student seeds (pairs)")
    p.add_argument("--data-seed", type=int, default=0, help="seed of the shapes data")
    p.add_argument("--scale", choices=sorted(SCALES), default="cpu")
    p.add_argument(
        "--cache", type=Path, default=None, help="teacher cache (default $FGD_HOME/cache/efficacy)"
    )
    p.add_argument("--storage", default=None, help="Tune storage (default $FGD_HOME/tune)")
    p.add_argument("--no-teacher-cache", action="store_true", help="train the teacher again")
    p.add_argument(
        "--teacher-iterations",
        type=int,
        default=None,
        metavar="N",
        help="train the teacher for N iterations instead of the scale's (a teacher-strength study)",
    )
    p.add_argument(
        "--resume",
        metavar="NAME",
        default=None,
        help="finish the students' sweep NAME (printed at its start) after its "
        "driver died: finished trials are kept, the others restart from checkpoints",
    )
    p.add_argument(
        "--search",
        type=int,
        default=0,
        metavar="N",
        help="instead of the pairs: an ASHA sweep of N samples over the five "
        "hyperparameters at seed 0, against the default weights",
    )
    args = p.parse_args(argv)
    if args.teacher_iterations is not None and args.teacher_iterations < 1:
        p.error("--teacher-iterations must be at least 1")
    if args.seeds < 2:
        p.error("--seeds must be at least 2 (the paired test needs a standard error)")
    return args


def scale_of(args: argparse.Namespace) -> Scale:
    """The configuration of ``--scale``, with ``--teacher-iterations`` applied."""
    scale = SCALES[args.scale]
    if args.teacher_iterations is None:
        return scale
    schedule = {**scale.teacher_train["schedule"], "iterations": args.teacher_iterations}
    return dataclasses.replace(scale, teacher_train={**scale.teacher_train, "schedule": schedule})


def main(argv: list[str] | None = None) -> int:
    from efficacy_plots import plot_ap_by_model, plot_ap_vs_step

    from workers.settings import fgd_home, layout
    from workers.spec import dump_spec
    from workers.sweep import run_sweep, tune_storage_path
    from workers.tracking import log_artifact_file, make_client
    from workers.tracking_server import tracking_uri

    args = parse_args(argv)
    scale = scale_of(args)
    t_start = time.perf_counter()
    out_dir: Path = args.out
    out_dir.mkdir(parents=True, exist_ok=True)
    dump_spec(portable_job(scale, args.data_seed, args.seeds), out_dir / "efficacy_job.yaml")
    uri = tracking_uri()
    storage = tune_storage_path(args.storage)
    cache = args.cache or fgd_home() / "cache" / "efficacy"
    layout().ensure()

    tjob = teacher_job(scale, args.data_seed)
    if args.no_teacher_cache:
        shutil.rmtree(cache / f"teacher-{teacher_key(tjob)}", ignore_errors=True)
    print(
        f"teacher: {tjob.model.backbone}, {tjob.train.schedule.iterations} iterations", flush=True
    )
    teacher = cached_teacher(tjob, cache, uri=uri, storage=storage)
    print(
        f"teacher AP {teacher['metrics']['bbox_AP']:.4f}{' (cached)' if teacher['cached'] else ''}",
        flush=True,
    )

    if args.search:
        return run_search(
            args, scale, teacher, tracking_uri=uri, experiment="fgd-efficacy", storage_path=storage
        )
    t_students = time.perf_counter()
    job = students_job(scale, args.data_seed, args.seeds, {"checkpoint": teacher["weights"]})
    name = args.resume or (
        f"efficacy-ds{args.data_seed}-{args.scale}-{time.strftime('%Y%m%d-%H%M%S')}"
    )
    print(f"students: {2 * args.seeds} trials ({name})", flush=True)
    result = run_sweep(
        job,
        name=name,
        tracking_uri=uri,
        experiment="fgd-efficacy",
        storage_path=storage,
        teacher_metrics=teacher["metrics"],
        resume=args.resume is not None,
    )
    students_wall = time.perf_counter() - t_students
    client = make_client(uri)
    out: dict[str, Any] = summarise(result, teacher, client, args.seeds)
    out.update(
        teacher_cached=teacher["cached"],
        teacher_wall_s=teacher.get("train_wall_s"),
        students_wall_s=students_wall,
        wall_time_s=time.perf_counter() - t_start,
        config={
            "scale": args.scale,
            "seeds": args.seeds,
            "data_seed": args.data_seed,
            "min_lead": MIN_LEAD,
            "teacher_job": tjob.to_dict(),
            "students_job": job.to_dict(),
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        },
        mlflow={
            "tracking_uri": uri,
            "experiment_id": result.experiment_id,
            "parent_run_id": result.parent_run_id,
            "teacher_run_id": teacher.get("mlflow_run_id"),
        },
    )
    (out_dir / "efficacy.json").write_text(json.dumps(out, indent=1))
    (out_dir / "efficacy.md").write_text(markdown(out))
    plot_ap_by_model(out, out_dir / "ap_by_model.png")
    plot_ap_vs_step(out, out_dir / "ap_vs_step.png")
    for f in (
        "efficacy.json",
        "efficacy.md",
        "ap_by_model.png",
        "ap_vs_step.png",
        "efficacy_job.yaml",
    ):
        log_artifact_file(client, result.parent_run_id, out_dir / f, "efficacy")
    print(markdown(out), flush=True)
    print(f"wrote {out_dir}/efficacy.json; MLflow parent run {result.parent_run_id} at {uri}")
    if not out["teacher_leads"]:
        print(
            f"the teacher is too weak to measure anything: it leads the baseline by "
            f"{out['teacher_lead'] * 100:.2f} AP points, {MIN_LEAD * 100:.0f} needed",
            file=sys.stderr,
        )
        return EXIT_WEAK_TEACHER if args.scale != "smoke" else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
