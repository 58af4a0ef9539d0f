"""Backbone + FPN construction for the detector factory, with the FPN levels known by construction.

A "C level" ``l`` is a backbone stage whose output has stride ``2**l`` in input pixels (C2..C5).
Every backbone here exposes the same C levels, so teacher and student FPNs line up level by level
whatever their backbones are (needed by FGD, which compares features of equal spatial size).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn
from torchvision.models import (
    mobilenet_v3_large,
    resnet18,
    resnet34,
    resnet50,
    resnet101,
)
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.mobilenetv3 import MobileNetV3
from torchvision.models.resnet import ResNet
from torchvision.ops.feature_pyramid_network import (
    ExtraFPNBlock,
    LastLevelMaxPool,
    LastLevelP6P7,
)
from torchvision.ops.misc import Conv2dNormActivation, FrozenBatchNorm2d

RESNETS: dict[str, Callable[..., ResNet]] = {
    "resnet18": resnet18,
    "resnet34": resnet34,
    "resnet50": resnet50,
    "resnet101": resnet101,
}
MOBILENETS: dict[str, Callable[..., MobileNetV3]] = {
    "mobilenet_v3_large": mobilenet_v3_large,
}
BACKBONES: tuple[str, ...] = (*RESNETS, *MOBILENETS)

# Backbone normalisation. "bn": trainable BatchNorm2d, right for training from scratch;
# "frozen_bn": torchvision's FrozenBatchNorm2d, meant for pretrained backbones.
NORM_LAYERS: dict[str, Callable[..., nn.Module]] = {
    "bn": nn.BatchNorm2d,
    "frozen_bn": FrozenBatchNorm2d,
}

# How the FPN is extended above its last backbone level:
#   "pool":   LastLevelMaxPool, key "pool" (Faster/Mask R-CNN; used by the RPN only)
#   "p6p7_c5": LastLevelP6P7 fed by C5 (torchvision's retinanet_resnet50_fpn_v2, mmdetection)
#   "p6p7_p5": LastLevelP6P7 fed by P5 (torchvision's fcos_resnet50_fpn, retinanet v1)
EXTRA_BLOCKS: tuple[str, ...] = ("pool", "p6p7_c5", "p6p7_p5")


@dataclass(frozen=True)
class LevelInfo:
    """One FPN output of a detector, keyed elsewhere by torchvision's name ("0", "p6", "pool")."""

    name: str  # "P2".."P7" from the stride (P_l has stride 2**l), or "pool" for R-CNN's max-pool
    stride: int  # input pixels per feature cell, relative to the padded batch tensor
    distill_by_default: bool  # FGD distils every level except R-CNN's "pool"


def _resnet_levels(model: ResNet) -> dict[int, tuple[str, int]]:
    """C level -> (module name, channels) for a torchvision ResNet (layer k has stride 2**(k+1))."""
    stage2 = model.inplanes // 8  # 64 for BasicBlock nets, 256 for Bottleneck nets
    return {k + 1: (f"layer{k}", stage2 * 2 ** (k - 1)) for k in range(1, 5)}


def _mobilenet_levels(features: nn.Sequential) -> dict[int, tuple[str, int]]:
    """C level -> (block index, channels): the LAST block at each stride of MobileNetV3.features."""
    levels: dict[int, tuple[str, int]] = {}
    stride = 1
    for idx, block in enumerate(features):
        if isinstance(block, Conv2dNormActivation):
            conv = block[0]
            assert isinstance(conv, nn.Conv2d)
            stride *= int(conv.stride[0])
        elif getattr(block, "_is_cn", False):  # InvertedResidual with stride 2
            stride *= 2
        channels = block.out_channels
        assert isinstance(channels, int)
        levels[int(math.log2(stride))] = (str(idx), channels)
    return levels


def _freeze_resnet(model: ResNet, trainable_layers: int) -> None:
    """torchvision's rule: keep the last `trainable_layers` of layer4..layer1, conv1 trainable."""
    if not 0 <= trainable_layers <= 5:
        raise ValueError(f"trainable_backbone_layers must be in [0, 5], got {trainable_layers}")
    train = ["layer4", "layer3", "layer2", "layer1", "conv1"][:trainable_layers]
    if trainable_layers == 5:
        train.append("bn1")
    for name, param in model.named_parameters():
        if not any(name.startswith(layer) for layer in train):
            param.requires_grad_(False)


