"""FGD losses: the per-level loss, the multi-level wrapper, masks and calibration."""

from fgd_core.losses.fgd import LOSS_KEYS, TERMS, FGDLoss, MultiLevelFGD, weight_terms
from fgd_core.losses.gcblock import ContextBlock
from fgd_core.losses.masks import build_masks

__all__ = [
    "LOSS_KEYS",
    "TERMS",
    "ContextBlock",
    "FGDLoss",
    "MultiLevelFGD",
    "build_masks",
    "weight_terms",
]

from fgd_core.losses.calibration import Calibration, calibrate, propose_temperature  # noqa: E402

__all__ += ["Calibration", "calibrate", "propose_temperature"]
