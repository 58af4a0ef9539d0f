"""The FGD loss: hand-computed cases, agreement with the loop form, gradients, dtypes, errors."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
from fgd_reference import reference_fgd_level

from fgd_core.losses import LOSS_KEYS, FGDLoss, MultiLevelFGD
from fgd_core.losses.dense import attention_from_sums

W8 = {"alpha": 1e-3, "beta": 5e-4, "gamma": 5e-4, "lambda_": 5e-6}


def make_loss(cs=8, ct=8, **kw):
    torch.manual_seed(0)
    return FGDLoss(cs, ct, **{**W8, "temp": 0.5, **kw})


def perturb_contexts(loss: FGDLoss, std: float = 0.3) -> None:
    """Give the zero-initialised GcBlock outputs a value, as after training."""
    for block in (loss.student_context, loss.teacher_context):
        torch.nn.init.normal_(block.channel_add[-1].weight, std=std)
        torch.nn.init.normal_(block.channel_add[-1].bias, std=std)


def random_boxes(g, n, input_hw):
    xy = torch.rand(n, 2, generator=g) * torch.tensor([input_hw[1], input_hw[0]]) * 0.7
    wh = torch.rand(n, 2, generator=g) * torch.tensor([input_hw[1], input_hw[0]]) * 0.4 + 1
    return torch.cat([xy, xy + wh], dim=1)


def test_hand_computed_single_cell_case():
    # B=1, C=1, one row of two cells, teacher |T| = [1, 3], student 0, temp 1.
    loss = FGDLoss(1, 1, temp=1.0, alpha=1.0, beta=1.0, gamma=1.0, lambda_=1.0)
    s = torch.zeros(1, 1, 1, 2, requires_grad=True)
    t = torch.tensor([[[[1.0, -3.0]]]])
    # box [0, 0, 10, 10] on a (10, 20) input: cols 0..1, rows 0..1 (clipped to 0): value 1/4
    raw = loss.unweighted(s, t, [torch.tensor([[0.0, 0.0, 10.0, 10.0]])], (10, 20))
    e2 = math.exp(2)
    a0, a1 = 2 / (1 + e2), 2 * e2 / (1 + e2)  # teacher spatial attention
    assert raw["fg"].item() == pytest.approx(0.25 * (a0 * 1 + a1 * 9), rel=1e-6)
    assert raw["bg"].item() == pytest.approx(0.0)
    # student attention is uniform: [1, 1] and [1]
    assert raw["attention"].item() == pytest.approx(abs(1 - a0) + abs(1 - a1), rel=1e-6)
    assert raw["global"].item() == pytest.approx(10.0, rel=1e-6)  # R(F) = F at init


@pytest.mark.parametrize("hw", [(3, 4), (5, 7), (7, 5)])
@pytest.mark.parametrize("box_frame", ["padded", "image"])
def test_matches_loop_reference(hw, box_frame):
    g = torch.Generator().manual_seed(1)
    H, W = hw
    input_hw = (H * 8, W * 8)
    loss = make_loss(6, 8, box_frame=box_frame)
    perturb_contexts(loss)
    s = torch.randn(3, 6, H, W, generator=g, requires_grad=True)
    t = 2 * torch.randn(3, 8, H, W, generator=g)
    boxes = [random_boxes(g, 3, input_hw), torch.zeros(0, 4), random_boxes(g, 1, input_hw)]
    sizes = [(input_hw[0] - 5, input_hw[1] - 9), input_hw, (input_hw[0] - 8, input_hw[1])]
    raw = loss.unweighted(s, t, boxes, input_hw, sizes)
    ref = reference_fgd_level(
        s,
        t,
        boxes,
        input_hw,
        sizes,
        temp=0.5,
        align=loss.align,
        student_context=loss.student_context,
        teacher_context=loss.teacher_context,
        box_frame=box_frame,
    )
    for key in raw:
        assert raw[key].item() == pytest.approx(ref[key].item(), rel=1e-5), key
    params = [s, *[p for n, p in loss.named_parameters() if not n.endswith("conv_mask.bias")]]
    ours = torch.autograd.grad(sum(raw.values()), params)
    theirs = torch.autograd.grad(sum(ref.values()), params)
    for a, b in zip(ours, theirs, strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5 * b.abs().max().item())


@pytest.mark.parametrize("block_elements", [7, 40, 200, 250, 1 << 16])
def test_blocked_passes_match_loop_reference(block_elements, monkeypatch):
    # On the CPU the dense passes walk the features in blocks (runs of channel rows of one
    # image, including a shorter last run, or several whole images); every cut gives the same
    # values and gradients as the loop form.
    import fgd_core.losses.dense as dense

    for name in ("_FORWARD1_ELEMENTS", "_FORWARD2_ELEMENTS", "_BACKWARD_ELEMENTS"):
        monkeypatch.setattr(dense, name, block_elements)
    g = torch.Generator().manual_seed(11)
    H, W = 3, 5
    input_hw = (H * 8, W * 8)
    loss = make_loss(8, 7)
    perturb_contexts(loss)
    s = torch.randn(3, 8, H, W, generator=g, requires_grad=True)
    t = 2 * torch.randn(3, 7, H, W, generator=g)
    boxes = [random_boxes(g, 2, input_hw), torch.zeros(0, 4), random_boxes(g, 3, input_hw)]
    raw = loss.unweighted(s, t, boxes, input_hw)
    ref = reference_fgd_level(
        s,
        t,
        boxes,
        input_hw,
        None,
        temp=0.5,
        align=loss.align,
        student_context=loss.student_context,
        teacher_context=loss.teacher_context,
    )
    for key in raw:
        assert raw[key].item() == pytest.approx(ref[key].item(), rel=1e-5), key
    params = [s, *[p for n, p in loss.named_parameters() if not n.endswith("conv_mask.bias")]]
    ours = torch.autograd.grad(sum(raw.values()), params)
    theirs = torch.autograd.grad(sum(ref.values()), params)
    for a, b in zip(ours, theirs, strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5 * b.abs().max().item())


def test_weighted_keys_and_changeable_hparams():
    g = torch.Generator().manual_seed(2)
    loss = make_loss()
    s, t = torch.randn(2, 8, 4, 6, generator=g), torch.randn(2, 8, 4, 6, generator=g)
    boxes = [random_boxes(g, 2, (32, 48)) for _ in range(2)]
    out = loss(s, t, boxes, (32, 48))
    raw = loss.unweighted(s, t, boxes, (32, 48))
    assert tuple(out) == LOSS_KEYS
    assert out["loss_fgd_fg"].item() == pytest.approx(1e-3 * raw["fg"].item(), rel=1e-6)
    assert out["loss_fgd_global"].item() == pytest.approx(5e-6 * raw["global"].item(), rel=1e-6)
    loss.set_hparams(alpha=2.0, temp=1.5)
    assert loss.alpha == 2.0 and loss.temp == 1.5
    raw2 = loss.unweighted(s, t, boxes, (32, 48))
    assert loss(s, t, boxes, (32, 48))["loss_fgd_fg"].item() == pytest.approx(
        2.0 * raw2["fg"].item(), rel=1e-6
    )
    assert raw2["fg"].item() != pytest.approx(raw["fg"].item())  # temperature took effect
    with pytest.raises(ValueError, match="unknown FGD hyperparameter"):
        loss.set_hparams(delta=1.0)


def test_attention_maps_average_one():
    g = torch.Generator().manual_seed(3)
    f = 5 * torch.randn(2, 16, 5, 7, generator=g)
    flat = f.abs().reshape(2, 16, 35)
    for temp in (0.5, 2.0):
        spatial, channel = attention_from_sums(flat.sum(1), flat.sum(2), temp)
        assert torch.allclose(spatial.mean(dim=1), torch.ones(2))
        assert torch.allclose(channel.mean(dim=1), torch.ones(2))


def test_focal_and_global_vanish_when_student_equals_teacher():
    g = torch.Generator().manual_seed(4)
    loss = make_loss()
    t = torch.randn(2, 8, 5, 7, generator=g)
    raw = loss.unweighted(t.clone(), t, [random_boxes(g, 2, (40, 56))] * 2, (40, 56))
    assert raw["fg"].item() == 0.0
    assert raw["bg"].item() == 0.0
    assert raw["global"].item() == pytest.approx(0.0, abs=1e-9)
    assert raw["attention"].item() == pytest.approx(0.0, abs=1e-5)


def test_gradients_reach_student_and_align_but_never_teacher():
    g = torch.Generator().manual_seed(5)
    loss = make_loss(4, 8)
    s = torch.randn(2, 4, 5, 7, generator=g, requires_grad=True)
    t = torch.randn(2, 8, 5, 7, generator=g, requires_grad=True)
    out = loss(s, t, [random_boxes(g, 2, (40, 56))] * 2, (40, 56))
    sum(out.values()).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert loss.align is not None
    assert loss.align.weight.grad is not None and loss.align.weight.grad.abs().sum() > 0
    assert t.grad is None


def test_every_gcblock_parameter_learns_after_a_few_steps():
    g = torch.Generator().manual_seed(6)
    loss = FGDLoss(8, 8, temp=1.0, alpha=1.0, beta=1.0, gamma=1.0, lambda_=1.0)
    opt = torch.optim.SGD(loss.parameters(), lr=1e-3)
    s = torch.randn(2, 8, 5, 7, generator=g, requires_grad=True)
    t = torch.randn(2, 8, 5, 7, generator=g)
    boxes = [random_boxes(g, 2, (40, 56))] * 2
    blocks = {"student": loss.student_context, "teacher": loss.teacher_context}
    reached = set()
    for step in range(3):
        opt.zero_grad()
        sum(loss(s, t, boxes, (40, 56)).values()).backward()
        for role, block in blocks.items():
            for name, p in block.named_parameters():
                if p.grad is not None and p.grad.abs().sum() > 0:
                    reached.add(f"{role}.{name}")
        if step == 0:  # the zero-initialised last convs hold every other gradient back at first
            assert reached == {f"{r}.channel_add.3.{w}" for r in blocks for w in ("weight", "bias")}
        opt.step()
    for role, block in blocks.items():
        for name, _ in block.named_parameters():
            if name == "conv_mask.bias":  # softmax is shift-invariant: no gradient by design
                continue
            assert f"{role}.{name}" in reached


def test_gcblock_initialisation():
    loss = make_loss()
    x = torch.randn(2, 8, 3, 4)
    for block in (loss.student_context, loss.teacher_context):
        assert torch.equal(block(x), x)  # R(F) = F at step 0
        assert torch.count_nonzero(block.conv_mask.bias) == 0
        assert torch.count_nonzero(block.channel_add[-1].weight) == 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_use_float32_softmax(dtype):
    g = torch.Generator().manual_seed(7)
    loss = make_loss()
    # |F| ~ 60: at temp 0.5 a half-precision softmax would overflow to inf / NaN.
    s = (60 * torch.randn(2, 8, 5, 7, generator=g)).to(dtype).requires_grad_(True)
    t = (60 * torch.randn(2, 8, 5, 7, generator=g)).to(dtype)
    boxes = [random_boxes(g, 2, (40, 56))] * 2
    out = loss(s, t, boxes, (40, 56))
    ref = loss(s.detach().float(), t.float(), boxes, (40, 56))
    for key in out:
        assert out[key].dtype == torch.float32
        assert torch.isfinite(out[key])
        assert out[key].item() == pytest.approx(ref[key].item(), rel=1e-5)
    sum(out.values()).backward()
    assert s.grad is not None and s.grad.dtype == dtype and torch.isfinite(s.grad).all()


def test_clear_errors_for_bad_input():
    loss = make_loss()
    s, t = torch.randn(2, 8, 5, 7), torch.randn(2, 8, 5, 7)
    good = [torch.tensor([[0.0, 0, 8, 8]])] * 2
    with pytest.raises(ValueError, match="spatial size"):
        loss(s, torch.randn(2, 8, 5, 6), good, (40, 56))
    with pytest.raises(ValueError, match=r"shape \(N, 4\)"):
        loss(s, t, [torch.zeros(3, 5), torch.zeros(0, 4)], (40, 56))
    with pytest.raises(ValueError, match="NaN"):
        loss(s, t, [torch.tensor([[0.0, float("nan"), 8, 8]]), good[0]], (40, 56))
    with pytest.raises(ValueError, match="1 entries but the batch holds 2"):
        loss(s, t, good[:1], (40, 56))
    with pytest.raises(ValueError, match="channels"):
        loss(torch.randn(2, 4, 5, 7), t, good, (40, 56))
    with pytest.raises(ValueError, match="image_sizes"):
        make_loss(box_frame="image")(s, t, good, (40, 56))


def test_multilevel_sums_levels_and_names_missing_ones():
    g = torch.Generator().manual_seed(8)
    torch.manual_seed(0)
    multi = MultiLevelFGD(["P3", "P4"], 8, 8, temp=0.5, **W8)
    feats_s = {
        "P3": torch.randn(2, 8, 8, 8, generator=g),
        "P4": torch.randn(2, 8, 4, 4, generator=g),
    }
    feats_t = {k: torch.randn_like(v) for k, v in feats_s.items()}
    boxes = [random_boxes(g, 2, (64, 64)) for _ in range(2)]
    total = multi(feats_s, feats_t, boxes, (64, 64))
    per = [multi.levels[k](feats_s[k], feats_t[k], boxes, (64, 64)) for k in ("P3", "P4")]
    for key in LOSS_KEYS:
        assert total[key].item() == pytest.approx((per[0][key] + per[1][key]).item(), rel=1e-6)
    multi.set_hparams(temp=2.0, gamma=0.0)
    assert multi.hparams["temp"] == 2.0 and multi.hparams["gamma"] == 0.0
    assert multi(feats_s, feats_t, boxes, (64, 64))["loss_fgd_attention"].item() == 0.0
    with pytest.raises(ValueError, match="no level 'P4'"):
        multi({"P3": feats_s["P3"]}, feats_t, boxes, (64, 64))


def test_import_leaves_ray_mlflow_fastapi_out():
    code = (
        "import sys, fgd_core, fgd_core.losses, fgd_core.data, fgd_core.detectors, "
        "fgd_core.evaluation\n"
        "bad = [m for m in ('ray', 'mlflow', 'fastapi') if m in sys.modules]\n"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
