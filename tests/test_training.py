"""Distiller and training loop: freezing, resume, NaN guard, schedules, one step per arch."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fgd_core.detectors import DetectorConfig, WeightsError, build_detector_from_config
from fgd_core.distill import DetectorModule, Distiller
from fgd_core.training import FGDConfig, JobConfig, OptimConfig, ScheduleConfig, TrainConfig
from fgd_core.training.jobs import Callbacks, run_job
from fgd_core.training.loop import (
    NonFiniteLossError,
    autocast_dtype,
    cpu_has_native_bf16,
    lr_factor,
)


def det(arch="retinanet", backbone="resnet18", fpn=16, num_classes=4, size=64):
    return DetectorConfig(
        arch=arch,
        backbone=backbone,
        num_classes=num_classes,
        fpn_channels=fpn,
        min_size=size,
        max_size=size,
    )


def batch(n=2, size=64):
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, size, size, generator=g) for _ in range(n)]
    targets = [
        {
            "boxes": torch.tensor([[4.0, 6.0, 30.0, 40.0], [20.0, 20.0, 60.0, 50.0]]),
            "labels": torch.tensor([1, 3]),
        }
        for _ in range(n)
    ]
    return images, targets


TRAIN = TrainConfig(
    batch_size=4,
    schedule=ScheduleConfig(iterations=4, warmup_iters=1),
    log_every=1,
    eval_max_batches=1,
    eval_batch_size=4,
)


@pytest.mark.parametrize("arch", ["retinanet", "fcos", "fasterrcnn"])
def test_distiller_step_trains_student_and_fgd_never_teacher(arch):
    torch.manual_seed(0)
    teacher = build_detector_from_config(det(arch, "resnet34", fpn=32))
    student = build_detector_from_config(det(arch, "resnet18", fpn=16))
    distiller = Distiller(student, teacher, FGDConfig(temp=2.0))
    expected = {
        "retinanet": ["P3", "P4", "P5", "P6", "P7"],
        "fcos": ["P3", "P4", "P5", "P6", "P7"],
        "fasterrcnn": ["P2", "P3", "P4", "P5"],
    }[arch]
    assert list(distiller.levels) == expected
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    params = list(distiller.trainable_parameters())
    teacher_ids = {id(p) for p in teacher.parameters()}
    assert not teacher_ids & {id(p) for p in params}
    opt = torch.optim.SGD(params, lr=0.01)
    distiller.train()
    assert not teacher.training  # kept in eval mode
    assert all(not p.requires_grad for p in teacher.parameters())
    images, targets = batch()
    for _ in range(2):
        losses = distiller(images, targets)
        assert {"loss_fgd_fg", "loss_fgd_bg", "loss_fgd_attention", "loss_fgd_global"} <= set(
            losses
        )
        opt.zero_grad()
        sum(losses.values()).backward()
        opt.step()
    assert all(p.grad is None for p in teacher.parameters())
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), k  # BatchNorm buffers too: eval mode
    assert distiller.fgd.levels["P3"].align is not None  # 16 -> 32 channels
    assert distiller.fgd.levels["P3"].align.weight.grad is not None


@pytest.mark.slow
def test_compiled_fgd_in_a_distiller_matches_eager():
    """`FGDConfig(compile=True)` (the job spec's `fgd.compile`) reaches the loss and changes
    nothing but the speed: the same losses and student gradients as the eager path."""
    images, targets = batch()
    out = {}
    for compile_ in (False, True):
        torch.manual_seed(0)
        teacher = build_detector_from_config(det("retinanet", "resnet34", fpn=32))
        student = build_detector_from_config(det("retinanet", "resnet18", fpn=16))
        distiller = Distiller(student, teacher, FGDConfig(temp=2.0, compile=compile_))
        assert all(level.compiled is compile_ for level in distiller.fgd.levels.values())
        distiller.train()
        losses = distiller(images, targets)
        sum(losses.values()).backward()
        grads = [p.grad.clone() for p in student.backbone.fpn.parameters() if p.grad is not None]
        out[compile_] = ({k: float(v.detach()) for k, v in losses.items()}, grads)
    from fgd_core.losses import compiled

    assert not compiled._DEFAULT.failed  # the compiled path ran, not its eager fallback
    (eager, eager_grads), (compiled, compiled_grads) = out[False], out[True]
    for key in eager:
        assert compiled[key] == pytest.approx(eager[key], rel=1e-4, abs=1e-6), key
    assert len(eager_grads) == len(compiled_grads) > 0
    for a, b in zip(compiled_grads, eager_grads, strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


def test_teacher_runs_without_grad():
    teacher = build_detector_from_config(det(fpn=16))
    distiller = Distiller(build_detector_from_config(det(fpn=16)), teacher, FGDConfig())
    out = distiller.features(*batch())
    assert all(not t.requires_grad for t in out.teacher.values())
    assert all(s.requires_grad for s in out.student.values())
    assert out.input_hw == (64, 64)


def test_mismatched_inputs_and_levels_are_clear_errors():
    student = build_detector_from_config(det())
    with pytest.raises(ValueError, match="same batched input"):
        Distiller(student, build_detector_from_config(det(size=96)), FGDConfig())
    with pytest.raises(ValueError, match="has no level"):
        Distiller(student, build_detector_from_config(det()), FGDConfig(levels=("P2",)))
    with pytest.raises(ValueError, match="teacher has no level"):
        Distiller(student, build_detector_from_config(det("fasterrcnn")), FGDConfig())


def test_inheriting_copies_neck_and_head_where_shapes_match():
    teacher = build_detector_from_config(det(backbone="resnet34", fpn=16))
    student = build_detector_from_config(det(backbone="resnet18", fpn=16))
    distiller = Distiller(student, teacher, FGDConfig(inherit=True))
    assert any(k.startswith("head.") for k in distiller.inherited)
    assert any(k.startswith("backbone.fpn.") for k in distiller.inherited)
    key = "head.classification_head.cls_logits.weight"
    assert torch.equal(student.state_dict()[key], teacher.state_dict()[key])
    assert not any(k.startswith("backbone.body.") for k in distiller.inherited)


def test_lr_linear_rule_and_schedule():
    assert TrainConfig(batch_size=32).lr == pytest.approx(2e-3)
    assert TrainConfig(batch_size=32, optim=OptimConfig(lr=0.05)).lr == 0.05
    cfg = TrainConfig(schedule=ScheduleConfig(iterations=100, warmup_iters=10, warmup_factor=0.1))
    assert lr_factor(0, cfg) == pytest.approx(0.1)
    assert lr_factor(5, cfg) == pytest.approx(0.55)
    assert lr_factor(10, cfg) == pytest.approx(1.0)
    assert lr_factor(55, cfg) == pytest.approx(0.5)
    assert lr_factor(100, cfg) == pytest.approx(0.0, abs=1e-12)
    step = dataclasses.replace(
        cfg,
        schedule=ScheduleConfig(
            iterations=100, warmup_iters=0, policy="step", milestones=(0.5, 0.8)
        ),
    )
    assert [lr_factor(s, step) for s in (0, 49, 50, 80)] == pytest.approx([1, 1, 0.1, 0.01])


def distill_job(tiny_data, teacher_weights, *, train=TRAIN, fgd=None, **extra) -> JobConfig:
    """A distill job of the tiny student (16-channel FPN) from the 32-channel teacher's weights."""
    return JobConfig(
        kind="distill",
        data=tiny_data,
        model=det(),
        train=train,
        teacher=det(fpn=32),
        teacher_weights=str(teacher_weights),
        fgd=fgd or FGDConfig(),
        **extra,
    )


def _teacher_file(tiny_data, tmp_path):
    result = run_job(JobConfig(kind="teacher", data=tiny_data, model=det(fpn=32), train=TRAIN))
    path = tmp_path / "teacher.pt"
    torch.save(result.model_state, path)
    return path


@pytest.mark.parametrize("cpu_bf16", [False, True])
def test_resume_is_bitwise_identical(tiny_data, tmp_path, cpu_bf16):
    if cpu_bf16 and not cpu_has_native_bf16():
        pytest.skip("this CPU has no native bfloat16")
    job = distill_job(
        tiny_data,
        _teacher_file(tiny_data, tmp_path),
        train=dataclasses.replace(TRAIN, checkpoint_every=2, cpu_bf16=cpu_bf16),
        fgd=FGDConfig(calibrate_ratio=1.0),
    )
    states = {}
    full = run_job(job, callbacks=Callbacks(on_checkpoint=lambda s, st: states.__setitem__(s, st)))
    assert set(states) == {2, 4}
    resumed = run_job(job, resume=states[2])
    assert resumed.steps == 4
    for k, v in full.model_state.items():
        assert torch.equal(v, resumed.model_state[k]), k
    assert resumed.fgd_hparams == full.fgd_hparams  # the calibrated weights travel along


def test_nan_guard_names_the_term(tiny_data, tmp_path):
    job = distill_job(
        tiny_data,
        _teacher_file(tiny_data, tmp_path),
        fgd=FGDConfig(alpha=float("inf")),
        evaluate_teacher=False,
    )
    with pytest.raises(NonFiniteLossError, match="loss_fgd_fg"):
        run_job(job)


def test_teacher_weights_that_do_not_load_are_an_error(tiny_data, tmp_path):
    wrong = tmp_path / "wrong.pt"
    torch.save(build_detector_from_config(det("fcos", fpn=32)).state_dict(), wrong)
    job = distill_job(tiny_data, wrong)
    with pytest.raises(WeightsError):
        run_job(job)


def test_baseline_and_distill_start_from_the_same_student(tiny_data, tmp_path):
    seen = {}
    for kind in ("baseline", "distill"):
        extra = {}
        if kind == "distill":
            extra = {
                "teacher": det(fpn=32),
                "teacher_weights": str(_teacher_file(tiny_data, tmp_path)),
                "fgd": FGDConfig(alpha=0.0, beta=0.0, gamma=0.0, lambda_=0.0),
            }
        job = JobConfig(kind=kind, data=tiny_data, model=det(), train=TRAIN, **extra)
        seen[kind] = run_job(
            job, callbacks=Callbacks(on_metrics=lambda s, m, k=kind: seen.setdefault(f"{k}-{s}", m))
        )
    # with every FGD weight at zero, distillation is the baseline: same losses step by step
    for step in range(1, 5):
        assert seen[f"baseline-{step}"]["classification"] == pytest.approx(
            seen[f"distill-{step}"]["classification"], rel=1e-5
        )


def test_detector_module_checkpoint_round_trip():
    module = DetectorModule(build_detector_from_config(det()))
    state = module.checkpoint_state()
    other = DetectorModule(build_detector_from_config(det()))
    other.load_checkpoint_state(state)
    for k, v in other.student.state_dict().items():
        assert torch.equal(v, state["model"][k])


@pytest.mark.skipif(not cpu_has_native_bf16(), reason="this CPU has no native bfloat16")
def test_cpu_bf16_trains_under_bfloat16_autocast_and_evaluates_in_float32(tiny_data):
    seen: dict[str, list[torch.dtype]] = {}
    real_build = build_detector_from_config

    def spy(cfg):
        model = real_build(cfg)
        model.backbone.body.conv1.register_forward_hook(
            lambda m, i, out: seen.setdefault("train" if m.training else "eval", []).append(
                out.dtype
            )
        )
        return model

    import fgd_core.training.jobs as jobs

    for cpu_bf16 in (True, False):
        seen.clear()
        job = JobConfig(
            kind="baseline",
            data=tiny_data,
            model=det(),
            train=dataclasses.replace(TRAIN, cpu_bf16=cpu_bf16, device="cpu"),
        )
        jobs.build_detector_from_config = spy
        try:
            result = run_job(job)
        finally:
            jobs.build_detector_from_config = real_build
        assert set(seen["train"]) == {torch.bfloat16 if cpu_bf16 else torch.float32}
        assert set(seen["eval"]) == {torch.float32}
        assert all(
            v.dtype == torch.float32 for v in result.model_state.values() if v.is_floating_point()
        )


def test_cpu_bf16_on_a_cpu_without_it_trains_in_float32_with_a_warning(monkeypatch):
    import fgd_core.training.loop as loop

    monkeypatch.setattr(loop, "cpu_has_native_bf16", lambda: False)
    config = dataclasses.replace(TRAIN, cpu_bf16=True)
    with pytest.warns(RuntimeWarning, match="no native bfloat16"):
        assert autocast_dtype(torch.device("cpu"), config) is None
    monkeypatch.setattr(loop, "cpu_has_native_bf16", lambda: True)
    assert autocast_dtype(torch.device("cpu"), config) is torch.bfloat16
    assert autocast_dtype(torch.device("cpu"), TRAIN) is None  # off by default


@pytest.mark.skipif(not cpu_has_native_bf16(), reason="this CPU has no native bfloat16")
def test_strided_convs_over_maps_narrower_than_their_kernel_get_true_gradients_under_bf16():
    from fgd_core.training.loop import keep_tiny_strided_convs_in_float32

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(16, 16, 3, 2, 1), torch.nn.Conv2d(16, 16, 3, 2, 1))
    assert keep_tiny_strided_convs_in_float32(model) == 2
    assert keep_tiny_strided_convs_in_float32(model) == 0  # idempotent
    for hw in [(1, 1), (2, 1), (4, 4)]:
        x = torch.randn(4, 16, *hw)
        model.zero_grad()
        model(x).sum().backward()
        reference = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        out.float().sum().backward()
        assert torch.is_autocast_enabled("cpu") is False
        for got, want in zip((p.grad for p in model.parameters()), reference, strict=True):
            assert torch.isfinite(got).all()
            torch.testing.assert_close(got, want, rtol=0.05, atol=0.05 * float(want.abs().max()))
