"""GCNet context block used by FGD's global (relation) loss (FGD_SPEC.md, step 6)."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F


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
        assert self.conv_mask.bias is not None
        nn.init.zeros_(self.conv_mask.bias)
        last = self.channel_add[-1]
        assert isinstance(last, nn.Conv2d) and last.bias is not None
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)

    def attention_logits(self, x: Tensor) -> Tensor:
        """Per-cell context logits. x: (B, C, N) -> (B, N)."""
        w = self.conv_mask.weight.reshape(1, 1, -1).to(x.dtype)  # (1, 1, C)
        bias = self.conv_mask.bias
        assert bias is not None
        return torch.matmul(w, x).squeeze(1) + bias.to(x.dtype)

    def transform(self, context: Tensor) -> Tensor:
        """`add(context)`: (B, C) -> (B, C).

        The 1x1 convolutions of `channel_add` act on a 1x1 map, so they run as matrix products
        on the (B, C) vectors, and the LayerNorm over (hidden, 1, 1) as one over hidden: the
        same function as `channel_add` (its modules keep the parameters), without a
        convolution's set-up cost, which dominates at this size.
        """
        expand, norm, _, project = self.channel_add
        assert isinstance(expand, nn.Conv2d) and isinstance(project, nn.Conv2d)
        assert isinstance(norm, nn.LayerNorm)
        hidden = F.linear(context, expand.weight.flatten(1), expand.bias)
        hidden = F.layer_norm(
            hidden,
            hidden.shape[-1:],
            None if norm.weight is None else norm.weight.flatten(),
            None if norm.bias is None else norm.bias.flatten(),
            norm.eps,
        )
        return F.linear(torch.relu(hidden), project.weight.flatten(1), project.bias)

    def forward(self, x: Tensor) -> Tensor:
        """`R(F)` in full, (B, C, H, W) -> (B, C, H, W) (reference form, not the fast path)."""
        B, C, H, W = x.shape
        flat = x.reshape(B, C, H * W)
        p = torch.softmax(self.attention_logits(flat).float(), dim=-1).to(x.dtype)  # (B, N)
        context = torch.bmm(flat, p[:, :, None])[:, :, 0]  # (B, C)
        return x + self.transform(context)[:, :, None, None]
