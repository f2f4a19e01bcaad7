"""Spatial pyramid pooling projector: levels concatenated coarse to fine (hand-computed), counts, errors."""

from __future__ import annotations

import pytest
import torch

from mllm.registry import PROJECTORS
from projectors.pyramid import PyramidPoolConfig, PyramidPoolProjector


def _identity(levels: list[int], pool: str) -> PyramidPoolProjector:
    proj = PyramidPoolProjector(PyramidPoolConfig(levels=levels, pool=pool, depth=1), in_dim=1, out_dim=1)
    with torch.no_grad():
        proj.mlp.layers[0].weight.fill_(1.0)
        proj.mlp.layers[0].bias.zero_()
    return proj


@pytest.mark.parametrize("pool, expected", [
    ("avg", [7.5, 2.5, 4.5, 10.5, 12.5]),  # whole map, then the 2x2 block means in raster order
    ("max", [15.0, 5.0, 7.0, 13.0, 15.0]),
])
def test_levels_hand_computed(pool: str, expected: list[float]) -> None:
    tokens = torch.arange(16.0).reshape(1, 16, 1)  # a 4x4 raster
    out = _identity([1, 2], pool)(tokens)
    assert out.flatten().tolist() == expected


def test_adaptive_bins_on_an_odd_grid() -> None:
    tokens = torch.arange(9.0).reshape(1, 9, 1)  # 3x3; 2 bins per side span rows/cols [0, 2) and [1, 3)
    out = _identity([2], "avg")(tokens).flatten().tolist()
    assert out == [2.0, 3.0, 5.0, 6.0]  # mean of {0,1,3,4}, {1,2,4,5}, {3,4,6,7}, {4,5,7,8}


def test_counts_and_registry() -> None:
    proj = PROJECTORS.build("pyramid", {}, in_dim=6, out_dim=4)
    assert proj.num_output_tokens(256) == 1 + 4 + 16
    assert proj(torch.randn(2, 256, 6)).shape == (2, 21, 4)
    with pytest.raises(ValueError, match="pyramid.levels: 4 bins exceed the 3x3 patch grid"):
        proj.num_output_tokens(9)
    with pytest.raises(ValueError, match="levels: expected positive bin counts"):
        PyramidPoolConfig(levels=[0])
