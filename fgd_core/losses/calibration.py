"""Loss-scale calibration: FGD weights and temperature fitted to a detector and its data.

Published FGD weights were tuned for 256-channel FPNs on COCO at ~800x1333; on other detectors,
datasets and resolutions they make the distillation terms orders of magnitude larger or smaller
than the detection loss. `calibrate` keeps the authors' ratios between alpha, beta, gamma and
lambda and scales them by one common factor so that the weighted distillation total stands in a
chosen ratio to the detection loss, and proposes a temperature at which the teacher's spatial
attention is spread rather than nearly one-hot.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from fgd_core.losses.dense import attention_from_sums
from fgd_core.losses.fgd import MultiLevelFGD, hparams_of

# Temperatures tried, smallest first; the authors' 0.5 and 0.8 are on it.
TEMPERATURE_GRID = (0.5, 0.8, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0, 32.0)


@dataclass(frozen=True)
class Calibration:
    """Result of `calibrate`."""

    alpha: float
    beta: float
    gamma: float
    lambda_: float
    temp: float
    factor: float  # common multiplier applied to the base weights
    ratio: float  # target (weighted distillation total) / (detection loss)
    detection_loss: float
    distill_loss_before: float  # weighted total with the base weights, at `temp`
    max_cell_share: dict[str, float] = field(default_factory=dict)  # per level, at `temp`

    @property
    def hparams(self) -> dict[str, float]:
        """The FGD hyperparameters under their user-facing names."""
        return hparams_of(self)


def spatial_max_share(teacher_feat: Tensor, temp: float) -> float:
    """Median over images of the largest cell's share of the teacher's spatial attention."""
    B, C, H, W = teacher_feat.shape
    flat = teacher_feat.detach().float().reshape(B, C, H * W).abs()
    spatial, _ = attention_from_sums(flat.sum(dim=1), flat.sum(dim=2), temp)
    share = spatial.max(dim=1).values / (H * W)  # softmax mass of the largest cell
    return float(share.median())


def propose_temperature(
    teacher_feats: Mapping[str, Tensor],
    *,
    max_share: float = 0.25,
    min_cells: int = 64,
    grid: Sequence[float] = TEMPERATURE_GRID,
) -> float:
    """Smallest temperature on `grid` at which no main level's largest cell holds > max_share.

    Main levels are those with at least `min_cells` cells (the coarsest levels of small inputs
    hold a handful of cells, where one cell must hold a large share); if none has, the finest.
    """
    sizes = {k: v.shape[-2] * v.shape[-1] for k, v in teacher_feats.items()}
    main = [k for k, n in sizes.items() if n >= min_cells] or [max(sizes, key=sizes.__getitem__)]
    for temp in grid:
        if all(spatial_max_share(teacher_feats[k], temp) <= max_share for k in main):
            return float(temp)
    return float(grid[-1])


@torch.no_grad()
def calibrate(
    loss: MultiLevelFGD,
    student_feats: Mapping[str, Tensor],
    teacher_feats: Mapping[str, Tensor],
    boxes: Sequence[Tensor],
    batch_input_size: tuple[int, int],
    detection_loss: float | Tensor,
    *,
    ratio: float = 1.0,
    base_weights: Mapping[str, float] | None = None,
    temp: float | None = None,
    image_sizes: Sequence[tuple[int, int]] | None = None,
    max_share: float = 0.25,
) -> Calibration:
    """Scale FGD's weights so distillation is `ratio` times the detection loss on one batch.

    Args:
        loss: the multi-level FGD loss (its GcBlocks and align convs are used as they are).
        student_feats, teacher_feats: FPN levels of one batch, keyed like `loss.levels`.
        boxes: one (N_i, 4) tensor per image, `[x1, y1, x2, y2]` in batched-input pixels.
        batch_input_size: (H_in, W_in) of the padded batch.
        detection_loss: the student's detection loss on that batch (the sum of its terms).
        ratio: target (weighted FGD total) / (detection loss).
        base_weights: alpha, beta, gamma, lambda whose ratios are kept; default the loss's own.
        temp: keep this temperature; None proposes one with `propose_temperature`.

    Returns:
        A `Calibration`; apply it with `loss.set_hparams(**calibration.hparams)`.
    """
    if ratio <= 0:
        raise ValueError(f"ratio must be positive, got {ratio}")
    det = float(detection_loss)
    if not det > 0 or det != det:
        raise ValueError(f"detection_loss must be a positive finite number, got {det}")
    base = dict(base_weights) if base_weights is not None else loss.hparams
    base.pop("temp", None)
    if "lambda_" in base:
        base["lambda"] = base.pop("lambda_")
    missing = {"alpha", "beta", "gamma", "lambda"} - set(base)
    if missing:
        raise ValueError(f"base_weights lacks {sorted(missing)}")
    distilled = {k: teacher_feats[k] for k in loss.level_names}
    chosen = (
        float(temp) if temp is not None else propose_temperature(distilled, max_share=max_share)
    )
    previous = loss.hparams
    loss.set_hparams(temp=chosen)
    try:
        raw = loss.unweighted_per_level(
            student_feats, teacher_feats, boxes, batch_input_size, image_sizes
        )
    finally:
        loss.set_hparams(temp=previous["temp"])
    total = 0.0
    for terms in raw.values():
        total += (
            base["alpha"] * float(terms["fg"])
            + base["beta"] * float(terms["bg"])
            + base["gamma"] * float(terms["attention"])
            + base["lambda"] * float(terms["global"])
        )
    if not total > 0:
        raise ValueError(
            "the distillation terms are zero on this batch (student equals teacher?); "
            "calibrate on a batch where they differ"
        )
    factor = ratio * det / total
    return Calibration(
        alpha=base["alpha"] * factor,
        beta=base["beta"] * factor,
        gamma=base["gamma"] * factor,
        lambda_=base["lambda"] * factor,
        temp=chosen,
        factor=factor,
        ratio=ratio,
        detection_loss=det,
        distill_loss_before=total,
        max_cell_share={k: spatial_max_share(v, chosen) for k, v in distilled.items()},
    )
