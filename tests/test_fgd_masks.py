"""FGD masks: hand-computed cases (FGD_SPEC.md step 3)."""

from __future__ import annotations

import torch
from fgd_reference import reference_masks

from fgd_core.losses import build_masks
from fgd_core.losses import masks as masks_module


def _fg(boxes, feat_hw, input_hw, **kw):
    fg, bg = build_masks(
        [torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)], feat_hw, input_hw, **kw
    )
    return fg[0], bg[0]


def test_one_box_on_3x4_map():
    # stride 10: x' = x / 10; box [10, 0, 30, 10] -> cols floor(1)..ceil(3), rows 0..1
    fg, bg = _fg([[10, 0, 30, 10]], (3, 4), (30, 40))
    v = 1 / 6
    expected = torch.tensor([[0, v, v, v], [0, v, v, v], [0, 0, 0, 0]])
    assert torch.allclose(fg, expected)
    bg_expected = (expected == 0).float() / 6
    assert torch.allclose(bg, bg_expected)
    assert torch.isclose(bg.sum(), torch.tensor(1.0))


def test_non_square_map_catches_hw_swap():
    # a tall box on a 5x7 map: rows 0..4 (5 rows counted), cols 1..2
    fg, _ = _fg([[10, 0, 20, 40]], (5, 7), (50, 70))
    v = 1 / (5 * 2)
    expected = torch.zeros(5, 7)
    expected[0:5, 1:3] = v
    assert torch.allclose(fg, expected)
    swapped = torch.zeros(5, 7)
    swapped[1:3, 0:5] = v
    assert not torch.allclose(fg, swapped)


def test_overlap_smaller_box_wins():
    fg, bg = _fg([[0, 0, 60, 40], [20, 10, 30, 20]], (5, 7), (50, 70))
    expected = torch.full((5, 7), 1 / 35)
    expected[1:3, 2:4] = 1 / 4
    assert torch.allclose(fg, expected)
    assert torch.count_nonzero(bg) == 0  # no background cell left
    # the order of the boxes does not matter
    fg2, _ = _fg([[20, 10, 30, 20], [0, 0, 60, 40]], (5, 7), (50, 70))
    assert torch.equal(fg, fg2)


def test_box_touching_border_counts_area_before_clipping():
    # cols 5..7 (3 counted, 7 clipped to 6), rows 3..5 (3 counted, clipped to 4)
    fg, _ = _fg([[50, 30, 70, 50]], (5, 7), (50, 70))
    expected = torch.zeros(5, 7)
    expected[3:5, 5:7] = 1 / 9
    assert torch.allclose(fg, expected)


def test_box_smaller_than_one_cell():
    fg, _ = _fg([[31, 21, 32, 22]], (5, 7), (50, 70))
    expected = torch.zeros(5, 7)
    expected[2:4, 3:5] = 1 / 4
    assert torch.allclose(fg, expected)


def test_box_covering_whole_image():
    fg, bg = _fg([[0, 0, 70, 50]], (5, 7), (50, 70))
    assert torch.allclose(fg, torch.full((5, 7), 1 / 48))  # 6 rows x 8 cols counted
    assert torch.count_nonzero(bg) == 0


def test_image_without_boxes_is_all_background():
    fg, bg = build_masks([torch.zeros(0, 4), torch.tensor([[0.0, 0, 10, 10]])], (3, 4), (30, 40))
    assert torch.count_nonzero(fg[0]) == 0
    assert torch.allclose(bg[0], torch.full((3, 4), 1 / 12))
    assert torch.count_nonzero(fg[1]) == 4


def test_image_frame_maps_boxes_with_each_image_size():
    boxes = [torch.tensor([[0.0, 0.0, 35.0, 25.0]])]
    padded, _ = build_masks(boxes, (5, 7), (50, 70), box_frame="padded")
    image, _ = build_masks(boxes, (5, 7), (50, 70), [(25, 35)], box_frame="image")
    ref_padded, _ = reference_masks(boxes[0], (5, 7), (50, 70))
    ref_image, _ = reference_masks(boxes[0], (5, 7), (25, 35))
    assert torch.allclose(padded[0], ref_padded)
    assert torch.allclose(image[0], ref_image)
    assert not torch.allclose(padded, image)


def test_many_boxes_match_reference_and_blocks(monkeypatch):
    g = torch.Generator().manual_seed(0)
    H, W, input_hw = 40, 56, (320, 448)
    boxes = []
    for n in (300, 7, 0):
        xy = torch.rand(n, 2, generator=g) * torch.tensor([448.0, 320.0])
        wh = torch.rand(n, 2, generator=g) * 120 + 1
        boxes.append(torch.cat([xy, xy + wh], dim=1))
    fg, bg = build_masks(boxes, (H, W), input_hw)
    for i, b in enumerate(boxes):
        ref_fg, ref_bg = reference_masks(b, (H, W), input_hw)
        assert torch.allclose(fg[i], ref_fg)
        assert torch.allclose(bg[i], ref_bg)
    # Small blocks: the memory bound changes nothing in the result.
    monkeypatch.setattr(masks_module, "_BLOCK_ELEMENTS", H * W * 3 * 5)
    fg_small, bg_small = build_masks(boxes, (H, W), input_hw)
    assert torch.equal(fg, fg_small)
    assert torch.equal(bg, bg_small)
