"""MG-LLaVA Conv-Gate fusion of a high-resolution encoder into the base one (Zhao et al.,
2024, arXiv 2406.17770; official ``DualPathFuseModule``).

Tower 0 is the low-resolution base encoder (CLIP ViT: ``L ∈ R^{B × N × d_l}``), tower 1 the
high-resolution one (ConvNeXt: ``H ∈ R^{B × N × d_h}``), both on one ``rows × cols`` grid:

    H' = P_h( GELU( C_h(H) ) )              C_h: 1×1 conv d_h -> d_h,  P_h: 1×1 conv d_h -> d_l
    L' = L + P_l( GELU( DW7(L) ) )          DW7: depth-wise 7×7 conv (padding 3),  P_l: 1×1 conv d_l -> d_l
    g  = MLP( mean_tokens([L' ; H']) )      MLP: Linear(2·d_l -> d_l/2) -> GELU -> Linear(d_l/2 -> 1)
    F  = L' + tanh(g) · H'                  g is one scalar per image

Init as the official code: C_h and DW7 Xavier-uniform with zero bias; P_h and P_l zero (weights and
biases) with ``zero_init``, so ``F = L`` exactly at the start; the gate MLP keeps PyTorch's default.
The output keeps the base encoder's width and tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from encoders.base import EncoderError
from encoders.fusion.base import EncoderFusion, FeatureSpec
from encoders.grid import to_map, to_tokens


@dataclass
class ConvGateConfig:
    zero_init: bool = True  # zero P_h and P_l so that F = L at the start (the official default)
    kernel: int = 7  # depth-wise kernel of the low-resolution path (odd)

    def __post_init__(self) -> None:
        if self.kernel < 1 or self.kernel % 2 == 0:
            raise EncoderError(f"kernel: expected an odd positive size, got {self.kernel}")


class ConvGateFusion(EncoderFusion):
    """``F = L' + tanh(g) · H'`` with a conv path per resolution and a per-image scalar gate."""

    config_cls = ConvGateConfig
    name = "convgate"

    def __init__(self, cfg: ConvGateConfig, inputs: Sequence[FeatureSpec]) -> None:
        super().__init__()
        self.cfg = cfg
        self.require_towers(inputs, 2, layers=1)
        common = self.require_common_grid(inputs, patches_only=True)
        d_l, d_h = inputs[0].dims[0], inputs[1].dims[0]
        self.high_conv = nn.Conv2d(d_h, d_h, 1)  # C_h
        self.high_proj = nn.Conv2d(d_h, d_l, 1)  # P_h
        self.low_conv = nn.Conv2d(d_l, d_l, cfg.kernel, padding=cfg.kernel // 2, groups=d_l)  # DW7
        self.low_proj = nn.Conv2d(d_l, d_l, 1)  # P_l
        self.gate = nn.Sequential(nn.Linear(2 * d_l, d_l // 2), nn.GELU(), nn.Linear(d_l // 2, 1))
        for conv in (self.high_conv, self.low_conv):
            nn.init.xavier_uniform_(conv.weight)
            nn.init.zeros_(conv.bias)
        for proj in (self.high_proj, self.low_proj):
            if cfg.zero_init:
                nn.init.zeros_(proj.weight)
            else:
                nn.init.xavier_uniform_(proj.weight)
            nn.init.zeros_(proj.bias)
        self.grid = common.grid
        self.out_dim, self.out_grid, self.out_tokens = d_l, common.grid, common.num_tokens

    def forward(self, feats: Sequence[Sequence[torch.Tensor]]) -> torch.Tensor:
        low, high = to_map(feats[0][0], self.grid), to_map(feats[1][0], self.grid)
        high = to_tokens(self.high_proj(F.gelu(self.high_conv(high))))  # H'
        low = to_tokens(low + self.low_proj(F.gelu(self.low_conv(low))))  # L'
        gate = self.gate(torch.cat([low, high], dim=-1).mean(dim=1)).unsqueeze(1)  # [B, 1, 1]
        return low + torch.tanh(gate) * high
