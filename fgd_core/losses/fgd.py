"""FGD: Focal and Global Distillation for one FPN level and for a whole pyramid.

Yang et al., "Focal and Global Knowledge Distillation for Detectors", CVPR 2022
(arXiv 2111.11837), Eq. 1-10; the exact definition this code follows is FGD_SPEC.md.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import Tensor, nn

from fgd_core.losses.compiled import compile_requested, compiled_terms
from fgd_core.losses.dense import dense_terms
from fgd_core.losses.gcblock import ContextBlock
from fgd_core.losses.masks import BoxFrame, build_masks, validate_boxes

TERMS = ("fg", "bg", "attention", "global")
LOSS_KEYS = tuple(f"loss_fgd_{t}" for t in TERMS)


def hparams_of(obj: object) -> dict[str, float]:
    """alpha, beta, gamma, lambda (from `lambda_`) and temp of `obj`, by their user-facing names."""
    return {
        "alpha": float(obj.alpha),  # type: ignore[attr-defined]
        "beta": float(obj.beta),  # type: ignore[attr-defined]
        "gamma": float(obj.gamma),  # type: ignore[attr-defined]
        "lambda": float(obj.lambda_),  # type: ignore[attr-defined]
        "temp": float(obj.temp),  # type: ignore[attr-defined]
    }


class FGDLoss(nn.Module):
    """FGD loss of one FPN level.

    The weights (`alpha`, `beta`, `gamma`, `lambda_`) and `temp` are plain attributes: they may
    change between steps (calibration, PBT) without rebuilding the module.

    `compile` picks how the dense terms are computed: False the eager path
    (`fgd_core.losses.dense`), True the compiled one (`fgd_core.losses.compiled`: native kernels
    on the CPU, `torch.compile` elsewhere, with an eager fallback), None (default) the env var FGD_COMPILE ("1" or "true" enables), read at
    each call. Both give the same values and gradients.
    """

    def __init__(
        self,
        student_channels: int,
        teacher_channels: int,
        *,
        temp: float = 0.5,
        alpha: float,
        beta: float,
        gamma: float,
        lambda_: float,
        box_frame: BoxFrame = "padded",
        compile: bool | None = None,
    ) -> None:
        super().__init__()
        if box_frame not in ("padded", "image"):
            raise ValueError(f'box_frame must be "padded" or "image", got {box_frame!r}')
        self.student_channels = student_channels
        self.teacher_channels = teacher_channels
        self.temp = float(temp)
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.gamma = float(gamma)
        self.lambda_ = float(lambda_)
        self.box_frame: BoxFrame = box_frame
        # Not `self.compile`: that would hide nn.Module.compile.
        self.use_compile: bool | None = compile
        # 1x1 conv (with bias) mapping the student's width to the teacher's, only when they differ.
        self.align: nn.Module | None = None
        if student_channels != teacher_channels:
            self.align = nn.Conv2d(student_channels, teacher_channels, kernel_size=1)
            nn.init.kaiming_uniform_(self.align.weight, a=5**0.5)
        self.student_context = ContextBlock(teacher_channels)
        self.teacher_context = ContextBlock(teacher_channels)

    @property
    def compiled(self) -> bool:
        """Whether the next call takes the compiled path (`compile`, else FGD_COMPILE)."""
        return compile_requested(self.use_compile)

    @property
    def weights(self) -> dict[str, float]:
        """The four term weights under their user-facing names."""
        return {"alpha": self.alpha, "beta": self.beta, "gamma": self.gamma, "lambda": self.lambda_}

    def set_hparams(self, **values: float) -> None:
        """Change weights or temperature in place; keys: alpha, beta, gamma, lambda(_), temp."""
        for key, value in values.items():
            name = "lambda_" if key == "lambda" else key
            if name not in ("alpha", "beta", "gamma", "lambda_", "temp"):
                raise ValueError(f"unknown FGD hyperparameter {key!r}")
            setattr(self, name, float(value))

    def unweighted(
        self,
        student_feat: Tensor,
        teacher_feat: Tensor,
        boxes: Sequence[Tensor],
        batch_input_size: tuple[int, int],
        image_sizes: Sequence[tuple[int, int]] | None = None,
    ) -> dict[str, Tensor]:
        """The four terms before weighting, keyed "fg", "bg", "attention", "global"."""
        if student_feat.dim() != 4 or teacher_feat.dim() != 4:
            raise ValueError(
                "student and teacher features must be (B, C, H, W); got "
                f"{tuple(student_feat.shape)} and {tuple(teacher_feat.shape)}"
            )
        if student_feat.shape[0] != teacher_feat.shape[0]:
            raise ValueError(
                f"student batch {student_feat.shape[0]} != teacher batch {teacher_feat.shape[0]}"
            )
        if student_feat.shape[-2:] != teacher_feat.shape[-2:]:
            raise ValueError(
                "student and teacher feature maps differ in spatial size: student "
                f"{tuple(student_feat.shape[-2:])} vs teacher {tuple(teacher_feat.shape[-2:])}; "
                "both must see the same batched input and produce the same levels"
            )
        if student_feat.shape[1] != self.student_channels:
            raise ValueError(
                f"student feature has {student_feat.shape[1]} channels, "
                f"this loss was built for {self.student_channels}"
            )
        if teacher_feat.shape[1] != self.teacher_channels:
            raise ValueError(
                f"teacher feature has {teacher_feat.shape[1]} channels, "
                f"this loss was built for {self.teacher_channels}"
            )
        B, _, H, W = teacher_feat.shape
        validate_boxes(boxes, B)
        fg, bg = build_masks(boxes, (H, W), batch_input_size, image_sizes, box_frame=self.box_frame)
        s = self.align(student_feat) if self.align is not None else student_feat
        terms = compiled_terms if self.compiled else dense_terms
        return terms(
            s.float(),
            teacher_feat.detach().float(),
            fg.to(s.device),
            bg.to(s.device),
            temp=self.temp,
            student_context=self.student_context,
            teacher_context=self.teacher_context,
        )

    def forward(
        self,
        student_feat: Tensor,
        teacher_feat: Tensor,
        boxes: Sequence[Tensor],
        batch_input_size: tuple[int, int],
        image_sizes: Sequence[tuple[int, int]] | None = None,
    ) -> dict[str, Tensor]:
        """Weighted terms `loss_fgd_fg`, `loss_fgd_bg`, `loss_fgd_attention`, `loss_fgd_global`.

        Args:
            student_feat: (B, Cs, H, W) student FPN level.
            teacher_feat: (B, C, H, W) teacher FPN level (no gradient reaches it).
            boxes: one (N_i, 4) float tensor per image, `[x1, y1, x2, y2]` in pixels of the
                batched (padded) input.
            batch_input_size: (H_in, W_in) of the padded batch.
            image_sizes: unpadded (h, w) per image, needed when `box_frame == "image"`.
        """
        raw = self.unweighted(student_feat, teacher_feat, boxes, batch_input_size, image_sizes)
        return weight_terms(raw, self.weights)


def weight_terms(raw: Mapping[str, Tensor], weights: Mapping[str, float]) -> dict[str, Tensor]:
    """Multiply raw terms by alpha, beta, gamma, lambda into the `loss_fgd_*` keys."""
    return {
        "loss_fgd_fg": raw["fg"] * weights["alpha"],
        "loss_fgd_bg": raw["bg"] * weights["beta"],
        "loss_fgd_attention": raw["attention"] * weights["gamma"],
        "loss_fgd_global": raw["global"] * weights["lambda"],
    }


class MultiLevelFGD(nn.Module):
    """One FGDLoss per FPN level (an `nn.ModuleDict` keyed by level name), summed over levels.

    `compile` is passed to every level (see FGDLoss); the levels share one compiled function.
    """

    def __init__(
        self,
        levels: Sequence[str],
        student_channels: int,
        teacher_channels: int,
        *,
        temp: float = 0.5,
        alpha: float,
        beta: float,
        gamma: float,
        lambda_: float,
        box_frame: BoxFrame = "padded",
        compile: bool | None = None,
    ) -> None:
        super().__init__()
        if not levels:
            raise ValueError("MultiLevelFGD needs at least one level")
        self.levels = nn.ModuleDict(
            {
                name: FGDLoss(
                    student_channels,
                    teacher_channels,
                    temp=temp,
                    alpha=alpha,
                    beta=beta,
                    gamma=gamma,
                    lambda_=lambda_,
                    box_frame=box_frame,
                    compile=compile,
                )
                for name in levels
            }
        )

    @property
    def level_names(self) -> list[str]:
        return list(self.levels.keys())

    def set_hparams(self, **values: float) -> None:
        """Change weights or temperature of every level (keys as in FGDLoss.set_hparams)."""
        for loss in self.levels.values():
            assert isinstance(loss, FGDLoss)
            loss.set_hparams(**values)

    @property
    def hparams(self) -> dict[str, float]:
        return hparams_of(next(iter(self.levels.values())))

    def unweighted_per_level(
        self,
        student_feats: Mapping[str, Tensor],
        teacher_feats: Mapping[str, Tensor],
        boxes: Sequence[Tensor],
        batch_input_size: tuple[int, int],
        image_sizes: Sequence[tuple[int, int]] | None = None,
    ) -> dict[str, dict[str, Tensor]]:
        """Raw terms of each level: {level: {"fg", "bg", "attention", "global"}}."""
        out = {}
        for name, loss in self.levels.items():
            for role, feats in (("student", student_feats), ("teacher", teacher_feats)):
                if name not in feats:
                    raise ValueError(
                        f"{role} features have no level {name!r}; they have {sorted(feats)}"
                    )
            assert isinstance(loss, FGDLoss)
            out[name] = loss.unweighted(
                student_feats[name], teacher_feats[name], boxes, batch_input_size, image_sizes
            )
        return out

    def forward(
        self,
        student_feats: Mapping[str, Tensor],
        teacher_feats: Mapping[str, Tensor],
        boxes: Sequence[Tensor],
        batch_input_size: tuple[int, int],
        image_sizes: Sequence[tuple[int, int]] | None = None,
    ) -> dict[str, Tensor]:
        """Weighted `loss_fgd_*` terms summed over levels."""
        per_level = self.unweighted_per_level(
            student_feats, teacher_feats, boxes, batch_input_size, image_sizes
        )
        total: dict[str, Tensor] = {}
        for name, raw in per_level.items():
            loss = self.levels[name]
            assert isinstance(loss, FGDLoss)
            for key, value in weight_terms(raw, loss.weights).items():
                total[key] = total[key] + value if key in total else value
        return total
