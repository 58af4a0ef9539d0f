"""The job spec: one set of pydantic models shared by the CLI, the Ray workers and the service.

Torch-free on purpose (the service imports it): pydantic, PyYAML and the standard library only.
The fields mirror the frozen dataclasses of ``fgd_core`` (``ShapesConfig``, ``DetectorConfig``,
``FGDConfig``, ``OptimConfig``, ``ScheduleConfig``, ``TrainConfig``, ``DataConfig``) with the
same names and defaults, so ``workers.convert`` turns a spec into them field by field.

FGD's hyperparameters are ``alpha``, ``beta``, ``gamma``, ``lambda`` and ``temp`` in every spec;
``lambda_`` is only the Python attribute (``lambda`` is a keyword). Dump with ``by_alias=True``
(the default here) to get ``lambda`` back.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from workers.settings import fgd_home
from workers.sweep_spec import SweepSpec

# Kept equal to fgd_core's lists by tests/test_spec.py (this module cannot import fgd_core).
Arch = Literal["retinanet", "fcos", "fasterrcnn", "maskrcnn"]
Backbone = Literal["resnet18", "resnet34", "resnet50", "resnet101", "mobilenet_v3_large"]
Norm = Literal["bn", "frozen_bn"]
RetinaNetBoxLoss = Literal["l1", "smooth_l1", "giou", "diou", "ciou"]
JobKind = Literal["teacher", "baseline", "distill"]
SHAPE_CLASSES = 6  # len(fgd_core.data.SHAPE_NAMES)

PositiveInt = Annotated[int, Field(ge=1)]
NonNegInt = Annotated[int, Field(ge=0)]
NonNegFloat = Annotated[float, Field(ge=0.0)]
Triple = tuple[float, float, float]

_MLFLOW_URI = re.compile(
    r"^(runs:/[0-9A-Za-z_\-]+/\S+"  # runs:/<run_id>/<artifact path>
    r"|models:/[^/@\s]+/[^/@\s]+"  # models:/<name>/<version or stage>
    r"|models:/[^/@\s]+@[^/@\s]+"  # models:/<name>@<alias>
    r"|models:/m-[0-9A-Za-z]+)$"  # models:/<model_id> (MLflow 3 logged models)
)
_LEVEL = re.compile(r"^P[0-9]$")
_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:[0-9]+)?)$")


class SpecError(ValueError):
    """A job spec is invalid, unreadable, or refers to something that does not exist.

    The message names the file (when there is one) and the field path, e.g.
    ``job.yaml: train.schedule.iterations: Input should be greater than or equal to 1``.
    """


class _Spec(BaseModel):
    """Base of every spec model: unknown fields are errors; ``lambda`` in and out by alias."""

    model_config = ConfigDict(
        extra="forbid",
        populate_by_name=True,
        serialize_by_alias=True,
        validate_default=True,
    )


# --- data -----------------------------------------------------------------------------------


class ShapesSpec(_Spec):
    """The procedural shapes dataset (``fgd_core.data.ShapesConfig``), generated on demand."""

    root: str | None = Field(
        None,
        description="Directory of the dataset; generated there when missing. Default: "
        "$FGD_HOME/data/shapes-<hash of the other fields> (FGD_HOME defaults to ~/.fgd).",
        examples=["/data/shapes-small"],
    )
    seed: NonNegInt = Field(0, description="Image i of a split is a pure function of the seed.")
    num_train: PositiveInt = Field(4000, description="Training images (at least num_classes).")
    num_val: PositiveInt = Field(300, description="Validation images (at least num_classes).")
    image_size: int = Field(128, ge=16, description="Side of the square images, px.")
    num_classes: int = Field(
        4, ge=1, le=SHAPE_CLASSES, description="The first K of circle, square, triangle, ..."
    )
    min_objects: PositiveInt = Field(1, description="Objects attempted per image, at least.")
    max_objects: PositiveInt = Field(6, description="Objects attempted per image, at most.")
    min_size: int = Field(8, ge=4, description="Smallest object extent, px (log-uniform).")
    max_size: int = Field(64, ge=4, description="Largest object extent, px (<= image_size).")
    min_visible_fraction: float = Field(
        0.4, ge=0.0, le=1.0, description="An occluded object keeps at least this share."
    )
    min_visible_pixels: PositiveInt = Field(8, description="...and this many visible pixels.")
    noise_std: NonNegFloat = Field(8.0, description="Largest per-image pixel noise std (0-255).")

    @model_validator(mode="after")
    def _consistent(self) -> ShapesSpec:
        if self.num_train < self.num_classes or self.num_val < self.num_classes:
            raise ValueError("num_train and num_val must be >= num_classes")
        if self.min_objects > self.max_objects:
            raise ValueError(f"min_objects ({self.min_objects}) must be <= max_objects")
        if self.min_size > self.max_size:
            raise ValueError(f"min_size ({self.min_size}) must be <= max_size ({self.max_size})")
        if self.max_size > self.image_size:
            raise ValueError(f"max_size ({self.max_size}) must be <= image_size")
        return self

    def generator_config(self) -> dict[str, Any]:
        """The fields of ``ShapesConfig`` (everything but ``root``)."""
        return self.model_dump(exclude={"root"})

    def config_hash(self) -> str:
        """12 hex digits identifying the generated content (not the root)."""
        blob = json.dumps(self.generator_config(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]

    def resolved_root(self) -> Path:
        """``root``, or ``$FGD_HOME/data/shapes-<hash>``; always absolute."""
        if self.root:
            return Path(self.root).expanduser().resolve()
        return fgd_home() / "data" / f"shapes-{self.config_hash()}"


class CocoSpec(_Spec):
    """Any COCO-format dataset already on disk (paths as seen by the process that trains)."""

    train_images: str = Field(min_length=1, description="Folder of training images.")
    train_ann: str = Field(min_length=1, description="COCO instances JSON of the train split.")
    val_images: str = Field(min_length=1, description="Folder of validation images.")
    val_ann: str = Field(min_length=1, description="COCO instances JSON of the val split.")

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "train_images": "/data/coco/train2017",
                    "train_ann": "/data/coco/annotations/instances_train2017.json",
                    "val_images": "/data/coco/val2017",
                    "val_ann": "/data/coco/annotations/instances_val2017.json",
                }
            ]
        }
    )


class DataSpec(_Spec):
    """Exactly one of ``shapes`` or ``coco`` (neither given: shapes with defaults)."""

    shapes: ShapesSpec | None = Field(None, description="Generated shapes data.")
    coco: CocoSpec | None = Field(None, description="A COCO-format dataset on disk.")
    hflip_prob: float = Field(0.5, ge=0.0, le=1.0, description="Training horizontal-flip prob.")
    with_masks: bool = Field(False, description="Load instance masks (Mask R-CNN).")

    @model_validator(mode="before")
    @classmethod
    def _default_shapes(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("shapes") is None and data.get("coco") is None:
            data = {**data, "shapes": {}}
        return data

    @model_validator(mode="after")
    def _exactly_one(self) -> DataSpec:
        if self.shapes is not None and self.coco is not None:
            raise ValueError("give exactly one of 'shapes' or 'coco', not both")
        return self

    @property
    def source(self) -> Literal["shapes", "coco"]:
        return "shapes" if self.shapes is not None else "coco"


# --- models -----------------------------------------------------------------------------------


class DetectorSpec(_Spec):
    """A detector architecture (``fgd_core.detectors.DetectorConfig``), built from scratch."""

    arch: Arch = Field("retinanet", description="Detector family.")
    backbone: Backbone = Field("resnet50", description="Backbone network.")
    num_classes: int | None = Field(
        None, ge=1, description="Foreground classes K; None = the dataset's category count."
    )
    fpn_channels: PositiveInt = Field(256, description="FPN (neck) output channels.")
    min_size: PositiveInt | list[PositiveInt] = Field(
        800, description="Shorter side after resize; a list = random per batch.", examples=[800]
    )
    max_size: PositiveInt = Field(1333, description="Longer side cap after resize.")
    anchor_sizes: list[list[Annotated[float, Field(gt=0)]]] | None = Field(
        None,
        description="Anchor sizes per FPN level (input px); None = scaled with min_size.",
        examples=[[[16, 20, 25], [32, 40, 50], [64, 80, 101], [128, 161, 203], [256, 322, 406]]],
    )
    aspect_ratios: list[Annotated[float, Field(gt=0)]] = Field(
        [0.5, 1.0, 2.0], min_length=1, description="Anchor h/w ratios (FCOS always uses 1.0)."
    )
    trainable_backbone_layers: int | None = Field(
        None, ge=0, le=5, description="Trainable backbone stages; None = all trainable."
    )
    norm: Norm = Field("bn", description="Backbone normalisation.")
    retinanet_box_loss: RetinaNetBoxLoss = Field("giou", description="RetinaNet box loss.")
    box_head_dim: PositiveInt = Field(1024, description="R-CNN box head width.")
    mask_head_channels: PositiveInt = Field(256, description="Mask R-CNN mask head width.")
    score_thresh: float | None = Field(
        None, ge=0.0, le=1.0, description="Detection score threshold; None = torchvision's."
    )
    detections_per_img: PositiveInt = Field(100, description="Detections kept per image.")
    image_mean: Triple = Field((0.485, 0.456, 0.406), description="Input mean (RGB, 0-1).")
    image_std: Triple = Field((0.229, 0.224, 0.225), description="Input std (RGB, 0-1).")

    @field_validator("min_size")
    @classmethod
    def _nonempty_sizes(cls, v: int | list[int]) -> int | list[int]:
        if isinstance(v, list) and not v:
            raise ValueError("min_size must be an int or a non-empty list of ints")
        return v

    @field_validator("anchor_sizes")
    @classmethod
    def _anchor_levels(cls, v: list[list[float]] | None) -> list[list[float]] | None:
        if v is not None:
            if not v or any(not level for level in v):
                raise ValueError("anchor_sizes needs at least one size on every level")
            if len({len(level) for level in v}) != 1:
                raise ValueError("anchor_sizes must have the same number of sizes on every level")
        return v

    @field_validator("image_std")
    @classmethod
    def _positive_std(cls, v: Triple) -> Triple:
        if any(s <= 0 for s in v):
            raise ValueError("image_std must be > 0 in every channel")
        return v


class OptimSpec(_Spec):
    """Optimizer (``OptimConfig``); lr follows the total batch size unless given."""

    name: Literal["sgd", "adamw"] = Field("adamw", description="'sgd' (momentum) or 'adamw'.")
    lr: float | None = Field(
        None, gt=0.0, description="Explicit learning rate; None = base_lr * batch / base_batch."
    )
    base_lr: float = Field(1e-3, gt=0.0, description="lr at base_batch_size images per step.")
    base_batch_size: PositiveInt = Field(16, description="Reference batch of the linear rule.")
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="SGD momentum.")
    weight_decay: NonNegFloat = Field(1e-4, description="Decoupled (AdamW) or L2 (SGD).")


class ScheduleSpec(_Spec):
    """Length and learning-rate schedule (``ScheduleConfig``)."""

    iterations: PositiveInt = Field(600, description="Optimizer steps in the whole run.")
    warmup_iters: NonNegInt = Field(50, description="Linear warm-up steps (< iterations).")
    warmup_factor: float = Field(1e-3, gt=0.0, le=1.0, description="Starting lr fraction.")
    policy: Literal["cosine", "step", "constant"] = Field("cosine", description="After warm-up.")
    milestones: list[Annotated[float, Field(gt=0.0, lt=1.0)]] = Field(
        [0.67, 0.89], description="Step policy: fractions of iterations, increasing."
    )
    step_gamma: float = Field(0.1, gt=0.0, le=1.0, description="Step policy: lr factor.")
    min_lr_factor: float = Field(0.0, ge=0.0, le=1.0, description="Cosine: final lr fraction.")

    @field_validator("milestones")
    @classmethod
    def _increasing(cls, v: list[float]) -> list[float]:
        if any(b <= a for a, b in zip(v, v[1:], strict=False)):
            raise ValueError("milestones must be strictly increasing")
        return v

    @model_validator(mode="after")
    def _warmup_fits(self) -> ScheduleSpec:
        if self.warmup_iters >= self.iterations:
            raise ValueError(
                f"warmup_iters ({self.warmup_iters}) must be < iterations ({self.iterations})"
            )
        return self


class TrainSpec(_Spec):
    """Training loop settings (``TrainConfig``)."""

    batch_size: PositiveInt = Field(16, description="Images per step per process.")
    world_size: PositiveInt = Field(1, description="Processes; total batch = batch * world.")
    optim: OptimSpec = Field(default_factory=OptimSpec)
    schedule: ScheduleSpec = Field(default_factory=ScheduleSpec)
    clip_grad_norm: float | None = Field(10.0, gt=0.0, description="Max grad norm; None = off.")
    amp: bool = Field(True, description="Mixed precision on CUDA (ignored on CPU).")
    cpu_bf16: bool = Field(
        False,
        description="bfloat16 mixed precision on the CPU (autocast), where the CPU computes "
        "bfloat16 natively (AMX or AVX-512 BF16): about 1.8x faster steps there. Other CPUs "
        "train in float32 with a warning. Ignored on CUDA (see amp).",
    )
    seed: NonNegInt = Field(0, description="Seeds weights, batch order, flips, every draw.")
    eval_every: NonNegInt = Field(0, description="Evaluate every N steps (0 = at the end only).")
    checkpoint_every: NonNegInt = Field(0, description="Checkpoint every N steps (0 = end only).")
    log_every: PositiveInt = Field(10, description="Report step metrics every N steps.")
    eval_max_batches: PositiveInt | None = Field(None, description="Cap on evaluation batches.")
    eval_batch_size: PositiveInt = Field(8, description="Images per evaluation batch.")
    num_workers: NonNegInt = Field(0, description="Data-loader worker processes.")
    device: str = Field(
        "auto", description="'auto' (CUDA when present), 'cpu', 'cuda', 'cuda:1', ..."
    )

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not _DEVICE.match(v):
            raise ValueError(f"device must be 'auto', 'cpu', 'mps', 'cuda' or 'cuda:N', got {v!r}")
        return v


# --- distillation -------------------------------------------------------------------------------


class FGDSpec(_Spec):
    """FGD hyperparameters (``FGDConfig``); see FGD_SPEC.md. Defaults: the authors' RetinaNet."""

    alpha: NonNegFloat = Field(1e-3, description="Focal foreground weight.")
    beta: NonNegFloat = Field(5e-4, description="Focal background weight.")
    gamma: NonNegFloat = Field(5e-4, description="Attention loss weight.")
    lambda_: NonNegFloat = Field(5e-6, alias="lambda", description="Global (relation) weight.")
    temp: float = Field(0.5, gt=0.0, description="Attention temperature.")
    levels: list[str] | None = Field(
        None,
        description="FPN levels distilled ('P3', ...); None = all but the R-CNN 'pool' level.",
        examples=[["P3", "P4", "P5", "P6", "P7"]],
    )
    box_frame: Literal["padded", "image"] = Field(
        "padded", description="Box-to-cell mapping: padded batch (default) or authors' per image."
    )
    inherit: bool = Field(False, description="Start the student from the teacher's neck/head.")
    calibrate_ratio: float | None = Field(
        None,
        gt=0.0,
        description="Rescale the four weights on the first batch so the distillation total is "
        "this ratio of the detection loss; None = use the weights as given.",
        examples=[1.0],
    )
    calibrate_temp: bool = Field(True, description="When calibrating, also pick temp.")
    compile: bool | None = Field(
        None,
        description="Compute the loss with compiled code: native kernels on the CPU (built "
        "once per machine in about a second), torch.compile elsewhere; falls back to eager if "
        "neither builds; None = the env var FGD_COMPILE on the worker.",
    )
    teacher_cache: bool = Field(
        False,
        description="Keep the teacher's features of every (training image, flip) on the "
        "worker's disk ($FGD_TEACHER_CACHE_DIR, else $FGD_HOME/cache/teacher-features), shared "
        "by every run of the same teacher and data: the teacher's forward is paid once per "
        "image instead of at every step. Batches that pad images of mixed sizes are computed "
        "live. Costs 8 bytes per teacher feature cell per image.",
    )

    @field_validator("levels")
    @classmethod
    def _levels(cls, v: list[str] | None) -> list[str] | None:
        if v is not None:
            if not v:
                raise ValueError("levels must be non-empty (or null for the default levels)")
            bad = [name for name in v if not _LEVEL.match(name)]
            if bad:
                raise ValueError(f"levels must be names like 'P3'; got {bad}")
            if len(set(v)) != len(v):
                raise ValueError("levels must not repeat")
        return v

    @property
    def hparams(self) -> dict[str, float]:
        """The five hyperparameters under their user-facing names."""
        return {
            "alpha": self.alpha,
            "beta": self.beta,
            "gamma": self.gamma,
            "lambda": self.lambda_,
            "temp": self.temp,
        }


