"""A plain implementation of FGD_SPEC.md: loops over images and boxes, formulas as written.

Kept as the baseline of `benchmarks/fgd_loss.py` and as an independent reference in the tests.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def reference_masks(
    boxes: Tensor, feat_hw: tuple[int, int], frame_hw: tuple[float, float]
) -> tuple[Tensor, Tensor]:
    """One image's (M_fg, M_bg), each (H, W), painted box by box."""
    H, W = feat_hw
    fg = torch.zeros(H, W, dtype=torch.float64)
    for x1, y1, x2, y2 in boxes.tolist():
        w_min = math.floor(x1 * W / frame_hw[1])
        w_max = math.ceil(x2 * W / frame_hw[1])
        h_min = math.floor(y1 * H / frame_hw[0])
        h_max = math.ceil(y2 * H / frame_hw[0])
        value = 1.0 / ((h_max + 1 - h_min) * (w_max + 1 - w_min))
        h0, h1 = max(0, min(h_min, H - 1)), max(0, min(h_max, H - 1))
        w0, w1 = max(0, min(w_min, W - 1)), max(0, min(w_max, W - 1))
        region = fg[h0 : h1 + 1, w0 : w1 + 1]
        fg[h0 : h1 + 1, w0 : w1 + 1] = torch.maximum(region, torch.full_like(region, value))
    bg = (fg == 0).to(torch.float64)
    if bg.sum() > 0:
        bg = bg / bg.sum()
    return fg.float(), bg.float()


def reference_fgd_level(
    student: Tensor,
    teacher: Tensor,
    boxes: list[Tensor],
    batch_input_size: tuple[int, int],
    image_sizes: list[tuple[int, int]] | None,
    *,
    temp: float,
    align: nn.Module | None,
    student_context: nn.Module,
    teacher_context: nn.Module,
    box_frame: str = "padded",
) -> dict[str, Tensor]:
    """Unweighted FGD terms of one level, image by image."""
    s_all = align(student) if align is not None else student
    B, C, H, W = teacher.shape
    terms = {k: s_all.new_zeros(()) for k in ("fg", "bg", "attention", "global")}
    t_all = teacher.detach()
    for i in range(B):
        s = s_all[i : i + 1]
        t = t_all[i : i + 1]
        frame = batch_input_size if box_frame == "padded" else image_sizes[i]  # type: ignore[index]
        fg, bg = reference_masks(boxes[i], (H, W), frame)

        def attention(f: Tensor) -> tuple[Tensor, Tensor]:
            v = f.abs()
            spatial = H * W * torch.softmax((v.mean(dim=1).reshape(1, -1) / temp), dim=1)
            channel = C * torch.softmax(v.mean(dim=(2, 3)) / temp, dim=1)
            return spatial.reshape(1, H, W), channel.reshape(1, C)

        t_spatial, t_channel = attention(t)
        s_spatial, s_channel = attention(s)
        weight = t_spatial[:, None] * t_channel[:, :, None, None]  # (1, C, H, W)
        sq = (s - t) ** 2
        terms["fg"] = terms["fg"] + (fg[None, None] * weight * sq).sum()
        terms["bg"] = terms["bg"] + (bg[None, None] * weight * sq).sum()
        terms["attention"] = (
            terms["attention"]
            + (s_channel - t_channel).abs().sum()
            + (s_spatial - t_spatial).abs().sum()
        )
        terms["global"] = terms["global"] + ((student_context(s) - teacher_context(t)) ** 2).sum()
    return {k: v / B for k, v in terms.items()}
