"""The training loop: optimizer, warm-up and schedule, clipping, AMP, a NaN guard, resume.

A plain function over a module whose `forward(images, targets)` returns named loss terms; it
reports through callbacks and never does I/O itself.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from fgd_core.data import iterate_from
from fgd_core.training.checkpoint import rng_state, set_rng_state
from fgd_core.training.config import TrainConfig

Batch = tuple[Sequence[Tensor], Sequence[dict[str, Tensor]]]


class NonFiniteLossError(FloatingPointError):
    """A loss term (or the gradient) became NaN or infinite; the message names it."""


class TrainModule(Protocol):
    def __call__(self, images: Sequence[Tensor], targets: Any) -> dict[str, Tensor]: ...
    def trainable_parameters(self) -> Iterator[nn.Parameter]: ...
    def checkpoint_state(self) -> dict[str, Any]: ...
    def load_checkpoint_state(self, state: dict[str, Any]) -> None: ...
    def train(self, mode: bool = True) -> Any: ...


@dataclass
class Callbacks:
    """Hooks of the loop; each is optional. The loop does no I/O of its own."""

    on_metrics: Callable[[int, dict[str, float]], None] | None = None  # step, losses, lr
    on_evaluation: Callable[[int, dict[str, float]], None] | None = None  # step, COCO metrics
    on_checkpoint: Callable[[int, dict[str, Any]], None] | None = None  # step, full state
    on_teacher_evaluation: Callable[[dict[str, float]], None] | None = None  # before training
    on_progress: Callable[[int, int], None] | None = None  # step, total steps
    should_stop: Callable[[int], bool] | None = None  # asked after every step
    # on_checkpoint gets a deep copy of the state, which it may keep; False hands it the live
    # tensors, for a callback that serializes them before it returns (no copy is made).
    copy_checkpoint_state: bool = True


@dataclass
class LoopResult:
    steps: int  # steps completed in total (resumed ones included)
    history: list[tuple[int, dict[str, float]]] = field(default_factory=list)  # evaluations
    last_metrics: dict[str, float] = field(default_factory=dict)  # last reported step metrics
    train_seconds: float = 0.0  # wall time of this call's steps, evaluations excluded
    stopped_early: bool = False


def build_optimizer(params: Sequence[nn.Parameter], config: TrainConfig) -> torch.optim.Optimizer:
    """SGD or AdamW at the resolved lr; no weight decay on biases and normalisation weights."""
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    groups = [
        {"params": decay, "weight_decay": config.optim.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if config.optim.name == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.optim.momentum)
    if config.optim.name == "adamw":
        return torch.optim.AdamW(groups, lr=config.lr)
    raise ValueError(f"unknown optimizer {config.optim.name!r}; expected 'sgd' or 'adamw'")


def lr_factor(step: int, config: TrainConfig) -> float:
    """Multiplier of the base lr at `step`: linear warm-up, then cosine, steps or constant."""
    sched = config.schedule
    if step < sched.warmup_iters:
        alpha = step / max(1, sched.warmup_iters)
        return sched.warmup_factor * (1 - alpha) + alpha
    if sched.policy == "constant":
        return 1.0
    if sched.policy == "step":
        passed = sum(step >= m * sched.iterations for m in sched.milestones)
        return float(sched.step_gamma**passed)
    if sched.policy == "cosine":
        span = max(1, sched.iterations - sched.warmup_iters)
        progress = min(1.0, (step - sched.warmup_iters) / span)
        cos = 0.5 * (1 + math.cos(math.pi * progress))
        return sched.min_lr_factor + (1 - sched.min_lr_factor) * cos
    raise ValueError(f"unknown schedule policy {sched.policy!r}")


def _to_device(batch: Batch, device: torch.device) -> Batch:
    images, targets = batch
    return (
        [img.to(device, non_blocking=True) for img in images],
        [{k: v.to(device) if isinstance(v, Tensor) else v for k, v in t.items()} for t in targets],
    )


def _check_finite(losses: dict[str, Tensor], total: Tensor, step: int) -> None:
    if bool(torch.isfinite(total)):
        return
    bad = [f"{k}={float(v)}" for k, v in losses.items() if not bool(torch.isfinite(v))]
    raise NonFiniteLossError(
        f"loss became non-finite at step {step}: {', '.join(bad) or f'total={float(total)}'}"
        " (lower the learning rate or the FGD weights, or calibrate them)"
    )


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 matrix products natively (AMX or AVX-512 BF16)."""
    cpu = torch.cpu
    try:
        return bool(cpu._is_amx_tile_supported() or cpu._is_avx512_bf16_supported())
    except AttributeError:  # a torch without these probes
        return False


def autocast_dtype(device: torch.device, config: TrainConfig) -> torch.dtype | None:
    """The dtype training autocasts to on `device` (None: float32 throughout)."""
    if device.type == "cuda":
        if not config.amp:
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and config.cpu_bf16:
        if cpu_has_native_bf16():
            return torch.bfloat16
        warnings.warn(
            "train.cpu_bf16: this CPU has no native bfloat16 (AMX or AVX-512 BF16), where "
            "autocast would be slower than float32; training in float32",
            RuntimeWarning,
            stacklevel=2,
        )
    return None


def _tiny_map(conv: nn.Conv2d, x: Tensor) -> bool:
    return (
        x.device.type == "cpu"
        and torch.is_autocast_enabled("cpu")
        and max(conv.stride) > 1
        and min(x.shape[-2:]) < max(conv.kernel_size)
    )