class TeacherSpec(_Spec):
    """Where a distill job's teacher comes from: exactly one of checkpoint, mlflow_uri, train."""

    model: DetectorSpec = Field(
        default_factory=DetectorSpec, description="The teacher's architecture."
    )
    checkpoint: str | None = Field(
        None,
        min_length=1,
        description="Local file of the teacher's weights (a state dict, or a training "
        "checkpoint holding one under 'model').",
        examples=["runs/teacher/model.pt"],
    )
    mlflow_uri: str | None = Field(
        None,
        description="MLflow artifact or registered model of the teacher's weights.",
        examples=["runs:/0123456789abcdef/teacher/state_dict.pt", "models:/shapes-teacher/3"],
    )
    train: bool = Field(False, description="Train the teacher first, then distill from it.")
    training: TrainSpec | None = Field(
        None, description="With train: true, the teacher's schedule; None = the job's train."
    )

    @field_validator("mlflow_uri")
    @classmethod
    def _uri_shape(cls, v: str | None) -> str | None:
        if v is not None and not _MLFLOW_URI.match(v):
            raise ValueError(
                "mlflow_uri must look like 'runs:/<run_id>/<path>', 'models:/<name>/<version>' "
                f"or 'models:/<name>@<alias>', got {v!r}"
            )
        return v

    @model_validator(mode="after")
    def _one_source(self) -> TeacherSpec:
        given = [
            name
            for name, on in (
                ("checkpoint", self.checkpoint is not None),
                ("mlflow_uri", self.mlflow_uri is not None),
                ("train", self.train),
            )
            if on
        ]
        if len(given) != 1:
            shown = ", ".join(given) if given else "none"
            raise ValueError(
                f"give exactly one of checkpoint, mlflow_uri or train: true (got {shown})"
            )
        if self.training is not None and not self.train:
            raise ValueError("training (the teacher's schedule) needs train: true")
        return self

    @property
    def source(self) -> Literal["checkpoint", "mlflow_uri", "train"]:
        if self.checkpoint is not None:
            return "checkpoint"
        return "mlflow_uri" if self.mlflow_uri is not None else "train"


