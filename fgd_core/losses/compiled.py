"""Opt-in compiled form of one level's FGD terms: native CPU kernels, else `torch.compile`.

On the CPU, float32 features go through the native kernels of `fgd_core.losses.native` (C++
built once per machine in about a second, the fastest form there); everything else (CUDA,
other dtypes, a machine without a C++ compiler) through `level_terms` under `torch.compile`.

`level_terms` writes the four terms of FGD_SPEC.md (steps 2-6) with the algebra of
`fgd_core.losses.dense` (every term from `D = S - T` and per-cell / per-channel sums; the global
term through the one vector per image and channel that each GcBlock adds) as ordinary tensor
ops. On the CPU inductor fuses the forward into one loop over channels and one over cells, each reading
both features, and AOTAutograd derives the backward, which inductor runs as one loop over
channels per feature (the context gradients) and one loop that writes the student gradient and
sums the logit-conv weight gradients. The function also runs uncompiled, but then every op is a
full-size pass.

`CompiledLevel` owns the compiled callables:

- It is compiled on first use, with the inductor cache under a stable folder (an existing
  `TORCHINDUCTOR_CACHE_DIR`, else `$FGD_HOME/cache/inductor`, `FGD_HOME` defaulting to
  `~/.fgd`), so later processes reuse the generated code (seconds instead of tens of seconds).
- The temperature goes in as a 0-d tensor and the weights are applied outside, so changing
  either does not recompile. The batch and cell dimensions are marked dynamic from the first
  call, so levels of different sizes and batches of varying sizes share a few symbolic graphs
  (inductor specialises on whether a reduction is longer than 4096, which gives about three
  graphs in all, plus one per size-1 dimension met) instead of one graph per shape.
- Inductor writes its CPU kernels for the intra-op thread count of the moment, so there is one
  compiled callable per thread count.
- The backward is compiled together with the forward (not lazily at the first backward), so
  every compilation happens inside a forward call. If a call raises (no C++ compiler, an
  unsupported backend) and the eager path (`dense_terms`) does not, one warning is logged and
  the eager path is used from then on; it gives the same results.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fgd_core.losses.dense import dense_terms, logit_conv
from fgd_core.losses.gcblock import ContextBlock
from fgd_core.losses.native import NativeUnavailable, native_passes, supported

log = logging.getLogger(__name__)

ENV_SWITCH = "FGD_COMPILE"
_TRUE = ("1", "true", "yes", "on")
TERM_NAMES = ("fg", "bg", "attention", "global")


def compile_requested(flag: bool | None) -> bool:
    """`flag` itself, or when None, whether the env var FGD_COMPILE is "1" or "true"."""
    if flag is not None:
        return bool(flag)
    return os.environ.get(ENV_SWITCH, "").strip().lower() in _TRUE


def inductor_cache_dir() -> Path:
    """The inductor cache folder: TORCHINDUCTOR_CACHE_DIR if set, else $FGD_HOME/cache/inductor.

    Sets TORCHINDUCTOR_CACHE_DIR when it was unset, so that inductor (and Triton below it, on
    CUDA) writes there. Inductor itself writes its default (a folder under the system's temp
    folder, cleared on reboot) into the variable once it has looked it up; that value counts as
    unset.
    """
    existing = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if existing and existing != _inductor_default():
        return Path(existing)
    home = Path(os.environ.get("FGD_HOME") or "~/.fgd").expanduser()
    path = home / "cache" / "inductor"
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)
    return path


def _inductor_default() -> str | None:
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir
    except ImportError:  # moved in another torch release: every value counts as the user's
        return None
    return os.path.abspath(default_cache_dir())


def level_terms(
    s: Tensor,
    t: Tensor,
    fg: Tensor,
    bg: Tensor,
    ones: Tensor,
    temp: Tensor,
    student_context: ContextBlock,
    teacher_context: ContextBlock,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The four unweighted terms of one level as plain tensor code (the compiled function).

    Args:
        s: (B, C, N) aligned student feature, float32.
        t: (B, C, N) teacher feature, float32, detached.
        fg, bg: (B, N) foreground and normalised background masks.
        ones: (B, N) ones. The plain sums over cells are taken against it, so that inductor
            runs them in the loop of the sums against per-cell weights (a plain sum alone is
            indexed by image-and-channel rows, which keeps it in a loop of its own).
        temp: 0-d float32 tensor, the attention temperature.

    Returns:
        L_fg, L_bg, L_at, L_global, scalars, each divided by B.
    """
    B, C, N = s.shape
    abs_s, abs_t = s.abs(), t.abs()
    # Sums over channels, per cell: |F| (spatial attention), the context logits, and Q = D^2
    # (which reads both features, so that one loop over channels serves S and T).
    s_spatial = N * torch.softmax(abs_s.sum(1) / (C * temp), dim=1)  # (B, N)
    t_spatial = N * torch.softmax(abs_t.sum(1) / (C * temp), dim=1)
    # The logit weights are expanded over the batch, so that their gradient is a sum over cells
    # per image and channel (fused into the loop that writes the student gradient).
    s_weight, s_bias = logit_conv(student_context)
    t_weight, t_bias = logit_conv(teacher_context)
    s_logit = (s * s_weight.reshape(1, C, 1).expand(B, C, 1)).sum(1) + s_bias  # (B, N)
    t_logit = (t * t_weight.reshape(1, C, 1).expand(B, C, 1)).sum(1) + t_bias
    d = s - t
    sq = d * d
    q_sum = sq.sum(1).sum()
    # Sums over cells, per channel: |F| (channel attention), the contexts, D, and D^2 against
    # each mask times A_S(T); A_C(T) weighs the focal sums afterwards.
    unit = ones[:, None]
    s_channel = C * torch.softmax((abs_s * unit).sum(2) / (N * temp), dim=1)  # (B, C)
    t_channel = C * torch.softmax((abs_t * unit).sum(2) / (N * temp), dim=1)
    s_ctx = (s * torch.softmax(s_logit, dim=1)[:, None]).sum(2)  # (B, C)
    t_ctx = (t * torch.softmax(t_logit, dim=1)[:, None]).sum(2)
    d_sum = (d * unit).sum(2)  # (B, C)
    fg_focal = (sq * (fg * t_spatial)[:, None]).sum(2)  # (B, C)
    bg_focal = (sq * (bg * t_spatial)[:, None]).sum(2)
    loss_fg = (t_channel * fg_focal).sum() / B
    loss_bg = (t_channel * bg_focal).sum() / B
    loss_at = ((s_channel - t_channel).abs().sum() + (s_spatial - t_spatial).abs().sum()) / B
    v = student_context.transform(s_ctx) - teacher_context.transform(t_ctx)  # (B, C)
    loss_global = (q_sum + 2.0 * (v * d_sum).sum() + N * (v * v).sum()) / B
    return loss_fg, loss_bg, loss_at, loss_global


