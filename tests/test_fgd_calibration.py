"""Loss-scale calibration: one common factor on the weights, and a spread temperature."""

from __future__ import annotations

import pytest
import torch

from fgd_core.losses import MultiLevelFGD, calibrate, propose_temperature
from fgd_core.losses.calibration import spatial_max_share

AUTHORS = {"alpha": 1e-3, "beta": 5e-4, "gamma": 5e-4, "lambda_": 5e-6}


def pyramid(g, scale):
    return {
        "P3": scale * torch.randn(2, 16, 16, 16, generator=g),
        "P4": scale * torch.randn(2, 16, 8, 8, generator=g),
        "P5": scale * torch.randn(2, 16, 4, 4, generator=g),
    }


def boxes(g):
    xy = torch.rand(3, 2, generator=g) * 80
    return [torch.cat([xy, xy + 20 + torch.rand(3, 2, generator=g) * 30], 1) for _ in range(2)]


@pytest.mark.parametrize("ratio", [1.0, 0.25])
def test_weights_scaled_by_one_factor_to_the_target_ratio(ratio):
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    loss = MultiLevelFGD(["P3", "P4", "P5"], 16, 16, temp=0.5, **AUTHORS)
    s, t, b = pyramid(g, 1.0), pyramid(g, 6.0), boxes(g)
    det = 1.7
    cal = calibrate(loss, s, t, b, (128, 128), det, ratio=ratio)
    # the authors' ratios between the four weights are kept
    assert cal.beta / cal.alpha == pytest.approx(0.5)
    assert cal.gamma / cal.alpha == pytest.approx(0.5)
    assert cal.lambda_ / cal.alpha == pytest.approx(5e-3)
    assert cal.alpha == pytest.approx(AUTHORS["alpha"] * cal.factor)
    # applied, the weighted distillation total is `ratio` times the detection loss
    loss.set_hparams(**cal.hparams)
    total = sum(float(v) for v in loss(s, t, b, (128, 128)).values())
    assert total == pytest.approx(ratio * det, rel=1e-4)


def test_temperature_spreads_a_large_teacher_attention():
    g = torch.Generator().manual_seed(1)
    # |F| of 4-9 with a few strong cells: at the authors' 0.5 the attention is nearly one-hot
    t = pyramid(g, 6.0)
    t["P3"][:, :, 3, 5] += 20.0
    assert spatial_max_share(t["P3"], 0.5) > 0.9
    temp = propose_temperature(t)
    assert temp > 0.5
    assert spatial_max_share(t["P3"], temp) <= 0.25
    assert spatial_max_share(t["P4"], temp) <= 0.25
    # a feature of unit scale is already spread at 0.5
    assert propose_temperature(pyramid(g, 0.1)) == 0.5


def test_calibrate_keeps_a_given_temperature_and_rejects_bad_input():
    g = torch.Generator().manual_seed(2)
    loss = MultiLevelFGD(["P3"], 16, 16, temp=0.5, **AUTHORS)
    s, t, b = pyramid(g, 1.0), pyramid(g, 6.0), boxes(g)
    cal = calibrate(loss, s, t, b, (128, 128), 1.0, temp=2.0)
    assert cal.temp == 2.0
    assert loss.hparams["temp"] == 0.5  # calibrate itself changes nothing
    with pytest.raises(ValueError, match="detection_loss"):
        calibrate(loss, s, t, b, (128, 128), float("nan"))
    with pytest.raises(ValueError, match="ratio"):
        calibrate(loss, s, t, b, (128, 128), 1.0, ratio=0.0)
    with pytest.raises(ValueError, match="zero"):
        calibrate(loss, t, t, b, (128, 128), 1.0, temp=0.5)
