"""InfMLLM pool-adapter: block means in raster order (hand-computed), token counts, config errors."""

from __future__ import annotations

import pytest
import torch

from mllm.registry import PROJECTORS
from projectors.pool_adapter import PoolAdapterConfig, PoolAdapterProjector


def _identity_head(proj: PoolAdapterProjector) -> None:
    with torch.no_grad():
        proj.mlp.layers[0].weight.copy_(torch.eye(proj.in_dim))
        proj.mlp.layers[0].bias.zero_()


def test_block_means_in_raster_order() -> None:
    proj = PoolAdapterProjector(PoolAdapterConfig(kernel=2, depth=1), in_dim=2, out_dim=2)
    _identity_head(proj)
    grid = torch.arange(16.0).reshape(4, 4)  # channel 0 = raster index, channel 1 = its negative
    tokens = torch.stack([grid.flatten(), -grid.flatten()], dim=-1)[None]  # [1, 16, 2]
    # 2x2 blocks: {0,1,4,5} {2,3,6,7} {8,9,12,13} {10,11,14,15}
    means = torch.tensor([2.5, 4.5, 10.5, 12.5])
    torch.testing.assert_close(proj(tokens), torch.stack([means, -means], dim=-1)[None])
    assert proj.num_output_tokens(16) == 4 and proj.output_grid((4, 4)) == (2, 2)


def test_mlp_head_and_shapes() -> None:
    proj = PROJECTORS.build("pool_adapter", {"kernel": 2}, in_dim=12, out_dim=8)
    assert [type(m).__name__ for m in proj.mlp.layers] == ["Linear", "GELU", "Linear"]  # InfMLLM's MLP
    tokens = torch.randn(2, 1024, 12)  # InfMLLM: 32x32 patches -> 16x16 = 256 tokens
    out = proj(tokens)
    assert out.shape == (2, 256, 8) and proj.num_output_tokens(1024) == 256
    pooled = tokens.reshape(2, 16, 2, 16, 2, 12).mean(dim=(2, 4)).reshape(2, 256, 12)
    torch.testing.assert_close(out, proj.mlp(pooled))


def test_errors() -> None:
    proj = PoolAdapterProjector(PoolAdapterConfig(kernel=3), in_dim=2, out_dim=2)
    with pytest.raises(ValueError, match="pool_adapter.kernel: 3 does not divide the 4x4 patch grid"):
        proj.num_output_tokens(16)
    with pytest.raises(ValueError, match="15 tokens are not a square patch grid"):
        proj(torch.zeros(1, 15, 2))
    with pytest.raises(ValueError, match="kernel: expected a positive integer"):
        PoolAdapterConfig(kernel=0)
