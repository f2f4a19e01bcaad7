"""FtZ: an anchor encoder attends to an augmenting encoder (She & Wu, 2025, arXiv 2509.00664).

The anchor's tokens ``A ∈ R^{B × N_a × d_a}`` (semantically strong, e.g. CLIP) are the queries; the
augmenting encoder's tokens ``G ∈ R^{B × N_g × d_g}`` (perception-rich, e.g. DINOv2) are keys and
values, mapped to ``d_a`` by the attention's own input projections. Pre-norm residual, optionally
gated by zero-initialised scalars so training starts from the anchor-only model, optionally followed
by a pre-norm FFN:

    A' = A + tanh(γ_x) · MHCA(LN_a(A), LN_g(G), LN_g(G))
    A''= A' + tanh(γ_f) · FFN(LN_f(A'))                     (with ``ffn``)

``γ = 0`` at start with ``gate`` (then ``A'' = A``); without ``gate`` the factors are 1. The output
keeps the anchor's token count and grid, so the projector and LLM see the usual number of tokens;
the grids of the two towers need not agree. Which side queries, the gating and the FFN are INFERRED
(the report's abstract does not fix them): all three are options here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from encoders.base import EncoderError
from encoders.fusion.base import EncoderFusion, FeatureSpec


@dataclass
class FtZConfig:
    anchor: int = 0  # which tower is the anchor (queries); the other one augments (keys / values)
    heads: int = 8  # attention heads; must divide the anchor width
    gate: bool = True  # zero-initialised tanh gates: start from the anchor-only model
    ffn: bool = False  # add a pre-norm FFN after the cross-attention
    ffn_ratio: float = 4.0  # FFN hidden width as a multiple of the anchor width

    def __post_init__(self) -> None:
        if self.anchor not in (0, 1):
            raise EncoderError(f"anchor: expected 0 or 1 (tower index), got {self.anchor}")
        if self.heads < 1:
            raise EncoderError(f"heads: expected >= 1, got {self.heads}")


class FtZFusion(EncoderFusion):
    """Anchor tokens + gated multi-head cross-attention to the augmenting tokens."""

    config_cls = FtZConfig
    name = "ftz"

    def __init__(self, cfg: FtZConfig, inputs: Sequence[FeatureSpec]) -> None:
        super().__init__()
        self.cfg = cfg
        self.require_towers(inputs, 2, layers=1)
        anchor, aug = inputs[cfg.anchor], inputs[1 - cfg.anchor]
        d_a, d_g = anchor.dims[0], aug.dims[0]
        if d_a % cfg.heads:
            raise EncoderError(f"fusion ftz: heads {cfg.heads} must divide the anchor width {d_a}")
        self.norm_a, self.norm_g = nn.LayerNorm(d_a), nn.LayerNorm(d_g)
        self.attn = nn.MultiheadAttention(d_a, cfg.heads, kdim=d_g, vdim=d_g, batch_first=True)
        self.gate_attn = nn.Parameter(torch.zeros(())) if cfg.gate else None
        self.ffn: nn.Sequential | None = None
        if cfg.ffn:
            hidden = max(1, round(cfg.ffn_ratio * d_a))
            self.ffn = nn.Sequential(nn.LayerNorm(d_a), nn.Linear(d_a, hidden), nn.GELU(), nn.Linear(hidden, d_a))
            self.gate_ffn = nn.Parameter(torch.zeros(())) if cfg.gate else None
        self.out_dim, self.out_grid, self.out_tokens = d_a, anchor.grid, anchor.num_tokens

    @staticmethod
    def _gated(gate: nn.Parameter | None, update: torch.Tensor) -> torch.Tensor:
        return update if gate is None else torch.tanh(gate) * update

    def forward(self, feats: Sequence[Sequence[torch.Tensor]]) -> torch.Tensor:
        anchor, aug = feats[self.cfg.anchor][0], feats[1 - self.cfg.anchor][0]
        kv = self.norm_g(aug)
        attended, _ = self.attn(self.norm_a(anchor), kv, kv, need_weights=False)
        out = anchor + self._gated(self.gate_attn, attended)
        if self.ffn is not None:
            out = out + self._gated(self.gate_ffn, self.ffn(out))
        return out
