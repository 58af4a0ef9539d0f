"""Detector factory: torchvision RetinaNet / FCOS / Faster R-CNN / Mask R-CNN built from scratch.

Labels: every architecture takes ground-truth labels 1..K (K = ``num_classes``, background
excluded) and predicts labels in 1..K. The torchvision models are built with K + 1 classes:
the R-CNNs reserve class 0 for background; RetinaNet and FCOS (sigmoid classifiers, a label
indexes a logit channel directly) simply never see label 0, so their channel 0 learns "always
negative". An untrained or odd RetinaNet/FCOS may still emit label 0 at low scores; callers drop
it (``evaluation.detections_to_coco`` does).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any

import torch
from torch import nn
from torchvision.models.detection import FCOS, FasterRCNN, MaskRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.fcos import (
    FCOSClassificationHead,
    FCOSHead,
    FCOSRegressionHead,
)
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.retinanet import RetinaNetHead

from fgd_core.detectors.backbones import BACKBONES, NORM_LAYERS, LevelInfo, build_backbone_fpn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RETINANET_BOX_LOSSES = ("l1", "smooth_l1", "giou", "diou", "ciou")


@dataclass(frozen=True)
class DetectorConfig:
    """Everything needed to build a detector; see `build_detector_from_config`."""

    arch: str  # one of ARCHITECTURES: "retinanet", "fcos", "fasterrcnn", "maskrcnn"
    backbone: str  # one of BACKBONES: resnet18/34/50/101, mobilenet_v3_large
    num_classes: int  # foreground classes K; labels are 1..K (background excluded)
    fpn_channels: int = 256  # FPN (neck) output channels; 256 in the papers
    min_size: int | tuple[int, ...] = 800  # shorter side after resize; a tuple = random per batch
    max_size: int = 1333  # longer side cap after resize
    anchor_sizes: tuple[tuple[float, ...], ...] | None = None  # per FPN level; None = the rule
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)  # anchor h/w ratios (FCOS always 1.0)
    trainable_backbone_layers: int | None = None  # torchvision's meaning; None = all trainable
    norm: str = "bn"  # backbone norm, one of NORM_LAYERS; "bn" = trainable BatchNorm2d
    retinanet_box_loss: str = "giou"  # RetinaNet box loss; "giou" as torchvision's v2 recipe
    box_head_dim: int = 1024  # R-CNN box head (TwoMLPHead) width, torchvision's 1024
    mask_head_channels: int = 256  # Mask R-CNN mask head conv width, torchvision's 256
    score_thresh: float | None = None  # detection score threshold; None = torchvision's default
    detections_per_img: int = 100  # detections kept per image (COCO evaluates 100)
    image_mean: tuple[float, float, float] = IMAGENET_MEAN  # input normalisation mean (RGB, 0-1)
    image_std: tuple[float, float, float] = IMAGENET_STD  # input normalisation std (RGB, 0-1)
    detector_kwargs: Mapping[str, Any] = field(default_factory=dict)  # more torchvision kwargs

    def __post_init__(self) -> None:
        if self.arch not in ARCHITECTURES:
            raise ValueError(f"unknown arch {self.arch!r}; expected one of {list(ARCHITECTURES)}")
        if self.backbone not in BACKBONES:
            raise ValueError(f"unknown backbone {self.backbone!r}; expected one of {BACKBONES}")
        if self.norm not in NORM_LAYERS:
            raise ValueError(f"unknown norm {self.norm!r}; expected one of {list(NORM_LAYERS)}")
        if self.retinanet_box_loss not in RETINANET_BOX_LOSSES:
            raise ValueError(f"retinanet_box_loss must be one of {RETINANET_BOX_LOSSES}")
        if self.num_classes < 1 or self.fpn_channels < 1:
            raise ValueError("num_classes and fpn_channels must be >= 1")
        # Lists (from JSON specs) become tuples so the config stays immutable.
        if isinstance(self.min_size, list):
            object.__setattr__(self, "min_size", tuple(self.min_size))
        if self.anchor_sizes is not None:
            sizes = tuple(tuple(s) for s in self.anchor_sizes)
            object.__setattr__(self, "anchor_sizes", sizes)
        object.__setattr__(self, "aspect_ratios", tuple(self.aspect_ratios))
        object.__setattr__(self, "image_mean", tuple(self.image_mean))
        object.__setattr__(self, "image_std", tuple(self.image_std))

    def to_dict(self) -> dict[str, Any]:
        """Plain-data copy (for logging and checkpoints); `DetectorConfig(**d)` rebuilds it."""
        return asdict(self)


def gn_groups(channels: int) -> int:
    """GroupNorm groups for `channels`: 32 as in torchvision when that leaves >= 4 channels per
    group, else fewer (the largest divisor of `channels` <= channels // 4): 256->32, 32->8, 16->4.
    """
    groups = max(1, min(32, channels // 4))
    while channels % groups:
        groups -= 1
    return groups


def anchor_scale(min_size: int | tuple[int, ...]) -> float:
    """`clamp(min_size / 800, 1/4, 1)`; for a tuple of sizes, the largest counts."""
    size = max(min_size) if isinstance(min_size, tuple) else min_size
    return min(max(size / 800.0, 0.25), 1.0)


def default_anchor_sizes(
    *, arch: str, strides: tuple[int, ...], min_size: int | tuple[int, ...]
) -> tuple[tuple[float, ...], ...]:
    """The default anchor sizes, one tuple per FPN level (input pixels).

    With ``s = anchor_scale(min_size) = clamp(min_size / 800, 1/4, 1)``:
      - RetinaNet: base ``round(4 * stride * s)`` and 3 octave scales ``base * 2**(k/3)``
        (torchvision's 32..512 at 800 px; ``stride`` itself, 8..128, at <= 200 px);
      - Faster/Mask R-CNN RPN: ``round(8 * stride * s)``, one size per level incl. "pool"
        (torchvision's 32..512 at 800 px; ``2 * stride`` at <= 200 px);
      - FCOS: ``stride`` (its "anchors" are points; the size sets the regression scale and the
        per-level object size ranges [4, 8] x size, so it is not rescaled).
    """
    scale = anchor_scale(min_size)
    if arch == "retinanet":
        bases = [max(1, round(4 * st * scale)) for st in strides]
        return tuple((b, int(b * 2 ** (1 / 3)), int(b * 2 ** (2 / 3))) for b in bases)
    if arch in ("fasterrcnn", "maskrcnn"):
        return tuple((max(1, round(8 * st * scale)),) for st in strides)
    if arch == "fcos":
        return tuple((st,) for st in strides)
    raise ValueError(f"unknown arch {arch!r}")


def _anchor_generator(
    cfg: DetectorConfig, levels: OrderedDict[str, LevelInfo], ratios: tuple[float, ...]
) -> AnchorGenerator:
    strides = tuple(info.stride for info in levels.values())
    sizes = cfg.anchor_sizes or default_anchor_sizes(
        arch=cfg.arch, strides=strides, min_size=cfg.min_size
    )
    if len(sizes) != len(levels):
        raise ValueError(
            f"anchor_sizes has {len(sizes)} levels but {cfg.arch} has {len(levels)} FPN outputs "
            f"({list(levels)})"
        )
    if len({len(s) for s in sizes}) != 1:
        raise ValueError("anchor_sizes must have the same number of sizes on every level")
    return AnchorGenerator(tuple(tuple(s) for s in sizes), (ratios,) * len(sizes))


def _common_kwargs(cfg: DetectorConfig) -> dict[str, Any]:
    return {
        "min_size": cfg.min_size,
        "max_size": cfg.max_size,
        "image_mean": list(cfg.image_mean),
        "image_std": list(cfg.image_std),
    }


def _backbone(
    cfg: DetectorConfig, c_levels: tuple[int, ...], extra: str
) -> tuple[BackboneWithFPN, OrderedDict[str, LevelInfo]]:
    return build_backbone_fpn(
        backbone=cfg.backbone,
        c_levels=c_levels,
        fpn_channels=cfg.fpn_channels,
        extra=extra,
        norm=cfg.norm,
        trainable_layers=cfg.trainable_backbone_layers,
    )


def _build_retinanet(cfg: DetectorConfig) -> tuple[nn.Module, OrderedDict[str, LevelInfo]]:
    """RetinaNet as torchvision's v2 recipe: P3-P7 (P6 from C5), GroupNorm head, GIoU loss."""
    body, levels = _backbone(cfg, (3, 4, 5), "p6p7_c5")
    anchors = _anchor_generator(cfg, levels, cfg.aspect_ratios)
    norm = partial(nn.GroupNorm, gn_groups(cfg.fpn_channels))
    head = RetinaNetHead(
        cfg.fpn_channels, anchors.num_anchors_per_location()[0], cfg.num_classes + 1, norm
    )
    head.regression_head._loss_type = cfg.retinanet_box_loss
    kwargs = _common_kwargs(cfg) | {"detections_per_img": cfg.detections_per_img}
    if cfg.score_thresh is not None:
        kwargs["score_thresh"] = cfg.score_thresh
    kwargs |= dict(cfg.detector_kwargs)
    model = RetinaNet(body, cfg.num_classes + 1, anchor_generator=anchors, head=head, **kwargs)
    return model, levels


def _build_fcos(cfg: DetectorConfig) -> tuple[nn.Module, OrderedDict[str, LevelInfo]]:
    """FCOS as torchvision's fcos_resnet50_fpn: P3-P7 (P6 from P5), GroupNorm head."""
    body, levels = _backbone(cfg, (3, 4, 5), "p6p7_p5")
    anchors = _anchor_generator(cfg, levels, (1.0,))
    if anchors.num_anchors_per_location()[0] != 1:
        raise ValueError("FCOS needs exactly one anchor size per level")
    ch, k = cfg.fpn_channels, cfg.num_classes + 1
    norm = partial(nn.GroupNorm, gn_groups(ch))
    # torchvision's FCOSHead hard-codes GroupNorm(32, C): build it without convs (num_convs=0)
    # and put in its two sub-heads with a GroupNorm that divides C.
    head = FCOSHead(ch, 1, k, num_convs=0)
    head.classification_head = FCOSClassificationHead(ch, 1, k, norm_layer=norm)
    head.regression_head = FCOSRegressionHead(ch, 1, norm_layer=norm)
    kwargs = _common_kwargs(cfg) | {"detections_per_img": cfg.detections_per_img}
    if cfg.score_thresh is not None:
        kwargs["score_thresh"] = cfg.score_thresh
    kwargs |= dict(cfg.detector_kwargs)
    model = FCOS(body, k, anchor_generator=anchors, head=head, **kwargs)
    return model, levels


def _rcnn_kwargs(cfg: DetectorConfig, levels: OrderedDict[str, LevelInfo]) -> dict[str, Any]:
    anchors = _anchor_generator(cfg, levels, cfg.aspect_ratios)
    kwargs = _common_kwargs(cfg) | {
        "rpn_anchor_generator": anchors,
        "box_head": TwoMLPHead(cfg.fpn_channels * 7 * 7, cfg.box_head_dim),
        "box_predictor": FastRCNNPredictor(cfg.box_head_dim, cfg.num_classes + 1),
        "box_detections_per_img": cfg.detections_per_img,
    }
    if cfg.score_thresh is not None:
        kwargs["box_score_thresh"] = cfg.score_thresh
    return kwargs


def _build_fasterrcnn(cfg: DetectorConfig) -> tuple[nn.Module, OrderedDict[str, LevelInfo]]:
    """Faster R-CNN as torchvision's fasterrcnn_resnet50_fpn: P2-P5 + "pool" (RPN only)."""
    body, levels = _backbone(cfg, (2, 3, 4, 5), "pool")
    kwargs = _rcnn_kwargs(cfg, levels) | dict(cfg.detector_kwargs)
    return FasterRCNN(body, num_classes=None, **kwargs), levels


def _build_maskrcnn(cfg: DetectorConfig) -> tuple[nn.Module, OrderedDict[str, LevelInfo]]:
    """Mask R-CNN as torchvision's maskrcnn_resnet50_fpn: P2-P5 + "pool" (RPN only)."""
    body, levels = _backbone(cfg, (2, 3, 4, 5), "pool")
    mc = cfg.mask_head_channels
    kwargs = _rcnn_kwargs(cfg, levels) | {
        "mask_head": MaskRCNNHeads(cfg.fpn_channels, [mc] * 4, 1),
        "mask_predictor": MaskRCNNPredictor(mc, mc, cfg.num_classes + 1),
    }
    kwargs |= dict(cfg.detector_kwargs)
    return MaskRCNN(body, num_classes=None, **kwargs), levels


# arch name -> builder returning (model, level info); the one list of supported architectures.
ARCHITECTURES: dict[str, Callable[[DetectorConfig], tuple[nn.Module, OrderedDict[str, LevelInfo]]]]
ARCHITECTURES = {
    "retinanet": _build_retinanet,
    "fcos": _build_fcos,
    "fasterrcnn": _build_fasterrcnn,
    "maskrcnn": _build_maskrcnn,
}

_LEVELS_ATTR = "_fgd_level_info"


def build_detector_from_config(cfg: DetectorConfig) -> nn.Module:
    """Build a randomly initialised detector (no download) from `cfg`."""
    model, levels = ARCHITECTURES[cfg.arch](cfg)
    setattr(model, _LEVELS_ATTR, levels)  # plain attribute, not part of the state dict
    return model


def build_detector(
    *,
    arch: str,
    backbone: str,
    num_classes: int,
    fpn_channels: int = 256,
    min_size: int | tuple[int, ...] = 800,
    max_size: int = 1333,
    anchor_sizes: tuple[tuple[float, ...], ...] | None = None,
    **options: Any,
) -> nn.Module:
    """Build a detector; `options` are the other `DetectorConfig` fields (documented there).

    Labels are 1..K with K = `num_classes` for every arch (see the module docstring).
    """
    cfg = DetectorConfig(
        arch=arch,
        backbone=backbone,
        num_classes=num_classes,
        fpn_channels=fpn_channels,
        min_size=min_size,
        max_size=max_size,
        anchor_sizes=anchor_sizes,
        **options,
    )
    return build_detector_from_config(cfg)


def _probe_levels(model: nn.Module) -> OrderedDict[str, LevelInfo]:
    """Level info of a detector not built here, from one dummy backbone pass (eval, no grad)."""
    backbone = model.backbone
    assert isinstance(backbone, nn.Module)
    size = 512
    param = next(backbone.parameters())
    was_training = backbone.training
    backbone.eval()
    try:
        with torch.no_grad():
            feats = backbone(torch.zeros(1, 3, size, size, device=param.device, dtype=param.dtype))
    finally:
        backbone.train(was_training)
    if isinstance(feats, torch.Tensor):
        feats = OrderedDict([("0", feats)])
    levels: OrderedDict[str, LevelInfo] = OrderedDict()
    for key, feat in feats.items():
        stride = size // feat.shape[-1]
        name = "pool" if key == "pool" else f"P{round(math.log2(stride))}"
        levels[key] = LevelInfo(name=name, stride=stride, distill_by_default=key != "pool")
    return levels


def level_info(model: nn.Module) -> OrderedDict[str, LevelInfo]:
    """FPN outputs of `model` in order: torchvision key ("0", "p6", "pool") -> LevelInfo.

    Known by construction for models from `build_detector`; other torchvision detectors are
    probed once with a dummy 512x512 pass (exact for strides up to 512).
    """
    levels = getattr(model, _LEVELS_ATTR, None)
    if levels is None:
        levels = _probe_levels(model)
        setattr(model, _LEVELS_ATTR, levels)
    return OrderedDict(levels)
