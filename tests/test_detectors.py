"""Detector factory, split forward, level info and weights (tiny models, CPU, seconds)."""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.retinanet import _default_anchorgen
from torchvision.ops.misc import FrozenBatchNorm2d

from fgd_core.detectors import (
    ARCHITECTURES,
    BACKBONES,
    DetectorConfig,
    LevelInfo,
    WeightsError,
    backbone_features,
    build_detector,
    build_detector_from_config,
    default_anchor_sizes,
    gn_groups,
    head_detections,
    head_losses,
    inherit_weights,
    level_info,
    load_weights,
    prepare,
    save_weights,
)
from fgd_core.detectors.factory import _probe_levels

ARCHS = list(ARCHITECTURES)
K = 3  # foreground classes in the tiny tests


def tiny(arch: str, backbone: str = "resnet18", **options: Any) -> nn.Module:
    kwargs: dict[str, Any] = {
        "fpn_channels": 16,
        "min_size": 64,
        "max_size": 64,
        "box_head_dim": 32,
        "mask_head_channels": 8,
        "score_thresh": 0.0,  # untrained models: keep detections so eval comparisons bite
    }
    kwargs.update(options)
    return build_detector(arch=arch, backbone=backbone, num_classes=K, **kwargs)


def batch(with_masks: bool = True) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
    """Two images of different, non-square sizes; boxes [x1, y1, x2, y2] in image pixels."""
    g = torch.Generator().manual_seed(0)
    sizes = [(64, 80), (56, 48)]
    boxes = [
        torch.tensor([[5.0, 6.0, 40.0, 50.0], [30.0, 10.0, 70.0, 30.0]]),
        torch.tensor([[2.0, 3.0, 20.0, 30.0]]),
    ]
    labels = [torch.tensor([1, 3]), torch.tensor([2])]
    images, targets = [], []
    for (h, w), b, lab in zip(sizes, boxes, labels, strict=True):
        images.append(torch.rand(3, h, w, generator=g))
        target = {"boxes": b, "labels": lab}
        if with_masks:
            masks = torch.zeros(len(b), h, w, dtype=torch.uint8)
            for i, (x1, y1, x2, y2) in enumerate(b.int().tolist()):
                masks[i, y1:y2, x1:x2] = 1
            target["masks"] = masks
        targets.append(target)
    return images, targets


# --- factory ------------------------------------------------------------------------------


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("arch", ARCHS)
def test_level_info_matches_feature_shapes(arch: str, backbone: str) -> None:
    model = tiny(arch, backbone).eval()
    info = level_info(model)
    h, w = 96, 160  # padded-batch size (multiple of 32), non-square
    with torch.no_grad():
        feats = model.backbone(torch.rand(1, 3, h, w))
    assert list(feats) == list(info)
    for key, lv in info.items():
        assert feats[key].shape == (1, 16, math.ceil(h / lv.stride), math.ceil(w / lv.stride))
        if key == "pool":
            assert lv == LevelInfo(name="pool", stride=64, distill_by_default=False)
        else:
            assert lv.name == f"P{int(math.log2(lv.stride))}" and lv.distill_by_default
    expected = (
        ["P3", "P4", "P5", "P6", "P7"]
        if arch in ("retinanet", "fcos")
        else ["P2", "P3", "P4", "P5", "pool"]
    )
    assert [lv.name for lv in info.values()] == expected
    assert list(info) == (
        ["0", "1", "2", "p6", "p7"]
        if arch in ("retinanet", "fcos")
        else ["0", "1", "2", "3", "pool"]
    )


def test_level_info_probe_agrees_with_construction() -> None:
    for arch in ARCHS:
        model = tiny(arch)
        model.train()
        assert _probe_levels(model) == level_info(model)
        assert model.backbone.training  # the probe restores the mode


def test_labels_are_1_to_K_with_background_slot() -> None:
    retina = tiny("retinanet")
    assert retina.head.classification_head.num_classes == K + 1
    fcos = tiny("fcos")
    assert fcos.head.classification_head.num_classes == K + 1
    frcnn = tiny("fasterrcnn")
    assert frcnn.roi_heads.box_predictor.cls_score.out_features == K + 1
    mrcnn = tiny("maskrcnn")
    assert mrcnn.roi_heads.mask_predictor.mask_fcn_logits.out_channels == K + 1


