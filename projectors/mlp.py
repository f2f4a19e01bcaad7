"""MLP projector (LLaVA-1.5 ``mlpNx_gelu``): Linear -> (GELU -> Linear) x (depth - 1).

For the default ``depth = 2`` this is ``H_v = W_2 GELU(W_1 Z_v + b_1) + b_2`` (Liu et al.,
"Improved Baselines with Visual Instruction Tuning", 2023, §3.2), applied per visual token:
``[B, N, D_in] -> [B, N, D_out]``; the first layer already maps to the LLM width, as in LLaVA's
``build_vision_projector``, so the parameter names ``layers.0``, ``layers.2`` mirror its
``mm_projector.0``, ``mm_projector.2``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from common.errors import UserError


class ProjectorError(UserError, ValueError):
    """A projector's config does not fit its field's rules or the encoder's tokens; the message names the field."""


@dataclass
class MLPProjectorConfig:
    depth: int = 2  # number of Linear layers (LLaVA's "mlp{depth}x_gelu")

    def __post_init__(self) -> None:
        if self.depth < 1:
            raise ProjectorError(f"depth: expected an integer >= 1, got {self.depth}")


class PerTokenProjector(nn.Module):
    """Set-up shared by the projectors that map every token on its own: ``[B, N, in_dim] -> [B, N, out_dim]``."""

    def __init__(self, cfg: Any, in_dim: int, out_dim: int, what: str) -> None:
        super().__init__()
        if in_dim <= 0 or out_dim <= 0:
            raise ProjectorError(f"{what}: in_dim and out_dim must be positive, got {in_dim}, {out_dim}")
        self.cfg = cfg
        self.in_dim, self.out_dim = in_dim, out_dim

    def num_output_tokens(self, num_tokens: int) -> int:
        return num_tokens


class MLPProjector(PerTokenProjector):
    """``[B, N, in_dim] -> [B, N, out_dim]``: ``depth`` Linear layers with exact GELU between them."""

    config_cls = MLPProjectorConfig
    cfg: MLPProjectorConfig

    def __init__(self, cfg: MLPProjectorConfig, in_dim: int, out_dim: int) -> None:
        super().__init__(cfg, in_dim, out_dim, "mlp projector")
        modules: list[nn.Module] = [nn.Linear(in_dim, out_dim)]
        for _ in range(cfg.depth - 1):
            modules += [nn.GELU(), nn.Linear(out_dim, out_dim)]
        self.layers = nn.Sequential(*modules)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.layers(tokens)


def square_side(num_tokens: int, what: str, hint: str = "") -> int:
    """The side ``s`` of the ``s x s`` patch grid that ``num_tokens`` raster-order tokens form."""
    side = math.isqrt(num_tokens)
    if side * side != num_tokens:
        raise ProjectorError(f"{what}: {num_tokens} tokens are not a square patch grid{hint}")
    return side


class GridPoolMLPProjector(nn.Module):
    """Set-up shared by the projectors that pool the square patch grid, then apply a ``cfg.depth`` MLP."""

    def __init__(self, cfg: Any, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.in_dim, self.out_dim = in_dim, out_dim
        self.mlp = MLPProjector(MLPProjectorConfig(depth=cfg.depth), in_dim, out_dim)

    @staticmethod
    def feature_map(tokens: torch.Tensor, side: int) -> torch.Tensor:
        """``[B, s*s, D]`` raster-order tokens as the ``[B, D, s, s]`` map the pooling layers take."""
        batch, _, dim = tokens.shape
        return tokens.transpose(1, 2).reshape(batch, dim, side, side)
