"""The native CPU kernels of the FGD loss: agreement with the blocked torch passes and with the
loop form, their place behind `compile=True`, the build cache, and the fallbacks."""

from __future__ import annotations

import logging
import shutil
import stat

import pytest
import torch
from fgd_reference import reference_fgd_level

import fgd_core.losses.compiled as compiled
import fgd_core.losses.native as native
from fgd_core.losses import FGDLoss
from fgd_core.losses.dense import BLOCKED, dense_terms
from fgd_core.losses.masks import build_masks

pytestmark = pytest.mark.skipif(
    not any(shutil.which(cxx) for cxx in ("g++", "c++")), reason="no C++ compiler here"
)

W8 = {"alpha": 1e-3, "beta": 5e-4, "gamma": 5e-4, "lambda_": 5e-6}


def make_loss(cs: int, ct: int, **kw) -> FGDLoss:
    torch.manual_seed(0)
    loss = FGDLoss(cs, ct, **{**W8, "temp": 0.7, **kw})
    for block in (loss.student_context, loss.teacher_context):  # as after some training
        for p in block.parameters():
            torch.nn.init.normal_(p, std=0.3)
    return loss


def make_batch(B: int, cs: int, ct: int, hw: tuple[int, int], seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    H, W = hw
    input_hw = (H * 8, W * 8)
    s = torch.randn(B, cs, H, W, generator=g)
    t = 3 * torch.randn(B, ct, H, W, generator=g)
    boxes = []
    for i in range(B):
        n = (3, 0, 2)[i % 3]
        xy = torch.rand(n, 2, generator=g) * torch.tensor([input_hw[1], input_hw[0]]) * 0.6
        wh = torch.rand(n, 2, generator=g) * torch.tensor([input_hw[1], input_hw[0]]) * 0.4 + 1
        boxes.append(torch.cat([xy, xy + wh], dim=1))
    return s, t, boxes, input_hw


def terms_and_grads(loss: FGDLoss, s, t, boxes, input_hw, passes):
    """Raw terms through `passes`, and the gradients of a weighted sum of them (the student
    feature, then every parameter but the GcBlock logit biases, whose gradient is rounding noise
    since softmax ignores them)."""
    s = s.detach().requires_grad_(True)
    B, _, H, W = t.shape
    fg, bg = build_masks(boxes, (H, W), input_hw, None, box_frame="padded")
    aligned = loss.align(s) if loss.align is not None else s
    raw = dense_terms(
        *(aligned, t, fg, bg),
        temp=loss.temp,
        student_context=loss.student_context,
        teacher_context=loss.teacher_context,
        passes=passes,
    )
    params = [p for n, p in loss.named_parameters() if not n.endswith("conv_mask.bias")]
    total = sum((i + 1.0) * v for i, v in enumerate(raw.values()))
    grads = torch.autograd.grad(total, [s, *params])
    return {k: v.item() for k, v in raw.items()}, grads


def assert_close(ours, theirs, rtol=1e-5):
    (values_a, grads_a), (values_b, grads_b) = ours, theirs
    for key in values_b:
        assert values_a[key] == pytest.approx(values_b[key], rel=rtol, abs=1e-9), key
    for a, b in zip(grads_a, grads_b, strict=True):
        # On a one-cell map the logit-conv weights get rounding noise alone (softmax over one
        # cell is constant): hence the absolute floor.
        atol = max(rtol * b.abs().max().item(), 1e-7)
        assert torch.allclose(a, b, rtol=rtol, atol=atol), (a - b).abs().max()


# (batch, student channels, teacher channels, map): odd channel counts leave a last single row,
# maps of fewer than 8 cells or not a multiple of 8 leave scalar steps, a 1x1 map one cell.
CASES = [(2, 6, 8, (3, 4)), (3, 7, 7, (5, 7)), (1, 16, 16, (17, 23)), (2, 5, 5, (1, 1))]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("cells_per_item", [8, 20, native.CELLS_PER_ITEM])
@pytest.mark.parametrize(("B", "cs", "ct", "hw"), CASES)
def test_native_matches_the_blocked_passes(B, cs, ct, hw, cells_per_item, threads):
    passes = native.NativePasses(native.native_passes().lib, cells_per_item)
    loss = make_loss(cs, ct)
    batch = make_batch(B, cs, ct, hw)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        ours = terms_and_grads(loss, *batch, passes)
    finally:
        torch.set_num_threads(before)
    assert_close(ours, terms_and_grads(loss, *batch, BLOCKED))


def test_native_matches_the_loop_form():
    loss = make_loss(16, 16)
    s, t, boxes, input_hw = make_batch(2, 16, 16, (19, 26), seed=3)
    ours = terms_and_grads(loss, s, t, boxes, input_hw, native.native_passes())
    s = s.detach().requires_grad_(True)
    ref = reference_fgd_level(
        s,
        t,
        boxes,
        input_hw,
        None,
        temp=loss.temp,
        align=loss.align,
        student_context=loss.student_context,
        teacher_context=loss.teacher_context,
    )
    params = [p for n, p in loss.named_parameters() if not n.endswith("conv_mask.bias")]
    total = sum((i + 1.0) * v for i, v in enumerate(ref.values()))
    theirs = {k: v.item() for k, v in ref.items()}, torch.autograd.grad(total, [s, *params])
    assert_close(ours, theirs, rtol=2e-5)


def test_compile_true_runs_the_native_kernels_on_the_cpu(monkeypatch):
    calls = []
    forward = native.NativePasses.forward

    def spy(self, *args, **kwargs):
        calls.append(args[0].shape)
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(native.NativePasses, "forward", spy)
    monkeypatch.setattr(torch, "compile", lambda *a, **k: pytest.fail("torch.compile used"))
    monkeypatch.setattr(compiled, "_DEFAULT", compiled.CompiledLevel())
    loss = make_loss(8, 8, compile=True)
    s, t, boxes, input_hw = make_batch(2, 8, 8, (5, 7))
    # Half-precision features are computed in float32, so they take the kernels too.
    out = loss(s.half().requires_grad_(True), t.half(), boxes, input_hw)
    assert calls == [(2, 8, 35)]
    loss.use_compile = False
    eager = loss(s.half(), t.half(), boxes, input_hw)
    for key, value in out.items():
        assert value.item() == pytest.approx(eager[key].item(), rel=1e-5)


def test_build_is_cached_per_machine(monkeypatch, tmp_path):
    monkeypatch.setenv("FGD_HOME", str(tmp_path))
    builds = []
    run = native.subprocess.run

    def counting_run(cmd, *args, **kwargs):
        if "-o" in cmd:
            builds.append(cmd)
        return run(cmd, *args, **kwargs)

    monkeypatch.setattr(native.subprocess, "run", counting_run)
    path = native.build()
    assert path.parent == tmp_path / "cache" / "native" and path.suffix == ".so"
    assert native.build() == path
    assert len(builds) == 1
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary left


def _fake_compiler(tmp_path, body: str) -> str:
    script = tmp_path / "fake-cxx"
    script.write_text(
        f'#!/bin/sh\nif [ "$1" = --version ]; then echo fake 1.0; exit 0; fi\n{body}\n'
    )
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return str(script)


def test_a_failed_build_says_what_the_compiler_said(monkeypatch, tmp_path):
    monkeypatch.setenv("FGD_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("CXX", _fake_compiler(tmp_path, 'echo "bad flag -fopenmp" >&2; exit 1'))
    with pytest.raises(native.NativeUnavailable, match="bad flag -fopenmp"):
        native.build()
    assert not list((tmp_path / "home" / "cache" / "native").iterdir())


def test_without_a_compiler_the_compiled_path_falls_back_with_one_warning(monkeypatch, caplog):
    monkeypatch.setattr(native, "_PASSES", None)
    monkeypatch.setattr(native.shutil, "which", lambda name: None)
    monkeypatch.setattr(torch, "compile", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("x")))
    monkeypatch.setattr(compiled, "_DEFAULT", compiled.CompiledLevel())
    loss = make_loss(8, 8, compile=True)
    batch = make_batch(2, 8, 8, (5, 7))
    with caplog.at_level(logging.WARNING, logger=compiled.__name__):
        first = loss(*batch)
        again = loss(*batch)
    messages = [r.getMessage() for r in caplog.records if r.name == compiled.__name__]
    assert len([m for m in messages if "no native CPU kernels" in m]) == 1
    assert "no C++ compiler found" in messages[0]
    loss.use_compile = False
    eager = loss(*batch)
    for key in eager:
        assert first[key].item() == again[key].item() == eager[key].item()


def test_runs_longer_than_the_kernels_buffers_are_refused():
    source = native.SOURCE.read_text()
    assert f"constexpr int64_t MAX_RUN = {native.MAX_RUN};" in source
    lib = native.native_passes().lib
    with pytest.raises(ValueError, match="cells_per_item"):
        native.NativePasses(lib, native.MAX_RUN + 1)