def test_from_scratch_norms_and_group_norm_heads() -> None:
    retina = tiny("retinanet")
    mods = list(retina.modules())
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in mods)
    assert any(isinstance(m, nn.BatchNorm2d) for m in retina.backbone.body.modules())
    assert all(p.requires_grad for p in retina.parameters())
    for model in (retina, tiny("fcos")):
        gns = [m for m in model.head.modules() if isinstance(m, nn.GroupNorm)]
        assert gns and all(m.num_groups == 4 and m.num_channels == 16 for m in gns)
    assert retina.head.regression_head._loss_type == "giou"
    frozen = tiny("fasterrcnn", norm="frozen_bn", trainable_backbone_layers=0)
    assert any(isinstance(m, FrozenBatchNorm2d) for m in frozen.backbone.body.modules())
    assert not any(p.requires_grad for p in frozen.backbone.body.parameters())
    assert all(p.requires_grad for p in frozen.backbone.fpn.parameters())
    mobile = tiny("fcos", "mobilenet_v3_large", trainable_backbone_layers=2)
    grads = [p.requires_grad for p in mobile.backbone.body.parameters()]
    assert any(grads) and not all(grads)


def test_gn_groups() -> None:
    assert [gn_groups(c) for c in (256, 128, 64, 32, 16, 8, 4, 3, 96)] == [
        32,
        32,
        16,
        8,
        4,
        2,
        1,
        1,
        24,
    ]


def test_default_anchor_rule() -> None:
    # At 800 px the rule reproduces torchvision's defaults.
    assert default_anchor_sizes(
        arch="retinanet", strides=(8, 16, 32, 64, 128), min_size=800
    ) == tuple(_default_anchorgen().sizes)
    assert default_anchor_sizes(arch="fasterrcnn", strides=(4, 8, 16, 32, 64), min_size=800) == (
        (32,),
        (64,),
        (128,),
        (256,),
        (512,),
    )
    # Small inputs: 1 x stride (RetinaNet), 2 x stride (RPN); FCOS always stride.
    assert default_anchor_sizes(arch="retinanet", strides=(8, 128), min_size=128) == (
        (8, 10, 12),
        (128, 161, 203),
    )
    assert default_anchor_sizes(arch="maskrcnn", strides=(4, 64), min_size=(96, 128)) == (
        (8,),
        (128,),
    )
    assert default_anchor_sizes(arch="retinanet", strides=(8,), min_size=400) == ((16, 20, 25),)
    assert default_anchor_sizes(arch="fcos", strides=(8, 16), min_size=800) == ((8,), (16,))


def test_anchor_override_and_config_validation() -> None:
    sizes = [[4], [8], [16], [32], [64]]  # lists, as from a JSON spec
    model = tiny("fasterrcnn", anchor_sizes=sizes)
    gen = model.rpn.anchor_generator
    assert isinstance(gen, AnchorGenerator) and gen.sizes == ((4,), (8,), (16,), (32,), (64,))
    with pytest.raises(ValueError, match="levels"):
        tiny("retinanet", anchor_sizes=((8,), (16,)))
    with pytest.raises(ValueError, match="one anchor"):
        tiny("fcos", anchor_sizes=((8, 9),) * 5)
    with pytest.raises(ValueError, match="arch"):
        DetectorConfig(arch="yolo", backbone="resnet18", num_classes=2)
    with pytest.raises(ValueError, match="backbone"):
        DetectorConfig(arch="fcos", backbone="vgg16", num_classes=2)
    cfg = DetectorConfig(arch="fcos", backbone="resnet18", num_classes=2, min_size=[48, 64])
    assert cfg.min_size == (48, 64)
    assert DetectorConfig(**cfg.to_dict()) == cfg
    assert build_detector_from_config(cfg).transform.min_size == (48, 64)


