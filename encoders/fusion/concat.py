"""Channel concatenation on a common grid — the baseline fusion (prismatic's DINOv2 + SigLIP).

For towers ``t = 1..T``, each tapping layers ``l``, on one grid of ``N`` tokens:

    Z = [ Z_1^{l_1} ; ... ; Z_T^{l_k} ] ∈ R^{B × N × Σ D_t,l}     (concatenation along channels)

No parameters: the projector that follows learns the mixing. Grids must already agree (the fused
encoder's ``grid`` option resamples them explicitly).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from encoders.fusion.base import EncoderFusion, FeatureSpec


@dataclass
class ConcatConfig:
    """No options: every tapped layer of every tower is concatenated, in tower then tap order."""


class ConcatFusion(EncoderFusion):
    config_cls = ConcatConfig
    name = "concat"

    def __init__(self, cfg: ConcatConfig, inputs: Sequence[FeatureSpec]) -> None:
        super().__init__()
        self.cfg = cfg
        common = self.require_common_grid(inputs)
        self.out_dim = sum(sum(spec.dims) for spec in inputs)
        self.out_grid, self.out_tokens = common.grid, common.num_tokens

    def forward(self, feats: Sequence[Sequence[torch.Tensor]]) -> torch.Tensor:
        return torch.cat([layer for tower in feats for layer in tower], dim=-1)
