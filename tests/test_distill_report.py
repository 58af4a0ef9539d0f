"""The distillation report: pairing, gap closed and the standard error, computed by hand."""

from __future__ import annotations

import math

import pytest

from workers.distill_report import distillation_report, gap_closed, report_markdown


def _row(kind: str, seed: int, ap: float, **extra: float) -> dict:
    return {"kind": kind, "train.seed": seed, "bbox_AP": ap, **extra}


def test_pairs_by_seed_and_closes_the_gap_per_pair() -> None:
    rows = [
        _row("baseline", 0, 0.07),
        _row("distill", 0, 0.10),
        _row("baseline", 1, 0.06),
        _row("distill", 1, 0.09),
        _row("baseline", 2, 0.08),  # no FGD twin: left out
    ]
    report = distillation_report(rows, teacher=0.12, group_keys=["kind", "train.seed"])
    assert report is not None
    assert [p["group"] for p in report["pairs"]] == [{"train.seed": 0}, {"train.seed": 1}]
    assert report["pairs"][0]["gap_closed"] == pytest.approx(0.03 / 0.05)
    assert report["pairs"][1]["gap_closed"] == pytest.approx(0.03 / 0.06)
    assert report["gap_closed"] == pytest.approx((0.6 + 0.5) / 2)
    assert report["baseline_mean"] == pytest.approx(0.065)
    assert report["fgd_mean"] == pytest.approx(0.095)
    assert report["diff_mean"] == pytest.approx(0.03)
    assert report["diff_se"] == pytest.approx(0.0)  # both differences are 0.03
    assert report["significant"] is True  # equal differences: no spread, 0.03 > 2 * 0


def test_significance_is_the_mean_difference_over_twice_its_standard_error() -> None:
    diffs = [0.03, 0.01, 0.02]
    rows = []
    for seed, d in enumerate(diffs):
        rows += [_row("baseline", seed, 0.05), _row("distill", seed, 0.05 + d)]
    report = distillation_report(rows, teacher=0.1, group_keys=["train.seed"])
    assert report is not None
    se = 0.01 / math.sqrt(3)  # sample std of (0.03, 0.01, 0.02) is 0.01
    assert report["diff_se"] == pytest.approx(se)
    assert report["diff_mean"] == pytest.approx(0.02)
    assert report["significant"] is True  # 0.02 > 2 * 0.0058
    rows[1]["bbox_AP"] = 0.0  # seed 0: FGD far below its baseline
    assert distillation_report(rows, teacher=0.1, group_keys=["train.seed"])["significant"] is False


def test_the_teacher_defaults_to_what_the_fgd_trials_measured() -> None:
    rows = [
        _row("baseline", 0, 0.05),
        _row("distill", 0, 0.08, teacher_bbox_AP=0.11),
    ]
    report = distillation_report(rows, group_keys=["train.seed"])
    assert report is not None and report["teacher"] == pytest.approx(0.11)
    assert report["gap_closed"] == pytest.approx(0.5)
    assert "50 %" in report_markdown(report)


def test_a_search_is_represented_by_its_best_fgd_trial_per_group() -> None:
    rows = [
        _row("baseline", 0, 0.05),
        {"kind": "distill", "bbox_AP": 0.06, "alpha": 1e-4},
        {"kind": "distill", "bbox_AP": 0.09, "alpha": 1e-5, "mlflow_run_id": "best"},
    ]
    rows[0].pop("train.seed")
    report = distillation_report(rows, teacher=0.1)
    assert report is not None
    (pair,) = report["pairs"]
    assert pair["fgd"] == pytest.approx(0.09) and pair["fgd_trials"] == 2
    assert pair["fgd_run_id"] == "best"


def test_no_pair_no_report_and_a_weak_teacher_closes_nothing() -> None:
    assert distillation_report([_row("distill", 0, 0.1)], group_keys=["train.seed"]) is None
    assert gap_closed(teacher=0.05, baseline=0.06, fgd=0.07) is None
    assert gap_closed(teacher=0.10, baseline=0.06, fgd=0.08) == pytest.approx(0.5)


def test_fgd_results_shows_the_report_side_by_side() -> None:
    from rich.console import Console

    from fgd_cli.views import results_view

    rows = [_row("baseline", 0, 0.07), _row("distill", 0, 0.10)]
    report = distillation_report(rows, teacher=0.12, group_keys=["train.seed"])
    answer = {"job_id": "j", "metric": "bbox_AP", "mode": "max", "rows": [], "report": report}
    console = Console(record=True, width=120)
    console.print(results_view(answer))
    text = console.export_text()
    assert "distillation report" in text and "gap closed" in text
    assert "train.seed=0" in text and "60 %" in text
    console = Console(record=True, width=120)
    console.print(results_view({**answer, "report": None}))
    assert "distillation report" not in console.export_text()
