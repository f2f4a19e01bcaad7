"""InfMLLM pool-adapter: non-overlapping average pooling on the patch grid, then an MLP.

Tokens ``Z`` ``[B, s*s, D_in]`` (patch tokens only, raster order) are read as an ``s x s`` map and
average-pooled to ``p x p`` cells, ``p = s / k``, each the mean of a ``k x k`` patch block
(``s % k == 0``), kept in raster order (the "positional information preserved" point, vs a
Q-Former), then projected: ``H = W_2 GELU(W_1 AvgPool_k(Z) + b_1) + b_2`` (Zhou et al., 2023, arXiv 2311.06791;
official INF-MLLM ``pooler.py``; released eval: s = 32, p = 16, i.e. k = 2 -> 256 tokens). ``[B, s^2, D_in] -> [B, p^2, D_out]``.
The cell side ``k`` is configured rather than InfMLLM's ``pool_out_size`` p, so one config serves
every input resolution.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from projectors.mlp import GridPoolMLPProjector, ProjectorError, square_side


@dataclass
class PoolAdapterConfig:
    kernel: int = 2  # k: each output token averages a k x k patch block (InfMLLM: 32x32 -> 16x16)
    depth: int = 2  # Linear layers of the MLP after pooling (InfMLLM: 2)

    def __post_init__(self) -> None:
        if self.kernel < 1:
            raise ProjectorError(f"kernel: expected a positive integer, got {self.kernel}")


class PoolAdapterProjector(GridPoolMLPProjector):
    """``[B, s*s, in_dim] -> [B, (s/kernel)^2, out_dim]``: ``kernel x kernel`` average pooling, then an MLP."""

    config_cls = PoolAdapterConfig
    cfg: PoolAdapterConfig

    def _side(self, num_tokens: int) -> int:
        """The pooled grid side ``p = s / kernel``."""
        side = square_side(num_tokens, "pool_adapter", " (drop prefix tokens)")
        k = self.cfg.kernel
        if side % k:
            raise ProjectorError(f"pool_adapter.kernel: {k} does not divide the {side}x{side} patch grid")
        return side // k

    def num_output_tokens(self, num_tokens: int) -> int:
        return self._side(num_tokens) ** 2

    def output_grid(self, grid: tuple[int, int]) -> tuple[int, int]:
        """The (rows, cols) raster of the output tokens for an input patch grid."""
        if grid[0] != grid[1]:
            raise ProjectorError(f"pool_adapter: the {grid[0]}x{grid[1]} patch grid is not square")
        side = self._side(grid[0] * grid[1])
        return side, side

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        _, num, _ = tokens.shape
        fmap = self.feature_map(tokens, self._side(num) * self.cfg.kernel)
        pooled = F.avg_pool2d(fmap, self.cfg.kernel).flatten(2).transpose(1, 2)
        return self.mlp(pooled)