# --- split forward --------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_split_forward_losses_equal_model_forward(arch: str) -> None:
    model = tiny(arch).train()
    images, targets = batch(with_masks=arch == "maskrcnn")
    torch.manual_seed(1)
    expected = model(images, targets)
    torch.manual_seed(1)
    prepared = prepare(model, images, targets)
    feats = backbone_features(model, prepared)
    losses = head_losses(model, prepared, feats)
    assert list(losses) == list(expected)
    for key in expected:
        torch.testing.assert_close(losses[key], expected[key], rtol=0, atol=0)
    assert all(torch.isfinite(v) for v in losses.values())
    # Features: (B, C, H_l, W_l) over the padded batch; targets share its frame.
    h_pad, w_pad = prepared.image_list.tensors.shape[-2:]
    for key, lv in level_info(model).items():
        assert feats[key].shape == (
            2,
            16,
            math.ceil(h_pad / lv.stride),
            math.ceil(w_pad / lv.stride),
        )
    # Image 0 (64x80) is resized to 51x64 (longer side = max_size); boxes follow per axis.
    assert prepared.image_list.image_sizes[0] == (51, 64)
    scale = torch.tensor([64 / 80, 51 / 64, 64 / 80, 51 / 64])
    torch.testing.assert_close(prepared.targets[0]["boxes"], targets[0]["boxes"] * scale)
    assert prepared.original_image_sizes == [(64, 80), (56, 48)]


@pytest.mark.parametrize("arch", ARCHS)
def test_split_forward_detections_equal_model_forward(arch: str) -> None:
    model = tiny(arch)
    torch.manual_seed(0)
    model.train()
    images, targets = batch(with_masks=arch == "maskrcnn")
    model(images, targets)  # one train pass so BatchNorm running stats are not trivial
    model.eval()
    with torch.no_grad():
        expected = model(images)
        prepared = prepare(model, images)
        got = head_detections(model, prepared, backbone_features(model, prepared))
    assert len(got) == len(expected) == 2
    assert expected[0]["boxes"].shape[0] > 0
    for g, e, img in zip(got, expected, images, strict=True):
        assert list(g) == list(e)
        for key in e:
            torch.testing.assert_close(g[key], e[key], rtol=0, atol=0)
        assert g["labels"].min() >= 0 and g["labels"].max() <= K
        if arch == "maskrcnn":
            assert g["masks"].shape[1:] == (1, *img.shape[-2:])


def test_split_forward_mode_and_target_checks() -> None:
    model = tiny("retinanet")
    images, targets = batch(with_masks=False)
    model.train()
    with pytest.raises(AssertionError, match="targets should not be none"):
        prepare(model, images)
    bad = [dict(targets[0], boxes=torch.tensor([[10.0, 10.0, 10.0, 20.0]]))]
    with pytest.raises(AssertionError, match="positive height and width"):
        prepare(model, images[:1], bad)
    prepared = prepare(model, images, targets)
    with pytest.raises(ValueError, match="eval mode"):
        head_detections(model, prepared, backbone_features(model, prepared))
    model.eval()
    prepared = prepare(model, images, targets)  # eval mode with targets: teacher usage
    assert prepared.targets is not None
    with pytest.raises(ValueError, match="train mode"):
        head_losses(model, prepared, backbone_features(model, prepared))
    with pytest.raises(TypeError):
        prepare(nn.Linear(2, 2), images)


@pytest.mark.parametrize("backbone", ["resnet18", "mobilenet_v3_large"])
@pytest.mark.parametrize("arch", ARCHS)
def test_one_training_step(arch: str, backbone: str) -> None:
    torch.manual_seed(0)
    model = tiny(arch, backbone).train()
    images, targets = batch(with_masks=arch == "maskrcnn")
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prepared = prepare(model, images, targets)
    losses = head_losses(model, prepared, backbone_features(model, prepared))
    total = sum(losses.values())
    assert isinstance(total, Tensor) and torch.isfinite(total)
    optimizer.zero_grad()
    total.backward()
    optimizer.step()
    after = model.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert any(k.startswith("backbone.body") for k in changed)
    assert any(k.startswith("backbone.fpn") for k in changed)
    assert all(torch.isfinite(v).all() for v in after.values() if v.is_floating_point())


# --- weights ----------------------------------------------------------------------------------


def test_save_load_roundtrip(tmp_path: Any) -> None:
    torch.manual_seed(0)
    a = tiny("fcos")
    torch.manual_seed(1)
    b = tiny("fcos")
    path = tmp_path / "w" / "fcos.pt"
    save_weights(a, path)
    names = load_weights(b, path)
    assert set(names) == set(a.state_dict())
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k])


