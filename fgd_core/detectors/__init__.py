"""Detectors for FGD: a factory over torchvision models, their forward split at the FPN, weights.

Labels are 1..K (K = num_classes, background excluded) for every architecture.
"""

from fgd_core.detectors.backbones import BACKBONES, NORM_LAYERS, LevelInfo
from fgd_core.detectors.factory import (
    ARCHITECTURES,
    DetectorConfig,
    anchor_scale,
    build_detector,
    build_detector_from_config,
    default_anchor_sizes,
    gn_groups,
    level_info,
)
from fgd_core.detectors.forward import (
    Prepared,
    backbone_features,
    head_detections,
    head_losses,
    prepare,
    pyramid,
)
from fgd_core.detectors.weights import (
    WeightsError,
    inherit_weights,
    load_weights,
    save_weights,
)

__all__ = [
    "ARCHITECTURES",
    "BACKBONES",
    "NORM_LAYERS",
    "DetectorConfig",
    "LevelInfo",
    "Prepared",
    "WeightsError",
    "anchor_scale",
    "backbone_features",
    "build_detector",
    "build_detector_from_config",
    "default_anchor_sizes",
    "gn_groups",
    "head_detections",
    "head_losses",
    "inherit_weights",
    "level_info",
    "load_weights",
    "prepare",
    "pyramid",
    "save_weights",
]