class CompiledLevel:
    """The native kernels for float32 CPU features, else `level_terms` under `torch.compile`
    (compiled on first use), with the eager fallback.

    Args:
        compile_options: extra keyword arguments of `torch.compile` (`fullgraph` is on).
        mark_dynamic: mark the batch and cell dimensions dynamic from the first call (else
            `torch.compile`'s default: static first, dynamic after a size changes).
        native: use the native kernels where they apply (False: `torch.compile` everywhere).
    """

    def __init__(
        self,
        compile_options: dict[str, Any] | None = None,
        *,
        mark_dynamic: bool = True,
        native: bool = True,
    ) -> None:
        self.compile_options = {"fullgraph": True, **(compile_options or {})}
        self.mark_dynamic = mark_dynamic
        self.native = native
        self.native_failed = False
        self.failed = False
        self._fns: dict[int, Callable[..., tuple[Tensor, ...]]] = {}

    def _compiled(self) -> Callable[..., tuple[Tensor, ...]]:
        # Inductor writes its CPU kernels for the intra-op thread count at compile time (and
        # dynamo does not guard on it): one compiled callable per thread count.
        threads = torch.get_num_threads()
        if threads not in self._fns:
            inductor_cache_dir()
            self._fns[threads] = torch.compile(level_terms, **self.compile_options)
        return self._fns[threads]

    def __call__(
        self,
        s: Tensor,
        t: Tensor,
        fg: Tensor,
        bg: Tensor,
        *,
        temp: float,
        student_context: ContextBlock,
        teacher_context: ContextBlock,
    ) -> dict[str, Tensor]:
        """As `dense_terms`: (B, C, H, W) features and (B, H, W) masks in, the four terms out."""
        if self.native and not self.native_failed and supported(s, t, fg, bg):
            try:
                passes = native_passes()
            except NativeUnavailable as exc:
                self.native_failed = True
                log.warning("FGD: no native CPU kernels (%s); using torch.compile", exc)
            else:
                return dense_terms(
                    *(s, t, fg, bg),
                    temp=temp,
                    student_context=student_context,
                    teacher_context=teacher_context,
                    passes=passes,
                )
        if not self.failed:
            B, C, H, W = t.shape
            args = (
                s.reshape(B, C, H * W),
                t.reshape(B, C, H * W),
                fg.reshape(B, H * W),
                bg.reshape(B, H * W),
                fg.new_ones(B, H * W),
            )
            try:
                import torch._functorch.config as functorch_config

                if self.mark_dynamic:
                    for x in args:
                        torch._dynamo.maybe_mark_dynamic(x, 0)
                        torch._dynamo.maybe_mark_dynamic(x, x.dim() - 1)
                fn = self._compiled()
                with functorch_config.patch(force_non_lazy_backward_lowering=True):
                    out = fn(*args, s.new_full((), temp), student_context, teacher_context)
            except Exception as exc:
                # The eager path raises too when the inputs are at fault: then the compiled
                # path stays on. Otherwise the compiled path is off for good.
                terms = self._eager(s, t, fg, bg, temp, student_context, teacher_context)
                self.failed = True
                log.warning(
                    "FGD: the compiled loss failed (%s: %s); using the eager path from now on",
                    type(exc).__name__,
                    exc,
                )
                return terms
            return dict(zip(TERM_NAMES, out, strict=True))
        return self._eager(s, t, fg, bg, temp, student_context, teacher_context)

    @staticmethod
    def _eager(
        s: Tensor,
        t: Tensor,
        fg: Tensor,
        bg: Tensor,
        temp: float,
        student_context: ContextBlock,
        teacher_context: ContextBlock,
    ) -> dict[str, Tensor]:
        return dense_terms(
            s,
            t,
            fg,
            bg,
            temp=temp,
            student_context=student_context,
            teacher_context=teacher_context,
        )


_DEFAULT = CompiledLevel()


def compiled_terms(
    s: Tensor,
    t: Tensor,
    fg: Tensor,
    bg: Tensor,
    *,
    temp: float,
    student_context: ContextBlock,
    teacher_context: ContextBlock,
) -> dict[str, Tensor]:
    """`dense_terms` through the process-wide compiled callable (shared by every level)."""
    return _DEFAULT(
        s, t, fg, bg, temp=temp, student_context=student_context, teacher_context=teacher_context
    )
