"""The dense part of FGD: every term from `S - T` and a few per-cell and per-channel sums.

All four terms of FGD_SPEC.md (steps 2-6) are written through these reductions, with
`N = H * W` cells, `D = S - T`, the teacher attention `a = A_C(T)` (B, C), `s = A_S(T)` (B, N):

    F[b, c]  = sum_n M_fg[b, n] s[b, n] D[b, c, n]^2   (focal, per channel; G likewise, M_bg)
    L_fg     = sum a * F / B,  L_bg = sum a * G / B
    Q[b, n]  = sum_c D[b, c, n]^2,  Dsum[b, c] = sum_n D[b, c, n]
    L_global = sum_{b,c,n} (D + v[b, c])^2 / B
             = (sum Q + 2 sum v * Dsum + N sum v^2) / B

since each GcBlock adds one vector per image and channel (`v = add_s(ctx_S) - add_t(ctx_T)`).

One custom autograd function (`_DenseLevel`) holds every full-size use of both features and the
terms built from their sums (L_fg, L_bg, L_at, with hand-written gradients; the caller finishes
L_global through the GcBlock transforms), so the student's gradient is written once:

    dL/dS = g_Dsum[b, c] + g_ctx[b, c] p[b, n] + w[c] g_logit[b, n]      (rank 3)
          + 2 D (a[b, c] g_E[b, n] + g_Q[b, n]),  g_E = (g_fg M_fg + g_bg M_bg) s / B
          + sign(S) (g_chan[b, c] + g_cell[b, n])

where `p` is the student GcBlock's softmax over cells, `w` its logit conv and `g_logit` the
gradient of its logits. The full-size passes are behind one interface, `BlockedPasses` here
(blocks of torch ops, any device) and `NativePasses` (fgd_core.losses.native: C++ loops, float32
on the CPU); `_DenseLevel` does the rest, on per-cell and per-channel tensors.

Blocks. On the CPU the features are read in blocks of 128K-256K elements: a run of channel
rows c..c+m of every image of the batch (the whole batch when a level is small), so that the
handful of ops done on a block run on data held in the caches instead of streaming every op
through memory (an op on a cache-resident block is several times faster per byte; each op also
costs a few microseconds of dispatch, hence blocks of this size, few ops per block, and one
batched op per block for all images). Reductions over cells finish inside a block, reductions
over channels accumulate across blocks. Passes over the features, per level:

    forward   1. |T| and |S| summed over cells and over channels; both context logits
              2. (needs A_S(T) and both context softmaxes, from pass 1)
                 D^2 (one fused kernel) summed over cells against M_fg s, M_bg s and 1;
                 each feature summed over cells against its context softmax and 1
    backward  1. the per-cell projections g_ctx . S and g_ctx . T (one batched product each)
              2. per block: 2 D M (one fused kernel), the rank-3 part, sign(S) M', and the
                 logit-conv weight gradients

Block temporaries live in a reused workspace (shared by all calls, so not thread-safe). On
CUDA one block is the whole batch.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx

from fgd_core.losses.gcblock import ContextBlock

# Elements of one block on the CPU, per pass and per thread, about the most that the few
# block-size tensors one step of a pass touches (inputs, scratch, gradient) can be while they
# stay in a 2 MB L2 or the L3 behind it; larger blocks mean fewer ops (measured on a 2-core
# EPYC: 1 << 17, 1 << 18, 1 << 17 5-7 % faster than half of each).
_FORWARD1_ELEMENTS = 1 << 17  # 512 KB of float32; pass 1 touches 4 block-size tensors
_FORWARD2_ELEMENTS = 1 << 18  # pass 2 touches 3
_BACKWARD_ELEMENTS = 1 << 17  # pass 2 touches 5


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


class _Workspace:
    """Reusable scratch buffers for block temporaries on the CPU.

    A fresh buffer costs page faults, so the temporaries of the dense passes live in a few
    buffers that grow to the largest block and are reused. Nothing that outlives a call
    (outputs, tensors saved for backward, gradients) is taken from here. CUDA's caching
    allocator already reuses memory, so there every buffer is fresh.
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, torch.device, torch.dtype], Tensor] = {}

    def get(self, slot: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
        """An uninitialised contiguous `shape` buffer with `like`'s dtype and device."""
        if like.device.type != "cpu":
            return like.new_empty(shape)
        numel = 1
        for size in shape:
            numel *= size
        key = (slot, like.device, like.dtype)
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < numel:
            buf = torch.empty(numel, dtype=like.dtype, device=like.device)
            self._buffers[key] = buf
        return buf[:numel].view(shape)


_WORKSPACE = _Workspace()


class _Blocks:
    """A cut of (B, C, N) features along channels: block j holds rows c_j..c_j + m of every image.

    `m` is chosen so that a block holds about `elements` elements per intra-op thread (at least
    one row per image): one batched op then covers every image of a block (each thread's share
    stays in its own L2, and there are fewer parallel regions). On CUDA the whole batch is one
    block.
    """

    def __init__(self, B: int, C: int, N: int, device: torch.device, elements: int) -> None:
        elements *= torch.get_num_threads()
        rows = C if device.type != "cpu" else max(1, min(C, elements // (B * N)))
        self.B, self.C, self.N, self.rows = B, C, N, rows
        self.count = -(-C // rows)

    def channels(self, x: Tensor, dim: int = 1) -> list[Tensor]:
        """Views of x (B, ..., C at `dim`, ...) per block: (B, ..., m, ...)."""
        return [x] if self.count == 1 else list(x.split(self.rows, dim=dim))

    def each(self, x: Tensor) -> list[Tensor]:
        """x itself once per block (per-image tensors that every block uses whole)."""
        return [x] * self.count

    def _sizes(self) -> list[int]:
        return [min(self.rows, self.C - c) for c in range(0, self.C, self.rows)]

    def scratch(self, slot: str, like: Tensor) -> list[Tensor]:
        """Per block, a contiguous workspace buffer (B, m, N) of the block's shape."""
        full = _WORKSPACE.get(slot, (self.B * self.rows * self.N,), like)
        return [full[: self.B * m * self.N].view(self.B, m, self.N) for m in self._sizes()]

    def pair_scratch(self, slot: str, like: Tensor) -> list[tuple[Tensor, ...]]:
        """Per block, a workspace buffer for two stacked (B, m, N) blocks, as views: the first,
        the second, both as (B, 2, m, N) and as (B, 2m, N), and the (B, 2, 2m) matrix that sums
        each of the two over its rows."""
        full = _WORKSPACE.get(slot, (self.B * 2 * self.rows * self.N,), like)
        views: dict[int, tuple[Tensor, ...]] = {}
        for m in set(self._sizes()):
            both = full[: self.B * 2 * m * self.N].view(self.B, 2, m, self.N)
            eye = torch.eye(2, dtype=like.dtype, device=like.device)
            sums = eye.repeat_interleave(m, dim=1).expand(self.B, 2, 2 * m)
            views[m] = (both[:, 0], both[:, 1], both, both.flatten(1, 2), sums)
        return [views[m] for m in self._sizes()]


def _squared_difference(s: Tensor, t: Tensor, out: Tensor) -> Tensor:
    """out = (s - t)^2 in one pass (the unreduced MSE kernel)."""
    return torch.ops.aten.mse_loss.out(s, t, 0, out=out)  # reduction 0: none


def _twice_difference_times(g: Tensor, s: Tensor, t: Tensor, out: Tensor) -> Tensor:
    """out = 2 (s - t) g in one pass (the unreduced MSE gradient kernel)."""
    return torch.ops.aten.mse_loss_backward.grad_input(g, s, t, 0, grad_input=out)


def _softmax_scaled_grad(y: Tensor, g_y: Tensor, scale: float) -> Tensor:
    """Gradient through y = K softmax(x * scale) over the last dim (K its size): from dL/dy."""
    K = y.shape[-1]
    return y * (g_y - (y * g_y).sum(dim=-1, keepdim=True) / K) * scale


class LevelSums(NamedTuple):
    """What the forward pass over a level's features gives; index 0 the teacher, 1 the student.

    chan: (B, 2, C) |F| summed over cells; cell: (B, 2, N) |F| summed over channels;
    logit: (B, 2, N) context logits w . F without the bias (softmax ignores it);
    focal: (B, 2, C) sum over cells of D^2 A_S(T) times fg, then bg; q_sum: sum of D^2;
    s_ctx, t_ctx: (B, C) contexts; d_sum: (B, C) D summed over cells.
    """

    chan: Tensor
    cell: Tensor
    logit: Tensor
    focal: Tensor
    q_sum: Tensor
    s_ctx: Tensor
    t_ctx: Tensor
    d_sum: Tensor


class BlockedPasses:
    """The full-size passes of a level as blocks of torch ops (module docstring).

    Features are (B, C, N), contiguous. `NativePasses` (fgd_core.losses.native) is the same
    interface over C++ loops.
    """

    def forward(
        self,
        s: Tensor,
        t: Tensor,
        s_weight: Tensor,
        t_weight: Tensor,
        fg: Tensor,
        bg: Tensor,
        temp: float,
    ) -> LevelSums:
        """Both forward passes: the sums of pass 1, then those that need its softmaxes."""
        B, C, N = s.shape
        blocks = _Blocks(B, C, N, s.device, _FORWARD1_ELEMENTS)
        chan = s.new_empty(B, 2, C)
        cell = s.new_zeros(B, 2, N)
        logit = s.new_zeros(B, 2, N)
        for tb, sb, (abs_t, abs_s, both, both_rows, sums), tw, sw, chan_b, cell_b, tl, sl in zip(
            blocks.channels(t),
            blocks.channels(s),
            blocks.pair_scratch("a", s),
            blocks.channels(t_weight.expand(B, 1, C), dim=2),  # (B, 1, m)
            blocks.channels(s_weight.expand(B, 1, C), dim=2),
            blocks.channels(chan, dim=2),  # (B, 2, m)
            blocks.each(cell),  # (B, 2, N)
            blocks.each(logit[:, :1]),  # (B, 1, N)
            blocks.each(logit[:, 1:]),
            strict=True,
        ):
            torch.abs(tb, out=abs_t)
            torch.abs(sb, out=abs_s)
            torch.sum(both, dim=3, out=chan_b)
            cell_b.baddbmm_(sums, both_rows)
            tl.baddbmm_(tw, tb)
            sl.baddbmm_(sw, sb)

        # Pass 2: D^2 against [fg A_S(T), bg A_S(T), 1] over cells; each feature against
        # [p, 1] (its context and its plain sum). Per-cell weights enter as (B, N, k) transposed
        # views: MKL is much slower on a contiguous (N, k) operand.
        t_spatial = N * torch.softmax(cell[:, 0] / (C * temp), dim=1)
        prob = torch.softmax(logit, dim=2)  # (B, 2, N)
        weights = torch.stack((fg * t_spatial, bg * t_spatial, torch.ones_like(fg)), dim=1)
        p_one = torch.stack((prob, torch.ones_like(prob)), dim=2)  # (B, 2, 2, N)
        t_p_one, s_p_one = p_one[:, 0].transpose(1, 2), p_one[:, 1].transpose(1, 2)
        sq_sums = s.new_empty(B, C, 3)  # fg, bg, plain
        s_sums, t_sums = s.new_empty(B, C, 2), s.new_empty(B, C, 2)  # context, plain sum
        blocks = _Blocks(B, C, N, s.device, _FORWARD2_ELEMENTS)
        for sb, tb, buf, sq_b, s_sums_b, t_sums_b in zip(
            blocks.channels(s),
            blocks.channels(t),
            blocks.scratch("a", s),  # (B, m, N)
            blocks.channels(sq_sums),  # (B, m, 3)
            blocks.channels(s_sums),  # (B, m, 2)
            blocks.channels(t_sums),
            strict=True,
        ):
            torch.bmm(_squared_difference(sb, tb, out=buf), weights.transpose(1, 2), out=sq_b)
            torch.bmm(sb, s_p_one, out=s_sums_b)
            torch.bmm(tb, t_p_one, out=t_sums_b)
        return LevelSums(
            chan=chan,
            cell=cell,
            logit=logit,
            focal=sq_sums[..., :2].transpose(1, 2),
            q_sum=sq_sums[..., 2].sum(),
            s_ctx=s_sums[..., 0].contiguous(),
            t_ctx=t_sums[..., 0].contiguous(),
            d_sum=s_sums[..., 1] - t_sums[..., 1],
        )

    def backward(
        self,
        s: Tensor,
        t: Tensor,
        need_s: bool,
        need_t: bool,
        chan: Tensor,
        cells: Tensor,
        k: Tensor,
    ) -> tuple[Tensor | None, Tensor, Tensor]:
        """Both backward passes: the context logit gradients, then the student gradient.

        Args:
            need_s: whether to write the student gradient; need_t: whether the teacher's
                logit-conv weight gradient is wanted (else its entries are zeros).
            chan: (B, 6, C) g_dsum, g_ctx_s, w, a, g_chan, g_ctx_t.
            cells: (B, 5, N) p_s, p_t, g_e, g_q, g_cell.
            k: (B, 2) g_ctx . ctx, student then teacher.

        Returns:
            The student gradient (None unless need_s); the context logit gradients (B, 2, N),
            student first; the logit-conv weight gradients per image (B, 2, C), student first.
        """
        B, C, N = s.shape
        g_dsum, g_ctx_s, w, a, g_chan, g_ctx_t = chan.unbind(1)
        p_s, p_t, g_e, g_q, g_cell = cells.unbind(1)
        # Pass 1. A context ctx[b, c] = sum_n x[b, c, n] p[b, n] with p = softmax(w . x) has the
        # logit gradient p (u - k), u = g_ctx . x per cell and k = g_ctx . ctx.
        lg = s.new_zeros(B, 2, N)
        lg[:, 0] = p_s * (torch.bmm(g_ctx_s[:, None], s)[:, 0] - k[:, :1])
        if need_t:
            lg[:, 1] = p_t * (torch.bmm(g_ctx_t[:, None], t)[:, 0] - k[:, 1:])
        s_lg, t_lg = lg[:, 0], lg[:, 1]

        # Pass 2: the student gradient and the weight gradients sum_n x[b, c, n] g_logit[b, n].
        blocks = _Blocks(B, C, N, s.device, _BACKWARD_ELEMENTS)
        grad = torch.empty_like(s) if need_s else None
        w_grads = s.new_zeros(B, 2, C, 1)
        ones_bn, ones_bc = torch.ones_like(p_s), torch.ones_like(a)
        low_l = torch.stack((g_dsum, g_ctx_s, w), dim=2)  # (B, C, 3)
        low_r = torch.stack((ones_bn, p_s, s_lg), dim=1)  # (B, 3, N)
        sq_l = torch.stack((a, ones_bc), dim=2)  # (B, C, 2)
        sq_r = torch.stack((g_e, g_q), dim=1)  # (B, 2, N)
        abs_l = torch.stack((g_chan, ones_bc), dim=2)  # (B, C, 2)
        abs_r = torch.stack((ones_bn, g_cell), dim=1)  # (B, 2, N)
        s_blocks = blocks.channels(s)
        grad_blocks = blocks.channels(grad) if grad is not None else [None] * len(s_blocks)
        for sb, tb, buf, mult, gb, s_wg, t_wg, s_lgb, t_lgb, *factors in zip(
            s_blocks,
            blocks.channels(t),
            blocks.scratch("a", s),
            blocks.scratch("b", s),
            grad_blocks,
            blocks.channels(w_grads[:, 0]),  # (B, m, 1)
            blocks.channels(w_grads[:, 1]),
            blocks.each(s_lg[:, :, None]),  # (B, N, 1)
            blocks.each(t_lg[:, :, None]),
            blocks.channels(low_l),  # (B, m, 3)
            blocks.each(low_r),  # (B, 3, N)
            blocks.channels(sq_l),  # (B, m, 2)
            blocks.each(sq_r),  # (B, 2, N)
            blocks.channels(abs_l),
            blocks.each(abs_r),
            strict=True,
        ):
            low_lb, low_rb, sq_lb, sq_rb, abs_lb, abs_rb = factors
            torch.bmm(sb, s_lgb, out=s_wg)
            if need_t:
                torch.bmm(tb, t_lgb, out=t_wg)
            if gb is None:
                continue
            # 2 D (a g_E + g_Q), plus the rank-3 part, plus sign(S) (g_chan + g_cell).
            _twice_difference_times(torch.bmm(sq_lb, sq_rb, out=mult), sb, tb, out=gb)
            gb.baddbmm_(low_lb, low_rb)
            gb.addcmul_(torch.sign(sb, out=buf), torch.bmm(abs_lb, abs_rb, out=mult))
        return grad, lg, w_grads[..., 0]


BLOCKED = BlockedPasses()


class _DenseLevel(torch.autograd.Function):
    """Every full-size computation of one level, and the terms built from its sums.

    Inputs: s, t (B, C, N) contiguous; the GcBlock logit convs as weight (C,) and bias (1,), for
    the student and the teacher; the masks fg, bg (B, N); temp; the passes (`BlockedPasses` or
    `NativePasses`). Neither the teacher feature nor the masks get a gradient.

    Outputs: L_fg, L_bg, L_at (scalars, divided by B); the student and teacher contexts (B, C);
    Dsum (B, C); sum Q (scalar). The global term is finished by the caller, through the GcBlock
    transforms (module docstring).
    """

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        s: Tensor,
        t: Tensor,
        s_weight: Tensor,
        s_bias: Tensor,
        t_weight: Tensor,
        t_bias: Tensor,
        fg: Tensor,
        bg: Tensor,
        temp: float,
        passes: BlockedPasses,
    ) -> tuple[Tensor, ...]:
        B, C, N = s.shape
        sums = passes.forward(s, t, s_weight, t_weight, fg, bg, temp)
        # attention_from_sums for both features at once: A_S (B, 2, N), A_C (B, 2, C), teacher
        # first; the context softmaxes (the logit biases cancel in them).
        spatial = N * torch.softmax(sums.cell / (C * temp), dim=2)
        channel = C * torch.softmax(sums.chan / (N * temp), dim=2)
        prob = torch.softmax(sums.logit, dim=2)  # (B, 2, N)
        t_spatial, t_channel = spatial[:, 0], channel[:, 0]

        # The terms: focal (A_C(T) against the per-channel sums of D^2 A_S(T) under each mask),
        # attention, and the sum of Q.
        loss_fg = (t_channel * sums.focal[:, 0]).sum() / B
        loss_bg = (t_channel * sums.focal[:, 1]).sum() / B
        chan_diff = channel[:, 1] - t_channel  # (B, C)
        cell_diff = spatial[:, 1] - t_spatial  # (B, N)
        loss_at = (chan_diff.abs().sum() + cell_diff.abs().sum()) / B

        s_prob, t_prob = prob[:, 1], prob[:, 0]
        ctx.save_for_backward(
            *(s, t, s_weight, fg, bg, s_prob, t_prob, sums.s_ctx, sums.t_ctx, t_spatial),
            *(t_channel, channel[:, 1], spatial[:, 1], chan_diff.sign(), cell_diff.sign()),
        )
        ctx.temp = temp  # type: ignore[attr-defined]
        ctx.passes = passes  # type: ignore[attr-defined]
        return loss_fg, loss_bg, loss_at, sums.s_ctx, sums.t_ctx, sums.d_sum, sums.q_sum

    @staticmethod
    def backward(
        ctx: FunctionCtx,
        g_fg: Tensor | None,
        g_bg: Tensor | None,
        g_at: Tensor | None,
        g_s_ctx: Tensor | None,
        g_t_ctx: Tensor | None,
        g_dsum: Tensor | None,
        g_q: Tensor | None,
    ) -> tuple[Tensor | None, ...]:
        saved = ctx.saved_tensors  # type: ignore[attr-defined]
        s, t, w, fg, bg, s_prob, t_prob, s_ctx, t_ctx, t_spatial, a = saved[:11]
        s_channel, s_spatial, chan_sign, cell_sign = saved[11:]
        temp = ctx.temp  # type: ignore[attr-defined]
        passes: BlockedPasses = ctx.passes  # type: ignore[attr-defined]
        needs = ctx.needs_input_grad  # type: ignore[attr-defined]
        need_s, need_sw, need_sb, need_tw, need_tb = (bool(needs[i]) for i in (0, 2, 3, 4, 5))
        B, C, N = s.shape
        zero = s.new_zeros(())
        g_fg = zero if g_fg is None else g_fg
        g_bg = zero if g_bg is None else g_bg
        g_at = zero if g_at is None else g_at
        g_q = zero if g_q is None else g_q
        g_s_ctx = s.new_zeros(B, C) if g_s_ctx is None else g_s_ctx
        g_t_ctx = s.new_zeros(B, C) if g_t_ctx is None else g_t_ctx
        g_dsum = s.new_zeros(B, C) if g_dsum is None else g_dsum

        # Gradients of the small sums: D^2 per cell (focal), Q, |S| per channel and per cell.
        g_e = (g_fg * fg + g_bg * bg) * t_spatial / B  # (B, N)
        g_chan = _softmax_scaled_grad(s_channel, chan_sign * (g_at / B), 1.0 / (N * temp))
        g_cell = _softmax_scaled_grad(s_spatial, cell_sign * (g_at / B), 1.0 / (C * temp))
        chan = torch.stack((g_dsum, g_s_ctx, w.expand(B, C), a, g_chan, g_t_ctx), dim=1)
        cells = torch.stack((s_prob, t_prob, g_e, g_q.expand(B, N), g_cell), dim=1)
        k = torch.stack(((g_s_ctx * s_ctx).sum(1), (g_t_ctx * t_ctx).sum(1)), dim=1)  # (B, 2)
        grad, lg, w_grads = passes.backward(s, t, need_s, need_tw or need_tb, chan, cells, k)
        return (
            grad,
            None,
            w_grads[:, 0].sum(0) if need_sw else None,
            lg[:, 0].sum().reshape(1) if need_sb else None,
            w_grads[:, 1].sum(0) if need_tw else None,
            lg[:, 1].sum().reshape(1) if need_tb else None,
            None,
            None,
            None,
            None,
        )


def logit_conv(block: ContextBlock) -> tuple[Tensor, Tensor]:
    """The GcBlock's C -> 1 logit conv as weight (C,) and bias (1,), float32."""
    conv = block.conv_mask
    assert conv.bias is not None
    return conv.weight.reshape(-1).float(), conv.bias.float()


def dense_terms(
    s: Tensor,
    t: Tensor,
    fg: Tensor,
    bg: Tensor,
    *,
    temp: float,
    student_context: ContextBlock,
    teacher_context: ContextBlock,
    passes: BlockedPasses = BLOCKED,
) -> dict[str, Tensor]:
    """The four unweighted FGD terms of one level.

    Args:
        s: (B, C, H, W) aligned student feature, float32.
        t: (B, C, H, W) teacher feature, float32, detached.
        fg, bg: (B, H, W) foreground and normalised background masks.
        temp: attention temperature.
        passes: how the full-size passes run (blocks of torch ops, or the native kernels).

    Returns:
        {"fg", "bg", "attention", "global"}, scalars, each divided by the batch size.
    """
    B, C, H, W = t.shape
    N = H * W
    s3 = s.reshape(B, C, N).contiguous()
    t3 = t.reshape(B, C, N).contiguous()
    sw, sb = logit_conv(student_context)
    tw, tb = logit_conv(teacher_context)
    loss_fg, loss_bg, loss_at, s_context, t_context, d_sum, q_sum = _DenseLevel.apply(
        s3, t3, sw, sb, tw, tb, fg.reshape(B, N), bg.reshape(B, N), temp, passes
    )
    v = student_context.transform(s_context) - teacher_context.transform(t_context)  # (B, C)
    loss_global = (q_sum + 2.0 * (v * d_sum).sum() + N * (v * v).sum()) / B
    return {"fg": loss_fg, "bg": loss_bg, "attention": loss_at, "global": loss_global}