def test_load_weights_errors(tmp_path: Any) -> None:
    model = tiny("retinanet")
    with pytest.raises(WeightsError, match="not found"):
        load_weights(model, tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(WeightsError, match="cannot be read"):
        load_weights(model, tmp_path / "junk.pt")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(WeightsError, match="not a state dict"):
        load_weights(model, tmp_path / "list.pt")
    # Other class count: the classifier's shapes differ.
    save_weights(
        build_detector(
            arch="retinanet",
            backbone="resnet18",
            num_classes=5,
            fpn_channels=16,
            min_size=64,
            max_size=64,
        ),
        tmp_path / "k5.pt",
    )
    with pytest.raises(WeightsError, match=r"shape mismatches: head\.classification_head"):
        load_weights(model, tmp_path / "k5.pt")
    with pytest.raises(WeightsError, match="shape mismatches"):
        load_weights(model, tmp_path / "k5.pt", strict=False)
    # Other architecture: missing and unexpected keys, listed (first few, then a count).
    save_weights(tiny("fcos"), tmp_path / "fcos.pt")
    with pytest.raises(WeightsError, match=r"missing keys: .*\(\d+ in all\).*unexpected keys"):
        load_weights(model, tmp_path / "fcos.pt")
    save_weights(nn.Linear(2, 2), tmp_path / "linear.pt")
    with pytest.raises(WeightsError, match="no key of the model"):
        load_weights(model, tmp_path / "linear.pt", strict=False)


def test_load_weights_from_checkpoint_dicts(tmp_path: Any) -> None:
    torch.manual_seed(0)
    src = tiny("fasterrcnn")
    state = src.state_dict()
    torch.save({"model": state, "epoch": 3}, tmp_path / "ckpt.pt")
    torch.save({"ema": state, "step": 7}, tmp_path / "ema.pt")
    torch.save(OrderedDict((f"module.{k}", v) for k, v in state.items()), tmp_path / "ddp.pt")
    for name, key in (("ckpt.pt", None), ("ema.pt", "ema"), ("ddp.pt", None)):
        torch.manual_seed(1)
        dst = tiny("fasterrcnn")
        load_weights(dst, tmp_path / name, key=key)
        assert all(torch.equal(v, dst.state_dict()[k]) for k, v in state.items())
    with pytest.raises(WeightsError, match="no key 'nope'"):
        load_weights(dst, tmp_path / "ckpt.pt", key="nope")
    partial = {k: v for k, v in state.items() if k.startswith("backbone.")}
    torch.save(partial, tmp_path / "partial.pt")
    with pytest.raises(WeightsError, match="missing keys: rpn"):
        load_weights(dst, tmp_path / "partial.pt")
    assert set(load_weights(dst, tmp_path / "partial.pt", strict=False)) == set(partial)


def test_inherit_weights_copies_matching_neck_and_head() -> None:
    torch.manual_seed(0)
    teacher = tiny("retinanet", "resnet50")
    torch.manual_seed(1)
    student = tiny("retinanet", "resnet18")
    copied = inherit_weights(student, teacher)
    t_state, s_state = teacher.state_dict(), student.state_dict()
    assert any(k.startswith("head.classification_head") for k in copied)
    assert any(k.startswith("backbone.fpn.layer_blocks") for k in copied)
    assert not any(k.startswith("backbone.body") for k in copied)
    # Lateral 1x1 convs and P6 read C3..C5, whose channels differ: skipped.
    assert "backbone.fpn.inner_blocks.0.0.weight" not in copied
    assert "backbone.fpn.extra_blocks.p6.weight" not in copied
    assert "backbone.fpn.extra_blocks.p7.weight" in copied
    for k in copied:
        assert torch.equal(s_state[k], t_state[k])
    assert not torch.equal(
        s_state["backbone.body.conv1.weight"], t_state["backbone.body.conv1.weight"]
    )
    same_arch = inherit_weights(tiny("retinanet", "resnet18"), student, prefixes=("head",))
    assert same_arch and all(k.startswith("head.") for k in same_arch)
