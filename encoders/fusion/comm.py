"""COMM multi-level feature merging of CLIP and DINOv2 (Jiang et al., 2023, arXiv 2310.08825).

Tower 0 is the CLIP-like encoder (the paper taps all its layers ``i``), tower 1 the DINOv2-like one
(the paper taps only the deep layers ``j = 19..24``; shallow DINOv2 layers hurt). Each tapped layer
gets its own LayerNorm and Linear (LLN-Layerscale), the layers are summed with learned scalars, the
DINO sum is aligned to CLIP by an MLP, and the two are concatenated along channels:

    v̄₁ = Σ_i α_i · Linear_i(LN_i(v₁^i))           (CLIP, width d₁ -> d₁)
    v̄₂ = Σ_j β_j · Linear_j(LN_j(v₂^j))           (DINOv2, width d₂ -> d₂)
    v̄  = [ v̄₁ ; MLP(v̄₂) ] ∈ R^{B × N × 2·d₁}      (MLP: d₂ -> d₁)

The final ``v̂ = Linear(v̄)`` to the LLM width is the projector. Unstated in the paper, so chosen
here and configurable: α, β start uniform (1 / #layers) and are not normalised; the LLN keeps each
encoder's width; the MLP is the best ablated one (Table 6: 2 layers, hidden ratio 4, GELU).
Both towers must lie on one grid (both are 24×24 at 336 px / patch 14 in the paper).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from encoders.base import EncoderError
from encoders.fusion.base import EncoderFusion, FeatureSpec


@dataclass
class CommConfig:
    mlp_layers: int = 2  # depth of the DINO alignment MLP (Table 6: 2 is best; 1 = a Linear)
    mlp_ratio: float = 4.0  # hidden width of the MLP as a multiple of the CLIP width
    scale_init: float | None = None  # initial α_i, β_j; None = 1 / (number of tapped layers)

    def __post_init__(self) -> None:
        if self.mlp_layers < 1:
            raise EncoderError(f"mlp_layers: expected >= 1, got {self.mlp_layers}")
        if self.mlp_ratio <= 0:
            raise EncoderError(f"mlp_ratio: expected a positive number, got {self.mlp_ratio}")


class LayerScaleMerge(nn.Module):
    """LLN-Layerscale: ``Σ_i s_i · Linear_i(LN_i(x_i))`` over one encoder's tapped layers."""

    def __init__(self, dims: Sequence[int], scale_init: float | None) -> None:
        super().__init__()
        if len(set(dims)) != 1:
            raise EncoderError(f"fusion comm: an encoder's tapped layers must share one width, got {list(dims)}")
        width = dims[0]
        self.norms = nn.ModuleList(nn.LayerNorm(width) for _ in dims)
        self.linears = nn.ModuleList(nn.Linear(width, width) for _ in dims)
        init = 1.0 / len(dims) if scale_init is None else scale_init
        self.scales = nn.Parameter(torch.full((len(dims),), float(init)))

    def forward(self, layers: Sequence[torch.Tensor]) -> torch.Tensor:
        terms = [s * lin(norm(x)) for s, lin, norm, x in zip(self.scales, self.linears, self.norms, layers, strict=True)]
        return torch.stack(terms).sum(dim=0)


def alignment_mlp(in_dim: int, out_dim: int, layers: int, ratio: float) -> nn.Sequential:
    """``layers`` Linear layers with GELU between them; hidden width ``ratio · out_dim``."""
    hidden = max(1, round(ratio * out_dim))
    widths = [in_dim] + [hidden] * (layers - 1) + [out_dim]
    modules: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        modules += ([nn.GELU()] if i else []) + [nn.Linear(a, b)]
    return nn.Sequential(*modules)


class CommFusion(EncoderFusion):
    """``[LLN-Layerscale(CLIP layers) ; MLP(LLN-Layerscale(DINO layers))]`` on channels."""

    config_cls = CommConfig
    name = "comm"

    def __init__(self, cfg: CommConfig, inputs: Sequence[FeatureSpec]) -> None:
        super().__init__()
        self.cfg = cfg
        self.require_towers(inputs, 2)
        common = self.require_common_grid(inputs)
        clip, dino = inputs
        self.clip = LayerScaleMerge(clip.dims, cfg.scale_init)
        self.dino = LayerScaleMerge(dino.dims, cfg.scale_init)
        self.mlp = alignment_mlp(dino.dims[0], clip.dims[0], cfg.mlp_layers, cfg.mlp_ratio)
        self.out_dim = 2 * clip.dims[0]
        self.out_grid, self.out_tokens = common.grid, common.num_tokens

    def forward(self, feats: Sequence[Sequence[torch.Tensor]]) -> torch.Tensor:
        clip, dino = feats
        return torch.cat([self.clip(clip), self.mlp(self.dino(dino))], dim=-1)
