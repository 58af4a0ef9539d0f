"""FGD losses: the per-level loss, the multi-level wrapper, masks and calibration.

The dense terms have an eager form (`dense`) and an opt-in compiled one (`compiled`: the native
CPU kernels of `native`, else torch.compile; FGDLoss and MultiLevelFGD take `compile=`, or the
env var FGD_COMPILE).
"""

from fgd_core.losses.compiled import CompiledLevel, compile_requested
from fgd_core.losses.fgd import LOSS_KEYS, TERMS, FGDLoss, MultiLevelFGD, weight_terms
from fgd_core.losses.gcblock import ContextBlock
from fgd_core.losses.masks import build_masks

__all__ = [
    "LOSS_KEYS",
    "TERMS",
    "CompiledLevel",
    "ContextBlock",
    "FGDLoss",
    "MultiLevelFGD",
    "build_masks",
    "compile_requested",
    "weight_terms",
]

from fgd_core.losses.calibration import Calibration, calibrate, propose_temperature  # noqa: E402

__all__ += ["Calibration", "calibrate", "propose_temperature"]
