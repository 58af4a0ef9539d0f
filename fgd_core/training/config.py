"""Configuration of training and distillation: frozen dataclasses, one comment per default."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from fgd_core.detectors import DetectorConfig
from fgd_core.losses.fgd import hparams_of

OptimizerName = Literal["sgd", "adamw"]
SchedulePolicy = Literal["cosine", "step", "constant"]
JobKind = Literal["teacher", "baseline", "distill"]


@dataclass(frozen=True)
class OptimConfig:
    name: OptimizerName = "adamw"  # "sgd" (momentum) or "adamw"
    lr: float | None = None  # explicit learning rate; None = linear rule from base_lr below
    base_lr: float = 1e-3  # learning rate at base_batch_size images per step
    base_batch_size: int = 16  # reference total batch of the linear scaling rule
    momentum: float = 0.9  # SGD momentum
    weight_decay: float = 1e-4  # decoupled for AdamW, L2 for SGD

    def resolved_lr(self, total_batch_size: int) -> float:
        """The explicit lr, else base_lr scaled linearly with the total batch size."""
        if self.lr is not None:
            return self.lr
        return self.base_lr * total_batch_size / self.base_batch_size


@dataclass(frozen=True)
class ScheduleConfig:
    iterations: int = 600  # optimizer steps in the whole run
    warmup_iters: int = 50  # linear warm-up steps from warmup_factor * lr to lr
    warmup_factor: float = 1e-3  # starting fraction of the lr during warm-up
    policy: SchedulePolicy = "cosine"  # after warm-up: cosine to min_lr_factor, steps, constant
    milestones: tuple[float, ...] = (0.67, 0.89)  # step policy: fractions of iterations
    step_gamma: float = 0.1  # step policy: lr factor at each milestone
    min_lr_factor: float = 0.0  # cosine policy: final lr as a fraction of lr


@dataclass(frozen=True)
class TrainConfig:
    batch_size: int = 16  # images per step per process
    world_size: int = 1  # processes; total batch = batch_size * world_size (linear lr rule)
    optim: OptimConfig = field(default_factory=OptimConfig)  # optimizer
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)  # lr schedule and length
    clip_grad_norm: float | None = 10.0  # max gradient norm; None disables clipping
    amp: bool = True  # mixed precision (bfloat16/float16 autocast) on CUDA; ignored on CPU
    # bfloat16 autocast on a CPU that computes bfloat16 natively (AMX or AVX-512 BF16); float32
    # with a warning on other CPUs; ignored on CUDA (see amp)
    cpu_bf16: bool = False
    seed: int = 0  # seeds weights, batch order, flips and every random draw of the loop
    eval_every: int = 0  # evaluate every N steps (0 = only at the end)
    checkpoint_every: int = 0  # hand a checkpoint to the callbacks every N steps (0 = end only)
    log_every: int = 10  # report step metrics every N steps
    eval_max_batches: int | None = None  # cap on evaluation batches (None = whole val split)
    eval_batch_size: int = 8  # images per evaluation batch
    num_workers: int = 0  # data-loader worker processes
    device: str = "auto"  # "auto" (CUDA when present), "cpu", "cuda", "cuda:1", ...

    @property
    def total_batch_size(self) -> int:
        return self.batch_size * self.world_size

    @property
    def lr(self) -> float:
        return self.optim.resolved_lr(self.total_batch_size)


@dataclass(frozen=True)
class FGDConfig:
    alpha: float = 1e-3  # focal foreground weight (authors' RetinaNet value)
    beta: float = 5e-4  # focal background weight
    gamma: float = 5e-4  # attention loss weight
    lambda_: float = 5e-6  # global (relation) loss weight
    temp: float = 0.5  # attention temperature
    levels: tuple[str, ...] | None = None  # level names ("P3", ...); None = all but "pool"
    box_frame: Literal["padded", "image"] = "padded"  # box-to-cell mapping (see FGD_SPEC.md)
    inherit: bool = False  # start the student from the teacher's neck and head where shapes match
    calibrate_ratio: float | None = None  # rescale the weights on the first batch to this ratio
    calibrate_temp: bool = True  # when calibrating, also propose a spread temperature
    compile: bool | None = None  # compiled loss: native on the CPU (None: env var FGD_COMPILE)
    teacher_cache: bool = False  # keep the teacher's features on disk (fgd_core.teacher_cache)

    @property
    def hparams(self) -> dict[str, float]:
        """The FGD hyperparameters under their user-facing names."""
        return hparams_of(self)


@dataclass(frozen=True)
class DataConfig:
    train_images: str  # folder of training images
    train_ann: str  # COCO instances JSON of the training split
    val_images: str  # folder of validation images
    val_ann: str  # COCO instances JSON of the validation split
    hflip_prob: float = 0.5  # horizontal-flip probability in training
    with_masks: bool = False  # load instance masks (Mask R-CNN)


@dataclass(frozen=True)
class JobConfig:
    """One training run: a teacher, a baseline student, or a distilled student."""

    kind: JobKind  # "teacher", "baseline" (student alone) or "distill" (student with FGD)
    data: DataConfig  # where the COCO data is
    model: DetectorConfig  # the network this run trains (teacher or student)
    train: TrainConfig = field(default_factory=TrainConfig)  # schedule, optimizer, seed
    teacher: DetectorConfig | None = None  # distill: the teacher's architecture
    teacher_weights: str | None = None  # distill: local state-dict file of the teacher
    fgd: FGDConfig = field(default_factory=FGDConfig)  # distill: FGD hyperparameters
    evaluate_teacher: bool = True  # distill: evaluate the teacher on val before training

    def __post_init__(self) -> None:
        if self.kind == "distill" and (self.teacher is None or self.teacher_weights is None):
            raise ValueError("a distill job needs teacher (architecture) and teacher_weights")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
