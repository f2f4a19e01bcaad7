"""Token grids: row-major layout, explicit resampling modes, configured-grid validation."""

from __future__ import annotations

import pytest
import torch

from encoders.base import EncoderError
from encoders.grid import check_grid, resample, to_map, to_tokens


def test_row_major_round_trip() -> None:
    tokens = torch.arange(2 * 6 * 3, dtype=torch.float32).reshape(2, 6, 3)
    fmap = to_map(tokens, (2, 3))
    assert fmap.shape == (2, 3, 2, 3)
    assert torch.equal(fmap[1, :, 1, 2], tokens[1, 5])  # token 5 = row 1, col 2
    assert torch.equal(to_tokens(fmap), tokens)


def test_area_is_block_average_and_max_is_block_max() -> None:
    grid = torch.tensor([[1.0, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12], [13, 14, 15, 16]])
    tokens = grid.reshape(1, 16, 1)
    area = resample(tokens, (4, 4), (2, 2), "area")
    assert area.flatten().tolist() == [3.5, 5.5, 11.5, 13.5]  # mean of each 2x2 block
    assert resample(tokens, (4, 4), (2, 2), "max").flatten().tolist() == [6, 8, 14, 16]


def test_upsampling_modes() -> None:
    tokens = torch.tensor([[[0.0], [4.0]]])  # a 1x2 grid
    assert resample(tokens, (1, 2), (1, 4), "nearest").flatten().tolist() == [0, 0, 4, 4]
    # align_corners=False: output centres at 0.25, 0.75, 1.25, 1.75 of the input cell spacing
    assert resample(tokens, (1, 2), (1, 4), "bilinear").flatten().tolist() == [0, 1, 3, 4]


def test_same_grid_is_identity_even_with_prefix_tokens() -> None:
    tokens = torch.randn(2, 5, 3)  # 1 prefix + 2x2
    assert resample(tokens, (2, 2), (2, 2), "bicubic") is tokens


def test_errors() -> None:
    with pytest.raises(EncoderError, match="5 tokens do not fill a 2x2 grid"):
        resample(torch.randn(1, 5, 3), (2, 2), (1, 1), "area")
    with pytest.raises(EncoderError, match="grid_mode: expected one of"):
        resample(torch.randn(1, 4, 3), (2, 2), (1, 1), "lanczos")
    with pytest.raises(EncoderError, match="grid: expected \\[rows, cols\\]"):
        check_grid([4], "grid")
    assert check_grid(None, "grid") is None and check_grid([3, 4], "grid") == (3, 4)
