"""Linear projector (LLaVA v1): one affine map from encoder width to LLM width.

``H_v = W Z_v + b`` applied per visual token (Liu et al., "Visual Instruction Tuning", 2023, Eq. 1):
``[B, N, D_in] -> [B, N, D_out]``; the token count is unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class LinearProjectorConfig:
    bias: bool = True


class LinearProjector(nn.Module):
    """``[B, N, in_dim] -> [B, N, out_dim]`` with one ``nn.Linear``."""

    config_cls = LinearProjectorConfig

    def __init__(self, cfg: LinearProjectorConfig, in_dim: int, out_dim: int) -> None:
        super().__init__()
        if in_dim <= 0 or out_dim <= 0:
            raise ValueError(f"linear projector: in_dim and out_dim must be positive, got {in_dim}, {out_dim}")
        self.cfg = cfg
        self.in_dim, self.out_dim = in_dim, out_dim
        self.proj = nn.Linear(in_dim, out_dim, bias=cfg.bias)

    def num_output_tokens(self, num_tokens: int) -> int:
        return num_tokens

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.proj(tokens)
