"""The dense part of FGD: every term from `S - T` and a few per-cell and per-channel sums.

All four terms of FGD_SPEC.md (steps 2-6) are written through these reductions, with
`N = H * W` cells, `D = S - T`, the teacher attention `a = A_C(T)` (B, C), `s = A_S(T)` (B, N):

    E[b, n]  = sum_c a[b, c] D[b, c, n]^2          (focal, per cell)
    L_fg     = sum M_fg * s * E / B,  L_bg = sum M_bg * s * E / B
    Q[b, c]  = sum_n D[b, c, n]^2,  Dsum = sum_n D
    L_global = sum_{b,c,n} (D + v[b, c])^2 / B
             = (sum Q + 2 sum v * Dsum + N sum v^2) / B

since each GcBlock adds one vector per image and channel (`v = add_s(ctx_S) - add_t(ctx_T)`).
The passes over full-size tensors are counted and kept few: one custom autograd function holds
every dense use of the student feature, so its gradient is written once, in a few fused passes,
instead of being summed from separate branches.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx

from fgd_core.losses.gcblock import ContextBlock


def attention_from_sums(
    cell_sum: Tensor, channel_sum: Tensor, temp: float
) -> tuple[Tensor, Tensor]:
    """Spatial and channel attention from sums of |F|.

    Args:
        cell_sum: (B, N) sum over channels of |F|.
        channel_sum: (B, C) sum over cells of |F|.

    Returns:
        A_S (B, N) = N * softmax(mean_C |F| / t), A_C (B, C) = C * softmax(mean_N |F| / t),
        each averaging 1 per image; softmax in float32.
    """
    N = cell_sum.shape[1]
    C = channel_sum.shape[1]
    spatial = N * torch.softmax(cell_sum.float() / (C * temp), dim=1)
    channel = C * torch.softmax(channel_sum.float() / (N * temp), dim=1)
    return spatial, channel


def _context_probs(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """softmax over cells of the GcBlock's per-cell logits. x (B, C, N) -> (B, N)."""
    B, C, _ = x.shape
    logits = torch.bmm(weight.reshape(1, 1, C).expand(B, 1, C), x)[:, 0] + bias
    return torch.softmax(logits, dim=-1)


def _weighted_cell_sum(x: Tensor, weights: Tensor) -> Tensor:
    """sum_n x[b, c, n] weights[b, n] -> (B, C); one matrix-vector product per image."""
    return torch.stack([torch.mv(x[i], weights[i]) for i in range(x.shape[0])])


class _Workspace:
    """Reusable scratch buffers for full-size temporaries on the CPU.

    A fresh 30 MB tensor costs more in page faults than the arithmetic done in it, so the
    temporaries of the dense passes live in a few buffers that grow to the largest level and
    are reused. Nothing that outlives a call (outputs, tensors saved for backward) is taken from
    here. CUDA's caching allocator already reuses memory, so there every buffer is fresh.
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, torch.device, torch.dtype], Tensor] = {}

    def get(self, slot: str, like: Tensor) -> Tensor:
        if like.device.type != "cpu":
            return torch.empty_like(like, memory_format=torch.contiguous_format)
        key = (slot, like.device, like.dtype)
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < like.numel():
            buf = torch.empty(like.numel(), dtype=like.dtype, device=like.device)
            self._buffers[key] = buf
        return buf[: like.numel()].view(like.shape)


_WORKSPACE = _Workspace()


class _StudentDense(torch.autograd.Function):
    """All full-size work on the student feature in one node.

    Outputs (all small): E (B, N), Q (B, C), cell |S| sum (B, N), channel |S| sum (B, C),
    student context (B, C), and the sum over cells of D (B, C).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: FunctionCtx,
        s: Tensor,
        t: Tensor,
        teacher_channel_att: Tensor,
        ctx_weight: Tensor,
        ctx_bias: Tensor,
    ) -> tuple[Tensor, ...]:
        # s, t: (B, C, N); teacher_channel_att: (B, C); ctx_weight: (C,), ctx_bias: (1,)
        d = torch.sub(s, t, out=_WORKSPACE.get("a", s))  # (B, C, N)
        d_sum = d.sum(dim=2)  # (B, C)
        d2 = torch.mul(d, d, out=_WORKSPACE.get("b", s))
        e = torch.bmm(teacher_channel_att[:, None, :], d2)[:, 0]  # (B, N)
        q = d2.sum(dim=2)  # (B, C)
        abs_s = torch.abs(s, out=d2)
        cell_abs = torch.bmm(torch.ones_like(teacher_channel_att[:, None, :]), abs_s)[:, 0]
        chan_abs = abs_s.sum(dim=2)  # (B, C)
        p = _context_probs(s, ctx_weight, ctx_bias)  # (B, N)
        context = _weighted_cell_sum(s, p)  # (B, C)
        ctx.save_for_backward(s, t, teacher_channel_att, ctx_weight, p)
        return e, q, cell_abs, chan_abs, context, d_sum

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: FunctionCtx,
        g_e: Tensor,
        g_q: Tensor,
        g_cell_abs: Tensor,
        g_chan_abs: Tensor,
        g_context: Tensor,
        g_dsum: Tensor,
    ) -> tuple[Tensor | None, ...]:
        s, t, a, w, p = ctx.saved_tensors  # type: ignore[attr-defined]
        B, C, N = s.shape
        g_e = s.new_zeros(B, N) if g_e is None else g_e
        g_q = s.new_zeros(B, C) if g_q is None else g_q
        g_cell_abs = s.new_zeros(B, N) if g_cell_abs is None else g_cell_abs
        g_chan_abs = s.new_zeros(B, C) if g_chan_abs is None else g_chan_abs
        g_context = s.new_zeros(B, C) if g_context is None else g_context
        g_dsum = s.new_zeros(B, C) if g_dsum is None else g_dsum
        # Context: ctx[b, c] = sum_n s[b, c, n] p[b, n], p = softmax(w . s + bias).
        u = torch.bmm(g_context[:, None, :], s)[:, 0]  # (B, N) = d loss / d p
        g_logits = p * (u - (p * u).sum(dim=1, keepdim=True))  # (B, N)
        g_w = _weighted_cell_sum(s, g_logits).sum(dim=0)  # (C,)
        g_bias = g_logits.sum().reshape(1)
        # Every rank-one part of d loss / d s in one write: g_dsum + g_ctx p^T + w g_logits^T.
        left = torch.stack((g_dsum, g_context, w.expand(B, C)), dim=2)  # (B, C, 3)
        right = torch.stack((torch.ones_like(p), p, g_logits), dim=1)  # (B, 3, N)
        grad = torch.bmm(left, right)  # (B, C, N)
        # Squared-difference parts: 2 d (a[b, c] g_e[b, n] + g_q[b, c]), d recomputed.
        d = torch.sub(s, t, out=_WORKSPACE.get("a", s))
        m = torch.baddbmm(
            g_q[:, :, None], a[:, :, None], g_e[:, None, :], out=_WORKSPACE.get("b", s)
        )
        grad.addcmul_(m, d, value=2.0)
        # |s| parts: sign(s) (g_cell_abs[b, n] + g_chan_abs[b, c]).
        torch.add(g_chan_abs[:, :, None], g_cell_abs[:, None, :], out=m)
        grad.addcmul_(torch.sign(s, out=d), m)
        return grad, None, None, g_w, g_bias


