"""Foreground / background masks of FGD from ground-truth boxes (FGD_SPEC.md, step 3)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

BoxFrame = Literal["padded", "image"]

# Upper bound on the elements of one (images, boxes, H, W) block of the max-reduction below:
# the masks never hold more than this many floats at once, however many boxes an image has.
_BLOCK_ELEMENTS = 1 << 22


def validate_boxes(boxes: Sequence[Tensor], batch_size: int) -> None:
    """Raise ValueError unless `boxes` holds one finite (N_i, 4) tensor per image."""
    if len(boxes) != batch_size:
        raise ValueError(
            f"boxes has {len(boxes)} entries but the batch holds {batch_size} images: "
            "pass one (N_i, 4) tensor per image"
        )
    for i, b in enumerate(boxes):
        if not isinstance(b, Tensor):
            raise ValueError(f"boxes[{i}] must be a tensor, got {type(b).__name__}")
        if b.dim() != 2 or b.shape[-1] != 4:
            raise ValueError(
                f"boxes[{i}] must have shape (N, 4) as [x1, y1, x2, y2], got {tuple(b.shape)}"
            )
        if b.numel() and not bool(torch.isfinite(b).all()):
            raise ValueError(f"boxes[{i}] holds NaN or infinite coordinates")


def box_cell_ranges(
    boxes: Tensor, feat_hw: tuple[int, int], frame_hw: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Map boxes to inclusive cell ranges of one level and their FGD values.

    Args:
        boxes: (K, 4) `[x1, y1, x2, y2]` in pixels of the frame `frame_hw`.
        feat_hw: (H, W) of the feature map.
        frame_hw: (K, 2) height and width of the pixel frame each box is measured in.

    Returns:
        h_min, h_max, w_min, w_max (K,) int64, clipped to the map, inclusive at both ends;
        value (K,) = 1 / (rows * cols) with rows and cols counted before clipping.
    """
    H, W = feat_hw
    b = boxes.to(torch.float64)
    fh = frame_hw.to(torch.float64)
    # x' = x * W / W_in, multiplied before dividing so that exact cell edges stay exact.
    w_min = torch.floor(b[:, 0] * W / fh[:, 1])
    w_max = torch.ceil(b[:, 2] * W / fh[:, 1])
    h_min = torch.floor(b[:, 1] * H / fh[:, 0])
    h_max = torch.ceil(b[:, 3] * H / fh[:, 0])
    value = 1.0 / ((h_max + 1 - h_min) * (w_max + 1 - w_min))
    h_min = h_min.clamp(0, H - 1).long()
    h_max = h_max.clamp(0, H - 1).long()
    w_min = w_min.clamp(0, W - 1).long()
    w_max = w_max.clamp(0, W - 1).long()
    return h_min, h_max, w_min, w_max, value


def build_masks(
    boxes: Sequence[Tensor],
    feat_hw: tuple[int, int],
    batch_input_size: tuple[int, int],
    image_sizes: Sequence[tuple[int, int]] | None = None,
    *,
    box_frame: BoxFrame = "padded",
) -> tuple[Tensor, Tensor]:
    """Build FGD's foreground (scale) mask and normalised background mask for one level.

    A cell's foreground value is the largest `1 / box_cells` over the boxes covering it, so
    small boxes win on overlap. The background mask is 1 where the foreground is 0, divided by
    its sum per image. Computed as a max over separable row and column indicators, in blocks of
    boxes: no Python loop over boxes, and memory bounded by `_BLOCK_ELEMENTS`, not boxes x cells.

    Args:
        boxes: one (N_i, 4) tensor per image, `[x1, y1, x2, y2]` in pixels of the batched input.
        feat_hw: (H, W) of the level.
        batch_input_size: (H_in, W_in) of the padded batch.
        image_sizes: unpadded (h, w) per image; required when `box_frame == "image"`.
        box_frame: "padded" maps boxes with the batch size, "image" with each image's size
            (the authors' mapping).

    Returns:
        (M_fg, M_bg), each (B, H, W) float32.
    """
    B = len(boxes)
    H, W = int(feat_hw[0]), int(feat_hw[1])
    device = boxes[0].device if B else torch.device("cpu")
    fg = torch.zeros(B, H, W, dtype=torch.float32, device=device)
    counts = [int(b.shape[0]) for b in boxes]
    if sum(counts):
        if box_frame == "image":
            if image_sizes is None or len(image_sizes) != B:
                raise ValueError('box_frame="image" needs image_sizes, one (h, w) per image')
            frames = [image_sizes[i] for i in range(B)]
        elif box_frame == "padded":
            frames = [(int(batch_input_size[0]), int(batch_input_size[1]))] * B
        else:
            raise ValueError(f'box_frame must be "padded" or "image", got {box_frame!r}')
        all_boxes = torch.cat([b.detach().reshape(-1, 4) for b in boxes]).to(device)
        img_idx = torch.repeat_interleave(
            torch.arange(B, device=device), torch.tensor(counts, device=device)
        )
        frame_hw = torch.tensor(frames, dtype=torch.float64, device=device)[img_idx]
        h0, h1, w0, w1, value = box_cell_ranges(all_boxes, (H, W), frame_hw)
        rows = torch.arange(H, device=device)
        cols = torch.arange(W, device=device)
        # (K, H) row indicator carrying the box value, (K, W) column indicator.
        row_val = ((rows >= h0[:, None]) & (rows <= h1[:, None])).to(torch.float32)
        row_val = row_val * value.to(torch.float32)[:, None]
        col_in = ((cols >= w0[:, None]) & (cols <= w1[:, None])).to(torch.float32)
        # Pad every image to the same number of boxes so one block covers all images.
        k_max = max(counts)
        slot = torch.arange(len(img_idx), device=device) - torch.repeat_interleave(
            torch.cumsum(torch.tensor([0] + counts[:-1], device=device), 0),
            torch.tensor(counts, device=device),
        )
        rv = torch.zeros(B, k_max, H, device=device)
        ci = torch.zeros(B, k_max, W, device=device)
        rv[img_idx, slot] = row_val
        ci[img_idx, slot] = col_in
        block = max(1, _BLOCK_ELEMENTS // max(1, B * H * W))
        for k in range(0, k_max, block):
            # (B, k, H, 1) * (B, k, 1, W) -> (B, k, H, W), reduced over the boxes of the block.
            part = (rv[:, k : k + block, :, None] * ci[:, k : k + block, None, :]).amax(1)
            torch.maximum(fg, part, out=fg)
    bg = (fg == 0).to(torch.float32)
    bg_sum = bg.sum(dim=(1, 2), keepdim=True)
    bg = torch.where(bg_sum > 0, bg / bg_sum.clamp_min(1.0), bg)
    return fg, bg
