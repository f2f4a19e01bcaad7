"""Spatial pyramid pooling projector: pooled grids at several scales, concatenated, then an MLP.

SPP (He et al., "Spatial Pyramid Pooling in Deep Convolutional Networks", 2014, §2.2): the patch
map ``Z`` ``[B, D_in, s, s]`` is pooled into ``l x l`` bins for every level ``l`` in ``levels``
(adaptive bins: bin ``i`` spans rows ``floor(i s / l) .. ceil((i+1) s / l)``, so any ``s`` works),
each level flattened in raster order, levels concatenated coarse to fine:

    H = MLP([Pool_{l_1}(Z); Pool_{l_2}(Z); ...])    ->    sum_l l^2 tokens

Default levels (1, 2, 4) give 21 tokens: one global summary plus progressively finer cells.
``[B, s^2, D_in] -> [B, sum l^2, D_out]``. The output is not one raster grid.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F

from projectors.mlp import GridPoolMLPProjector, ProjectorError, square_side


@dataclass
class PyramidPoolConfig:
    levels: list[int] = field(default_factory=lambda: [1, 2, 4])  # bins per side at each level
    pool: Literal["avg", "max"] = "avg"
    depth: int = 2  # Linear layers of the MLP after pooling

    def __post_init__(self) -> None:
        if not self.levels or min(self.levels) < 1:
            raise ProjectorError(f"levels: expected positive bin counts, got {self.levels}")


class PyramidPoolProjector(GridPoolMLPProjector):
    """``[B, s*s, in_dim] -> [B, sum(l^2), out_dim]``."""

    config_cls = PyramidPoolConfig
    cfg: PyramidPoolConfig

    def _side(self, num_tokens: int) -> int:
        side = square_side(num_tokens, "pyramid projector")
        if max(self.cfg.levels) > side:
            raise ProjectorError(f"pyramid.levels: {max(self.cfg.levels)} bins exceed the {side}x{side} patch grid")
        return side

    def num_output_tokens(self, num_tokens: int) -> int:
        self._side(num_tokens)
        return sum(level * level for level in self.cfg.levels)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        _, num, _ = tokens.shape
        fmap = self.feature_map(tokens, self._side(num))
        pool = F.adaptive_avg_pool2d if self.cfg.pool == "avg" else F.adaptive_max_pool2d
        levels = [pool(fmap, level).flatten(2) for level in self.cfg.levels]
        return self.mlp(torch.cat(levels, dim=2).transpose(1, 2))