# --- the job -------------------------------------------------------------------------------------

_EXAMPLE_JOB: dict[str, Any] = {
    "kind": "distill",
    "data": {"shapes": {"num_train": 1000, "num_val": 100, "image_size": 128}},
    "model": {
        "arch": "retinanet",
        "backbone": "resnet18",
        "fpn_channels": 64,
        "min_size": 128,
        "max_size": 128,
    },
    "teacher": {
        "checkpoint": "runs/teacher/model.pt",
        "model": {
            "arch": "retinanet",
            "backbone": "resnet34",
            "fpn_channels": 64,
            "min_size": 128,
            "max_size": 128,
        },
    },
    "fgd": {"alpha": 1e-3, "beta": 5e-4, "gamma": 5e-4, "lambda": 5e-6, "calibrate_ratio": 1.0},
    "train": {"batch_size": 8, "schedule": {"iterations": 300, "warmup_iters": 30}},
}


class JobSpec(_Spec):
    """One training job: a teacher, a baseline student, or a student distilled with FGD."""

    kind: JobKind = Field(
        description="'teacher' (train a teacher), 'baseline' (a student alone) or 'distill' "
        "(a student with FGD from `teacher`)."
    )
    data: DataSpec = Field(default_factory=DataSpec, description="The dataset.")
    model: DetectorSpec = Field(
        default_factory=DetectorSpec,
        description="The network this job trains: the teacher for teacher jobs, else the student.",
    )
    teacher: TeacherSpec | None = Field(None, description="Distill jobs only: the teacher.")
    fgd: FGDSpec = Field(default_factory=FGDSpec, description="FGD hyperparameters (distill).")
    train: TrainSpec = Field(default_factory=TrainSpec, description="Schedule and optimizer.")
    evaluate_teacher: bool = Field(True, description="Distill: evaluate the teacher first.")
    baseline: bool = Field(
        False, description="Distill: also train a baseline student with the same settings."
    )
    sweep: SweepSpec | None = Field(
        None, description="Run the job as a Ray Tune sweep (search space, scheduler, budget)."
    )

    model_config = ConfigDict(json_schema_extra={"examples": [_EXAMPLE_JOB]})

    @field_validator("teacher")
    @classmethod
    def _teacher_fits(cls, v: TeacherSpec | None, info: ValidationInfo) -> TeacherSpec | None:
        kind = info.data.get("kind")  # absent when kind itself failed
        if kind == "distill" and v is None:
            raise ValueError("a distill job needs a teacher (checkpoint, mlflow_uri or train)")
        if kind in ("teacher", "baseline") and v is not None:
            raise ValueError(f"only distill jobs take a teacher, not {kind!r} jobs")
        return v

    @field_validator("baseline")
    @classmethod
    def _baseline_fits(cls, v: bool, info: ValidationInfo) -> bool:
        kind = info.data.get("kind")
        if v and kind in ("teacher", "baseline"):
            raise ValueError(f"baseline: true is only for distill jobs, not {kind!r} jobs")
        return v

    def teacher_job(self) -> JobSpec:
        """The teacher job of a distill job whose teacher has ``train: true``."""
        if self.teacher is None or not self.teacher.train:
            raise ValueError("teacher_job() needs a distill job with teacher.train: true")
        return JobSpec(
            kind="teacher",
            data=self.data,
            model=self.teacher.model,
            train=self.teacher.training or self.train,
        )

    def baseline_job(self) -> JobSpec:
        """The baseline twin of a distill job: the same student, data and training, no FGD."""
        return JobSpec(kind="baseline", data=self.data, model=self.model, train=self.train)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (``lambda`` by its name), which ``JobSpec.model_validate`` reads."""
        return self.model_dump(mode="json", by_alias=True)


# --- helpers --------------------------------------------------------------------------------------


# Union members pydantic puts in error locations ("min_size.constrained-int"); no spec field
# has these names, so they are left out of the paths shown to users.
_TYPE_TAGS = {"int", "float", "str", "bool", "list", "tuple", "dict", "none", "nullable"}


def _loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, str) and (part in _TYPE_TAGS or not part.isidentifier()):
            continue
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def format_validation_error(err: ValidationError, *, source: str | None = None) -> str:
    """One line per error: ``[source: ]field.path: message``."""
    prefix = f"{source}: " if source else ""
    lines = []
    for e in err.errors(include_url=False):
        where = _loc(tuple(e.get("loc", ())))
        msg = str(e.get("msg", "invalid"))
        msg = msg.removeprefix("Value error, ")
        lines.append(f"{prefix}{where}: {msg}" if where else f"{prefix}{msg}")
    return "\n".join(lines)


def parse_spec(data: Any, *, source: str | None = None) -> JobSpec:
    """Validate a plain dict as a JobSpec; raises SpecError naming the fields."""
    if not isinstance(data, dict):
        where = f"{source}: " if source else ""
        raise SpecError(f"{where}a job spec must be a mapping, got {type(data).__name__}")
    try:
        return JobSpec.model_validate(data)
    except ValidationError as err:
        raise SpecError(format_validation_error(err, source=source)) from None


def read_spec_file(path: str | os.PathLike[str]) -> Any:
    """The parsed content of a YAML (.yaml/.yml) or JSON (.json) file."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".yaml", ".yml", ".json"):
        raise SpecError(f"{path}: unknown spec format {suffix!r}; use .yaml, .yml or .json")
    try:
        text = path.read_text()
    except OSError as exc:
        raise SpecError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        return json.loads(text) if suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise SpecError(f"{path}: not valid {suffix[1:].upper()}: {exc}") from None


def load_spec(path: str | os.PathLike[str]) -> JobSpec:
    """Read and validate a JobSpec from a YAML or JSON file (by extension).

    Raises:
        SpecError: unreadable file, bad syntax, or invalid fields; the message names the file
            and each field path.
    """
    return parse_spec(read_spec_file(path), source=str(path))


def dump_spec(spec: JobSpec, path: str | os.PathLike[str]) -> Path:
    """Write ``spec`` as YAML or JSON (by extension); ``load_spec`` reads it back equal."""
    path = Path(path)
    data = spec.to_dict()
    if path.suffix.lower() == ".json":
        text = json.dumps(data, indent=2) + "\n"
    elif path.suffix.lower() in (".yaml", ".yml"):
        text = yaml.safe_dump(data, sort_keys=False)
    else:
        raise SpecError(f"{path}: unknown spec format; use .yaml, .yml or .json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path