def _freeze_mobilenet(features: nn.Sequential, trainable_layers: int) -> int:
    """torchvision's rule over MobileNet stages; returns the number of stages."""
    stage_idx = [0] + [i for i, b in enumerate(features) if getattr(b, "_is_cn", False)]
    stage_idx.append(len(features) - 1)
    n = len(stage_idx)
    if not 0 <= trainable_layers <= n:
        raise ValueError(f"trainable_backbone_layers must be in [0, {n}], got {trainable_layers}")
    freeze_before = len(features) if trainable_layers == 0 else stage_idx[n - trainable_layers]
    for block in features[:freeze_before]:
        for param in block.parameters():
            param.requires_grad_(False)
    return n


def build_backbone_fpn(
    *,
    backbone: str,
    c_levels: tuple[int, ...],
    fpn_channels: int,
    extra: str,
    norm: str = "bn",
    trainable_layers: int | None = None,
) -> tuple[BackboneWithFPN, OrderedDict[str, LevelInfo]]:
    """Build `backbone` (random init) with an FPN over C levels `c_levels` plus an extra block.

    Args:
        backbone: one of BACKBONES.
        c_levels: increasing C levels to feed to the FPN, e.g. (2, 3, 4, 5) or (3, 4, 5).
        fpn_channels: FPN output channels.
        extra: one of EXTRA_BLOCKS.
        norm: one of NORM_LAYERS, the backbone's normalisation layer.
        trainable_layers: torchvision's trainable_backbone_layers; None = all trainable.

    Returns:
        The BackboneWithFPN (``out_channels == fpn_channels``) and, per output key in order,
        its LevelInfo.
    """
    if norm not in NORM_LAYERS:
        raise ValueError(f"unknown norm {norm!r}; expected one of {sorted(NORM_LAYERS)}")
    norm_layer = NORM_LAYERS[norm]
    if backbone in RESNETS:
        net = RESNETS[backbone](weights=None, norm_layer=norm_layer)
        available = _resnet_levels(net)
        _freeze_resnet(net, 5 if trainable_layers is None else trainable_layers)
        body: nn.Module = net
    elif backbone in MOBILENETS:
        features = MOBILENETS[backbone](weights=None, norm_layer=norm_layer).features
        available = _mobilenet_levels(features)
        n_stages = len([b for b in features if getattr(b, "_is_cn", False)]) + 2
        _freeze_mobilenet(features, n_stages if trainable_layers is None else trainable_layers)
        body = features
    else:
        raise ValueError(f"unknown backbone {backbone!r}; expected one of {list(BACKBONES)}")
    missing = [lv for lv in c_levels if lv not in available]
    if missing or list(c_levels) != sorted(set(c_levels)):
        raise ValueError(f"{backbone} cannot return C levels {c_levels}; has {sorted(available)}")

    return_layers = {available[lv][0]: str(i) for i, lv in enumerate(c_levels)}
    in_channels = [available[lv][1] for lv in c_levels]
    levels: OrderedDict[str, LevelInfo] = OrderedDict(
        (str(i), LevelInfo(name=f"P{lv}", stride=2**lv, distill_by_default=True))
        for i, lv in enumerate(c_levels)
    )
    top = c_levels[-1]
    extra_block: ExtraFPNBlock
    if extra == "pool":
        extra_block = LastLevelMaxPool()
        levels["pool"] = LevelInfo(name="pool", stride=2 ** (top + 1), distill_by_default=False)
    elif extra in ("p6p7_c5", "p6p7_p5"):
        # NB: torchvision feeds P5 instead of C5 whenever in_channels == out_channels.
        p6_in = in_channels[-1] if extra == "p6p7_c5" else fpn_channels
        extra_block = LastLevelP6P7(p6_in, fpn_channels)
        levels["p6"] = LevelInfo(name=f"P{top + 1}", stride=2 ** (top + 1), distill_by_default=True)
        levels["p7"] = LevelInfo(name=f"P{top + 2}", stride=2 ** (top + 2), distill_by_default=True)
    else:
        raise ValueError(f"unknown extra block {extra!r}; expected one of {EXTRA_BLOCKS}")
    fpn = BackboneWithFPN(body, return_layers, in_channels, fpn_channels, extra_blocks=extra_block)
    return fpn, levels
