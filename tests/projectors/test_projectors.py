"""Projectors: hand-set weights against hand-computed outputs, shapes, config checks."""

from __future__ import annotations

import math

import pytest
import torch

from common.errors import UserError
from mllm.registry import PROJECTORS
from projectors.linear import LinearProjector, LinearProjectorConfig
from projectors.mlp import MLPProjector, MLPProjectorConfig, ProjectorError

W1 = [[1.0, 2.0], [3.0, 4.0]]
B1 = [0.5, -1.0]


def _gelu(x: float) -> float:  # exact GELU, x * Phi(x)
    return x * 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


def test_linear_hand_computed() -> None:
    proj = LinearProjector(LinearProjectorConfig(), in_dim=2, out_dim=2)
    with torch.no_grad():
        proj.proj.weight.copy_(torch.tensor(W1))
        proj.proj.bias.copy_(torch.tensor(B1))
    x = torch.tensor([[[1.0, -1.0], [2.0, 0.5]]])  # [B=1, N=2, D=2]
    # row 0: [1-2+0.5, 3-4-1] ; row 1: [2+1+0.5, 6+2-1]
    expected = torch.tensor([[[-0.5, -2.0], [3.5, 7.0]]])
    torch.testing.assert_close(proj(x), expected)
    assert proj.num_output_tokens(7) == 7


def test_linear_without_bias() -> None:
    proj = LinearProjector(LinearProjectorConfig(bias=False), in_dim=3, out_dim=5)
    assert proj.proj.bias is None
    assert proj(torch.zeros(2, 4, 3)).abs().sum() == 0
    assert proj(torch.randn(2, 4, 3)).shape == (2, 4, 5)


def test_mlp2x_gelu_hand_computed() -> None:
    proj = MLPProjector(MLPProjectorConfig(depth=2), in_dim=2, out_dim=2)
    assert [type(m).__name__ for m in proj.layers] == ["Linear", "GELU", "Linear"]
    with torch.no_grad():
        proj.layers[0].weight.copy_(torch.tensor(W1))
        proj.layers[0].bias.copy_(torch.tensor(B1))
        proj.layers[2].weight.copy_(torch.tensor([[1.0, 0.0], [1.0, -1.0]]))
        proj.layers[2].bias.copy_(torch.tensor([0.0, 0.25]))
    x = torch.tensor([[[1.0, -1.0]]])
    h = [_gelu(-0.5), _gelu(-2.0)]  # hidden after Linear 1 = [-0.5, -2.0]
    expected = torch.tensor([[[h[0], h[0] - h[1] + 0.25]]])
    torch.testing.assert_close(proj(x), expected)


@pytest.mark.parametrize("depth, linears", [(1, 1), (2, 2), (3, 3)])
def test_mlp_depth_and_shapes(depth: int, linears: int) -> None:
    proj = MLPProjector(MLPProjectorConfig(depth=depth), in_dim=6, out_dim=4)
    layers = list(proj.layers)
    assert sum(isinstance(m, torch.nn.Linear) for m in layers) == linears
    assert layers[0].in_features == 6 and all(m.out_features == 4 for m in layers if isinstance(m, torch.nn.Linear))
    assert proj(torch.randn(3, 5, 6)).shape == (3, 5, 4)
    assert proj.num_output_tokens(5) == 5


def test_mlp_rejects_bad_depth() -> None:
    with pytest.raises(ProjectorError) as err:  # a user error: one line, exit 2 at the command line
        MLPProjectorConfig(depth=0)
    assert isinstance(err.value, UserError) and str(err.value) == "depth: expected an integer >= 1, got 0"


@pytest.mark.parametrize("name", PROJECTORS.names())
def test_registry_builds_every_projector(name: str) -> None:
    proj = PROJECTORS.build(name, PROJECTORS.config_cls(name)(), in_dim=8, out_dim=16)
    out = proj(torch.randn(2, 16, 8))  # a 4x4 patch grid: pooling projectors need a square grid
    assert out.shape == (2, proj.num_output_tokens(16), 16)
    assert torch.isfinite(out).all()
