"""The opt-in compiled FGD path under torch.compile (the form it takes off the CPU or without the
native kernels): agreement with eager, no recompiling on new weights, fallback."""

from __future__ import annotations

import logging
import shutil

import pytest
import torch
from torch._dynamo.utils import counters

import fgd_core.losses.compiled as compiled
import fgd_core.losses.fgd as fgd
from fgd_core.losses import FGDLoss, MultiLevelFGD
from fgd_core.losses.dense import dense_terms

W8 = {"alpha": 1e-3, "beta": 5e-4, "gamma": 5e-4, "lambda_": 5e-6}
SHAPES = [(3, 4), (5, 7)]
# Tests that run the compiled function: the first one compiles it (15-35 s with a cold inductor
# cache on a 2-core machine, about 3 s with a warm one), the others reuse it.
compiles = pytest.mark.slow


def make_loss(cs: int = 6, ct: int = 8, **kw) -> FGDLoss:
    torch.manual_seed(0)
    loss = FGDLoss(cs, ct, **{**W8, "temp": 0.5, **kw})
    for block in (loss.student_context, loss.teacher_context):  # as after some training
        torch.nn.init.normal_(block.channel_add[-1].weight, std=0.3)
        torch.nn.init.normal_(block.channel_add[-1].bias, std=0.3)
    return loss


def make_batch(hw: tuple[int, int], seed: int = 1, cs: int = 6, ct: int = 8, batch: int = 3):
    g = torch.Generator().manual_seed(seed)
    H, W = hw
    input_hw = (H * 8, W * 8)
    s = torch.randn(batch, cs, H, W, generator=g)
    t = 2 * torch.randn(batch, ct, H, W, generator=g)

    def boxes(n):
        xy = torch.rand(n, 2, generator=g) * torch.tensor([input_hw[1], input_hw[0]]) * 0.7
        wh = torch.rand(n, 2, generator=g) * torch.tensor([input_hw[1], input_hw[0]]) * 0.4 + 1
        return torch.cat([xy, xy + wh], dim=1)

    return s, t, [boxes((3, 0, 1)[i % 3]) for i in range(batch)], input_hw


def terms_and_grads(loss: FGDLoss, s, t, boxes, input_hw, *, compile: bool):
    """Raw terms and the gradients of their sum (student feature, then every parameter)."""
    loss.use_compile = compile
    s = s.detach().requires_grad_(True)
    raw = loss.unweighted(s, t, boxes, input_hw)
    # The GcBlocks' logit biases get no gradient in exact arithmetic (softmax is
    # shift-invariant): both paths give rounding noise there, so they are left out.
    params = [p for n, p in loss.named_parameters() if not n.endswith("conv_mask.bias")]
    grads = torch.autograd.grad(sum(raw.values()), [s, *params])
    return {k: v.item() for k, v in raw.items()}, grads


def assert_close(ours, theirs):
    (values_a, grads_a), (values_b, grads_b) = ours, theirs
    for key in values_b:
        assert values_a[key] == pytest.approx(values_b[key], rel=1e-5, abs=1e-12), key
    for a, b in zip(grads_a, grads_b, strict=True):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item()), (
            (a - b).abs().max()
        )