class _TeacherDense(torch.autograd.Function):
    """Full-size work on the teacher feature: |T| sums and the teacher-side GcBlock context.

    The teacher feature never receives a gradient; the GcBlock's logit conv does.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: FunctionCtx, t: Tensor, ctx_weight: Tensor, ctx_bias: Tensor
    ) -> tuple[Tensor, ...]:
        abs_t = torch.abs(t, out=_WORKSPACE.get("a", t))
        cell_abs = torch.bmm(abs_t.new_ones(t.shape[0], 1, t.shape[1]), abs_t)[:, 0]  # (B, N)
        chan_abs = abs_t.sum(dim=2)  # (B, C)
        p = _context_probs(t, ctx_weight, ctx_bias)
        context = _weighted_cell_sum(t, p)  # (B, C)
        ctx.save_for_backward(t, p)
        ctx.mark_non_differentiable(cell_abs, chan_abs)
        return cell_abs, chan_abs, context

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: FunctionCtx, _g_cell: Tensor, _g_chan: Tensor, g_context: Tensor
    ) -> tuple[Tensor | None, ...]:
        t, p = ctx.saved_tensors  # type: ignore[attr-defined]
        if g_context is None:
            return None, None, None
        u = torch.bmm(g_context[:, None, :], t)[:, 0]  # (B, N)
        g_logits = p * (u - (p * u).sum(dim=1, keepdim=True))
        g_w = _weighted_cell_sum(t, g_logits).sum(dim=0)
        return None, g_w, g_logits.sum().reshape(1)


def dense_terms(
    s: Tensor,
    t: Tensor,
    fg: Tensor,
    bg: Tensor,
    *,
    temp: float,
    student_context: ContextBlock,
    teacher_context: ContextBlock,
) -> dict[str, Tensor]:
    """The four unweighted FGD terms of one level.

    Args:
        s: (B, C, H, W) aligned student feature, float32.
        t: (B, C, H, W) teacher feature, float32, detached.
        fg, bg: (B, H, W) foreground and normalised background masks.
        temp: attention temperature.

    Returns:
        {"fg", "bg", "attention", "global"}, scalars, each divided by the batch size.
    """
    B, C, H, W = t.shape
    N = H * W
    s3 = s.reshape(B, C, N)
    t3 = t.reshape(B, C, N)
    tw = teacher_context.conv_mask.weight.reshape(C).float()
    tb = teacher_context.conv_mask.bias.float()
    t_cell, t_chan, t_context = _TeacherDense.apply(t3, tw, tb)
    with torch.no_grad():
        t_spatial, t_channel = attention_from_sums(t_cell, t_chan, temp)
    sw = student_context.conv_mask.weight.reshape(C).float()
    sb = student_context.conv_mask.bias.float()
    e, q, s_cell, s_chan, s_context, d_sum = _StudentDense.apply(s3, t3, t_channel, sw, sb)
    s_spatial, s_channel = attention_from_sums(s_cell, s_chan, temp)
    focal = t_spatial * e  # (B, N)
    loss_fg = (fg.reshape(B, N) * focal).sum() / B
    loss_bg = (bg.reshape(B, N) * focal).sum() / B
    loss_at = ((s_channel - t_channel).abs().sum() + (s_spatial - t_spatial).abs().sum()) / B
    v = student_context.transform(s_context) - teacher_context.transform(t_context)  # (B, C)
    loss_global = (q.sum() + 2.0 * (v * d_sum).sum() + N * (v * v).sum()) / B
    return {"fg": loss_fg, "bg": loss_bg, "attention": loss_at, "global": loss_global}
