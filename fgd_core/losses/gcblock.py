"""GCNet context block used by FGD's global (relation) loss (FGD_SPEC.md, step 6)."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class ContextBlock(nn.Module):
    """`R(F) = F + add(context(F))`, with the context-to-feature transform split out.

    FGD only ever needs `add(context(F))`, one (B, C) vector per image that is broadcast over
    the cells, so `transform` returns that vector and the caller adds it (or uses it in closed
    form) without writing a full (B, C, H, W) tensor.
    """

    def __init__(self, channels: int, ratio: float = 0.5) -> None:
        super().__init__()
        hidden = max(1, int(channels * ratio))
        self.channels = channels
        self.conv_mask = nn.Conv2d(channels, 1, kernel_size=1)  # C -> 1 logits per cell
        self.channel_add = nn.Sequential(
            nn.Conv2d(channels, hidden, kernel_size=1),
            nn.LayerNorm([hidden, 1, 1]),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, channels, kernel_size=1),
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Kaiming (fan-in) init of the mask conv, zero bias; zero the last conv of `add`."""
        nn.init.kaiming_normal_(self.conv_mask.weight, mode="fan_in", nonlinearity="relu")
        nn.init.zeros_(self.conv_mask.bias)
        last = self.channel_add[-1]
        assert isinstance(last, nn.Conv2d)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)

    def attention_logits(self, x: Tensor) -> Tensor:
        """Per-cell context logits. x: (B, C, N) -> (B, N)."""
        w = self.conv_mask.weight.reshape(1, 1, -1).to(x.dtype)  # (1, 1, C)
        return torch.matmul(w, x).squeeze(1) + self.conv_mask.bias.to(x.dtype)

    def transform(self, context: Tensor) -> Tensor:
        """`add(context)`: (B, C) -> (B, C)."""
        out = self.channel_add(context[:, :, None, None])
        return out[:, :, 0, 0]

    def forward(self, x: Tensor) -> Tensor:
        """`R(F)` in full, (B, C, H, W) -> (B, C, H, W) (reference form, not the fast path)."""
        B, C, H, W = x.shape
        flat = x.reshape(B, C, H * W)
        p = torch.softmax(self.attention_logits(flat).float(), dim=-1).to(x.dtype)  # (B, N)
        context = torch.bmm(flat, p[:, :, None])[:, :, 0]  # (B, C)
        return x + self.transform(context)[:, :, None, None]
