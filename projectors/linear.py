"""Linear projector (LLaVA v1): one affine map from encoder width to LLM width.

``H_v = W Z_v + b`` applied per visual token (Liu et al., "Visual Instruction Tuning", 2023, Eq. 1):
``[B, N, D_in] -> [B, N, D_out]``; the token count is unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from projectors.mlp import PerTokenProjector


@dataclass
class LinearProjectorConfig:
    bias: bool = True


class LinearProjector(PerTokenProjector):
    """``[B, N, in_dim] -> [B, N, out_dim]`` with one ``nn.Linear``."""

    config_cls = LinearProjectorConfig
    cfg: LinearProjectorConfig

    def __init__(self, cfg: LinearProjectorConfig, in_dim: int, out_dim: int) -> None:
        super().__init__(cfg, in_dim, out_dim, "linear projector")
        self.proj = nn.Linear(in_dim, out_dim, bias=cfg.bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.proj(tokens)
