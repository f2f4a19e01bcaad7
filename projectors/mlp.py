"""MLP projector (LLaVA-1.5 ``mlpNx_gelu``): Linear -> (GELU -> Linear) x (depth - 1).

For the default ``depth = 2`` this is ``H_v = W_2 GELU(W_1 Z_v + b_1) + b_2`` (Liu et al.,
"Improved Baselines with Visual Instruction Tuning", 2023, §3.2), applied per visual token:
``[B, N, D_in] -> [B, N, D_out]``; the first layer already maps to the LLM width, as in LLaVA's
``build_vision_projector``, so the parameter names ``layers.0``, ``layers.2`` mirror its
``mm_projector.0``, ``mm_projector.2``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class MLPProjectorConfig:
    depth: int = 2  # number of Linear layers (LLaVA's "mlp{depth}x_gelu")

    def __post_init__(self) -> None:
        if self.depth < 1:
            raise ValueError(f"depth: expected an integer >= 1, got {self.depth}")


class MLPProjector(nn.Module):
    """``[B, N, in_dim] -> [B, N, out_dim]``: ``depth`` Linear layers with exact GELU between them."""

    config_cls = MLPProjectorConfig

    def __init__(self, cfg: MLPProjectorConfig, in_dim: int, out_dim: int) -> None:
        super().__init__()
        if in_dim <= 0 or out_dim <= 0:
            raise ValueError(f"mlp projector: in_dim and out_dim must be positive, got {in_dim}, {out_dim}")
        self.cfg = cfg
        self.in_dim, self.out_dim = in_dim, out_dim
        modules: list[nn.Module] = [nn.Linear(in_dim, out_dim)]
        for _ in range(cfg.depth - 1):
            modules += [nn.GELU(), nn.Linear(out_dim, out_dim)]
        self.layers = nn.Sequential(*modules)

    def num_output_tokens(self, num_tokens: int) -> int:
        return num_tokens

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.layers(tokens)