def _enter_float32(conv: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
    if not isinstance(conv, nn.Conv2d) or not _tiny_map(conv, args[0]):
        return None
    context = torch.autocast("cpu", enabled=False)
    context.__enter__()
    conv.__dict__["_fgd_float32"] = context
    return (args[0].float(), *args[1:])


def _leave_float32(conv: nn.Module, args: tuple[Any, ...], output: Any) -> None:
    context = conv.__dict__.pop("_fgd_float32", None)
    if context is not None:
        context.__exit__(None, None, None)


def keep_tiny_strided_convs_in_float32(module: nn.Module) -> int:
    """Run strided convolutions over maps smaller than their kernel in float32 under CPU autocast.

    oneDNN's bfloat16 weight gradient of a strided 3x3 convolution over a map one cell wide
    (RetinaNet's P7 conv on a 1x1 P6, at 64 px inputs) comes out as garbage, inf included, on
    CPUs with AMX. Such maps are a few cells: float32 costs nothing there. Idempotent; returns
    the number of convolutions guarded now.
    """
    guarded = 0
    for conv in module.modules():
        if isinstance(conv, nn.Conv2d) and max(conv.stride) > 1:
            if conv.__dict__.get("_fgd_guarded"):
                continue
            conv.register_forward_pre_hook(_enter_float32)
            conv.register_forward_hook(_leave_float32, always_call=True)
            conv.__dict__["_fgd_guarded"] = True
            guarded += 1
    return guarded


def autocast(device: torch.device, config: TrainConfig) -> tuple[Any, torch.dtype | None]:
    """The autocast context of training on `device`, and its dtype."""
    dtype = autocast_dtype(device, config)
    if dtype is None:
        return nullcontext(), None
    return torch.autocast(device.type, dtype=dtype), dtype


def train_loop(
    module: nn.Module,
    loader: Any,
    config: TrainConfig,
    *,
    device: torch.device,
    callbacks: Callbacks | None = None,
    evaluate: Callable[[int], dict[str, float]] | None = None,
    resume: dict[str, Any] | None = None,
    extra_state: Callable[[], dict[str, Any]] | None = None,
) -> LoopResult:
    """Train `module` for `config.schedule.iterations` steps.

    Args:
        module: returns a dict of named loss terms; has `trainable_parameters()` and
            `checkpoint_state()` / `load_checkpoint_state()` (see `TrainModule`).
        loader: a loader from `fgd_core.data.build_train_loader` (resumable by step).
        evaluate: called with the step at each evaluation; returns COCO metrics.
        resume: a checkpoint state from an earlier call: training continues exactly there.
        extra_state: merged into every checkpoint (e.g. the job's configuration).
    """
    cb = callbacks or Callbacks()
    mod: TrainModule = module  # type: ignore[assignment]
    params = list(mod.trainable_parameters())
    optimizer = build_optimizer(params, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, config))
    amp_context, amp_dtype = autocast(device, config)
    if amp_dtype is torch.bfloat16 and device.type == "cpu":
        keep_tiny_strided_convs_in_float32(module)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype is torch.float16)
    start = 0
    if resume is not None:
        mod.load_checkpoint_state(resume)
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        if "scaler" in resume:
            scaler.load_state_dict(resume["scaler"])
        start = int(resume["step"])
        set_rng_state(resume["rng"])

    def state(step: int) -> dict[str, Any]:
        # Copies, not views of live tensors, unless the callback says it serializes at once:
        # the state stays as it was at `step` while training goes on (a callback may keep it
        # in memory or hand it to another thread).
        live = {
            **mod.checkpoint_state(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "step": step,
            "rng": rng_state(),
            **(extra_state() if extra_state else {}),
        }
        return copy.deepcopy(live) if cb.copy_checkpoint_state else live

    total_steps = config.schedule.iterations
    result = LoopResult(steps=start)
    mod.train(True)
    batches = iterate_from(loader, start)
    train_time = 0.0
    for step in range(start, total_steps):
        t0 = time.perf_counter()
        images, targets = _to_device(next(batches), device)
        with amp_context:
            losses = mod(images, targets)
        total = torch.stack([v.float() for v in losses.values()]).sum()
        _check_finite(losses, total, step + 1)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(total).backward()
        grad_norm = None
        if config.clip_grad_norm is not None:
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, config.clip_grad_norm)
            if amp_dtype is not torch.float16 and not bool(torch.isfinite(grad_norm)):
                raise NonFiniteLossError(
                    f"gradient norm became non-finite at step {step + 1} "
                    f"(losses: {', '.join(f'{k}={float(v):.4g}' for k, v in losses.items())})"
                )
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        done = step + 1
        train_time += time.perf_counter() - t0
        result.steps = done
        if done % max(1, config.log_every) == 0 or done == total_steps:
            metrics = {k: float(v.detach()) for k, v in losses.items()}
            metrics["loss"] = float(total.detach())
            metrics["lr"] = optimizer.param_groups[0]["lr"]
            if grad_norm is not None:
                metrics["grad_norm"] = float(grad_norm)
            result.last_metrics = metrics
            if cb.on_metrics:
                cb.on_metrics(done, metrics)
        if cb.on_progress:
            cb.on_progress(done, total_steps)
        last = done == total_steps
        stop = bool(cb.should_stop and cb.should_stop(done))
        if evaluate is not None and (
            last or stop or (config.eval_every and done % config.eval_every == 0)
        ):
            metrics = evaluate(done)
            result.history.append((done, metrics))
            if cb.on_evaluation:
                cb.on_evaluation(done, metrics)
            mod.train(True)
        if cb.on_checkpoint and (
            last or stop or (config.checkpoint_every and done % config.checkpoint_every == 0)
        ):
            cb.on_checkpoint(done, state(done))
        if stop:
            result.stopped_early = True
            break
    result.train_seconds = train_time
    return result