@pytest.fixture(scope="module", autouse=True)
def inductor_only():
    """This module tests the torch.compile form: the native CPU kernels are off here."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(compiled, "_DEFAULT", compiled.CompiledLevel(native=False))
        yield


@pytest.fixture(scope="module")
def warm():
    """Compiles the shared compiled function once on the small shapes of this module."""
    if not any(shutil.which(cxx) for cxx in ("g++", "c++", "clang++")):
        pytest.skip("no C++ compiler: the compiled path falls back to eager here")
    loss = make_loss()
    for hw in SHAPES:
        terms_and_grads(loss, *make_batch(hw), compile=True)
    assert not compiled._DEFAULT.failed, "the compiled path fell back to eager"
    return counters["stats"]["unique_graphs"]


@pytest.mark.parametrize("hw", SHAPES)
@compiles
def test_compiled_matches_eager_values_and_gradients(warm, hw):
    loss = make_loss()
    assert loss.align is not None
    batch = make_batch(hw, seed=2)
    ours = terms_and_grads(loss, *batch, compile=True)
    assert not compiled._DEFAULT.failed
    assert_close(ours, terms_and_grads(loss, *batch, compile=False))
    assert counters["stats"]["unique_graphs"] == warm  # both shapes share the graphs


@compiles
def test_other_sizes_and_batches_reuse_the_graph(warm):
    # Batch and cell dimensions are dynamic: new map sizes and batch sizes (short of the
    # 4096-element reductions where inductor changes its kernels) compile nothing new.
    loss = make_loss()
    for hw, batch in (((6, 9), 2), ((8, 8), 5), ((2, 3), 3)):
        data = make_batch(hw, seed=5, batch=batch)
        ours = terms_and_grads(loss, *data, compile=True)
        assert_close(ours, terms_and_grads(loss, *data, compile=False))
    assert counters["stats"]["unique_graphs"] == warm


@compiles
def test_new_weights_and_temperature_do_not_recompile(warm):
    loss = make_loss()
    batch = make_batch((5, 7), seed=3)
    before = loss(*batch[:2], batch[2], batch[3])
    loss.set_hparams(alpha=2.0, lambda_=0.1, temp=1.7)
    ours = terms_and_grads(loss, *batch, compile=True)
    assert_close(ours, terms_and_grads(loss, *batch, compile=False))
    loss.use_compile = True
    after = loss(*batch[:2], batch[2], batch[3])
    assert after["loss_fgd_fg"].item() != pytest.approx(before["loss_fgd_fg"].item())
    assert after["loss_fgd_global"].item() == pytest.approx(0.1 * ours[0]["global"], rel=1e-6)
    assert counters["stats"]["unique_graphs"] == warm


@compiles
def test_compiled_half_precision_inputs_and_frozen_teacher(warm):
    loss = make_loss(8, 8, compile=True)
    s, t, boxes, input_hw = make_batch((5, 7), seed=4, cs=8)
    s16 = (30 * s).to(torch.float16).requires_grad_(True)
    t16 = (30 * t).to(torch.float16).requires_grad_(True)
    out = loss(s16, t16, boxes, input_hw)
    ref = dense_terms_of(loss, s16.detach().float(), t16.detach().float(), boxes, input_hw)
    for key, value in out.items():
        assert value.dtype == torch.float32
        assert value.item() == pytest.approx(ref[key], rel=1e-5)
    sum(out.values()).backward()
    assert s16.grad is not None and s16.grad.dtype == torch.float16
    assert torch.isfinite(s16.grad).all()
    assert t16.grad is None


def dense_terms_of(loss: FGDLoss, s, t, boxes, input_hw) -> dict[str, float]:
    loss.use_compile, keep = False, loss.use_compile
    try:
        return {k: v.item() for k, v in loss(s, t, boxes, input_hw).items()}
    finally:
        loss.use_compile = keep


def test_multilevel_passes_compile_to_every_level(monkeypatch):
    multi = MultiLevelFGD(["P3", "P4"], 8, 8, temp=0.5, compile=True, **W8)
    assert all(level.compiled for level in multi.levels.values())
    monkeypatch.setenv(compiled.ENV_SWITCH, "1")
    multi = MultiLevelFGD(["P3"], 8, 8, temp=0.5, compile=False, **W8)
    assert not multi.levels["P3"].compiled  # an explicit flag wins over the env var


@pytest.mark.parametrize(
    ("value", "expected"),
    [(None, False), ("1", True), ("true", True), ("TRUE", True), ("0", False)],
)
def test_env_switch_picks_the_path(monkeypatch, value, expected):
    if value is None:
        monkeypatch.delenv(compiled.ENV_SWITCH, raising=False)
    else:
        monkeypatch.setenv(compiled.ENV_SWITCH, value)
    calls = []

    def spy(*args, **kwargs):
        calls.append(1)
        return dense_terms(*args, **kwargs)

    monkeypatch.setattr(fgd, "compiled_terms", spy)
    loss = make_loss()
    assert loss.use_compile is None and loss.compiled == expected
    s, t, boxes, input_hw = make_batch((3, 4))
    loss(s, t, boxes, input_hw)
    assert len(calls) == int(expected)


def _raise(*args, **kwargs):
    raise RuntimeError("no C++ compiler here")


@pytest.mark.parametrize("where", ["torch.compile", "first call"])
def test_failure_falls_back_to_eager_with_one_warning(monkeypatch, caplog, where):
    if where == "torch.compile":
        monkeypatch.setattr(torch, "compile", _raise)
    else:
        monkeypatch.setattr(torch, "compile", lambda fn, **kw: _raise)
    monkeypatch.setattr(compiled, "_DEFAULT", compiled.CompiledLevel(native=False))
    loss = make_loss(compile=True)
    batch = make_batch((3, 4))
    with caplog.at_level(logging.WARNING, logger=compiled.__name__):
        ours = terms_and_grads(loss, *batch, compile=True)
        again = terms_and_grads(loss, *batch, compile=True)
    warnings = [r for r in caplog.records if r.name == compiled.__name__]
    assert len(warnings) == 1 and "eager path" in warnings[0].getMessage()
    assert "no C++ compiler here" in warnings[0].getMessage()
    assert compiled._DEFAULT.failed
    eager = terms_and_grads(loss, *batch, compile=False)
    for result in (ours, again):
        assert result[0] == eager[0]
        assert all(torch.equal(a, b) for a, b in zip(result[1], eager[1], strict=True))


def test_failure_of_both_paths_raises_and_keeps_the_compiled_path(monkeypatch):
    # When the eager path fails as well, the inputs are at fault, not the compiler.
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: _raise)
    level = compiled.CompiledLevel(native=False)

    def bad_input(*args, **kwargs):
        raise ValueError("bad input")

    monkeypatch.setattr(compiled, "dense_terms", bad_input)
    loss = make_loss(8, 8)
    s, t, _, _ = make_batch((3, 4), cs=8)
    masks = torch.zeros(3, 3, 4)
    with pytest.raises(ValueError, match="bad input"):
        level(
            s,
            t,
            masks,
            masks,
            temp=0.5,
            student_context=loss.student_context,
            teacher_context=loss.teacher_context,
        )
    assert not level.failed


def test_inductor_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "given"))
    assert compiled.inductor_cache_dir() == tmp_path / "given"
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    monkeypatch.setenv("FGD_HOME", str(tmp_path / "home"))
    expected = tmp_path / "home" / "cache" / "inductor"
    assert compiled.inductor_cache_dir() == expected
    assert compiled.os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(expected)
    # Inductor writes its own default into the variable once it has looked it up: not a choice.
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())
    assert compiled.inductor_cache_dir() == expected
