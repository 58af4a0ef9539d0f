"""The sweep part of a job spec: search space, search algorithm, scheduler, budget.

Torch-free and Ray-free (the service imports it). `workers.sweep.to_tune_space` is the one
function that turns a `SweepSpec` into `ray.tune` objects.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# Hyperparameters a search space may hold: FGD's five, or the single calibration ratio.
FGD_PARAMS = ("alpha", "beta", "gamma", "lambda", "temp")
RATIO = "ratio"
SPACE_PARAMS = (*FGD_PARAMS, RATIO)


class _Sweep(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Distribution(_Sweep):
    """Exactly one of: loguniform [low, high], uniform [low, high], choice [...], grid [...]."""

    loguniform: tuple[float, float] | None = None
    uniform: tuple[float, float] | None = None
    choice: list[Any] | None = None
    grid: list[Any] | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> Distribution:
        given = [k for k in ("loguniform", "uniform", "choice", "grid") if getattr(self, k)]
        if len(given) != 1:
            raise ValueError(
                f"give exactly one of loguniform, uniform, choice, grid (got {given or 'none'})"
            )
        for key in ("loguniform", "uniform"):
            bounds = getattr(self, key)
            if bounds is not None:
                low, high = bounds
                if not low < high:
                    raise ValueError(f"{key}: low must be below high, got {list(bounds)}")
                if key == "loguniform" and low <= 0:
                    raise ValueError(f"loguniform: bounds must be positive, got {list(bounds)}")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in ("loguniform", "uniform", "choice", "grid") if getattr(self, k))


class Resources(_Sweep):
    cpu: float = Field(1.0, gt=0, description="CPUs per trial; torch uses this many threads")
    gpu: float = Field(0.0, ge=0, description="GPUs per trial (a fraction shares one GPU)")


class AshaSpec(_Sweep):
    grace_period: int = Field(1, ge=1, description="evaluations before a trial can be stopped")
    reduction_factor: float = Field(2.0, gt=1)


class PbtSpec(_Sweep):
    perturbation_interval: int = Field(1, ge=1, description="evaluations between perturbations")
    quantile_fraction: float = Field(0.25, gt=0, le=0.5)
    resample_probability: float = Field(0.25, ge=0, le=1)


class SweepSpec(_Sweep):
    """A Ray Tune sweep over FGD's hyperparameters and any other field of the job spec."""

    space: dict[str, Distribution] = Field(
        default_factory=dict,
        description="alpha, beta, gamma, lambda, temp, or the calibration ratio alone",
        examples=[{"alpha": {"loguniform": [1e-6, 1e-4]}, "temp": {"choice": [1.0, 2.0]}}],
    )
    grid: dict[str, list[Any]] = Field(
        default_factory=dict,
        description="a grid over other fields by dotted path: train.seed, kind, model.backbone",
        examples=[{"train.seed": [0, 1, 2], "kind": ["baseline", "distill"]}],
    )
    search: Literal["random", "grid", "tpe"] = "random"
    scheduler: Literal["fifo", "asha", "pbt"] = "fifo"
    asha: AshaSpec = Field(default_factory=AshaSpec)
    pbt: PbtSpec = Field(default_factory=PbtSpec)
    num_samples: int = Field(1, ge=1, description="samples drawn (times the grid, if any)")
    max_concurrent_trials: int | None = Field(None, ge=1)
    resources: Resources = Field(default_factory=Resources)
    metric: str = Field("bbox_AP", description="the metric ranked, as evaluation reports it")
    mode: Literal["max", "min"] = "max"
    max_failures: int = Field(1, ge=0, description="retries of a failed trial from its checkpoint")
    time_budget_s: float | None = Field(None, gt=0, description="stop the sweep after this")

    @model_validator(mode="after")
    def _consistent(self) -> SweepSpec:
        unknown = sorted(set(self.space) - set(SPACE_PARAMS))
        if unknown:
            raise ValueError(
                f"space: unknown hyperparameter {unknown}; expected among {list(SPACE_PARAMS)}"
            )
        if RATIO in self.space and set(self.space) & {"alpha", "beta", "gamma", "lambda"}:
            raise ValueError(
                "space: search the calibration ratio or the four weights, not both "
                "(the ratio sets all four)"
            )
        overlap = sorted(set(self.grid) & {f"fgd.{p}" for p in FGD_PARAMS})
        if overlap:
            raise ValueError(f"grid: {overlap} belong in space")
        for path, values in self.grid.items():
            if not values:
                raise ValueError(f"grid: {path!r} needs at least one value")
        if self.search == "tpe":
            bad = [k for k, d in self.space.items() if d.kind == "grid"]
            if bad or self.grid:
                raise ValueError(
                    "search 'tpe' cannot take grid axes "
                    f"({bad + list(self.grid)}); use choice, or search 'random'/'grid'"
                )
        if self.search == "grid":
            bad = [k for k, d in self.space.items() if d.kind in ("loguniform", "uniform")]
            if bad:
                raise ValueError(f"search 'grid' needs grid or choice values, not ranges: {bad}")
        if self.scheduler == "pbt":
            bad = [k for k, d in self.space.items() if d.kind == "grid"]
            if bad:
                raise ValueError(f"scheduler 'pbt' perturbs sampled values; grid axes {bad}")
        return self
