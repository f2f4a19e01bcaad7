"""The fusion interface: what a fused encoder hands its fusion module, and what it gets back.

A fusion is built from one :class:`FeatureSpec` per tower (the widths of the layers that tower taps,
its token grid after the fused encoder's grid alignment, its token count) and maps the towers'
tapped layers ``feats[t][i]: [B, N_t, D_t,i]`` to one sequence ``[B, out_tokens, out_dim]``. Shape
requirements (a common grid, a number of towers) are checked when it is built, with errors that say
which configuration key to change.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from encoders.base import EncoderError


@dataclass(frozen=True)
class FeatureSpec:
    """One tower's tapped layers as the fusion receives them."""

    dims: tuple[int, ...]  # width of each tapped layer, in tap order
    grid: tuple[int, int]  # token grid (rows, cols)
    num_tokens: int  # tokens per layer: rows * cols, plus prefix tokens when the tower keeps them

    @property
    def has_prefix(self) -> bool:
        return self.num_tokens != self.grid[0] * self.grid[1]


class EncoderFusion(nn.Module):
    """Base class: subclasses set ``out_dim``, ``out_grid``, ``out_tokens`` and implement ``forward``."""

    config_cls: type
    name: str = "fusion"
    out_dim: int
    out_grid: tuple[int, int]
    out_tokens: int

    def forward(self, feats: Sequence[Sequence[torch.Tensor]]) -> torch.Tensor:
        raise NotImplementedError

    def require_towers(self, inputs: Sequence[FeatureSpec], towers: int, layers: int | None = None) -> None:
        """Exactly ``towers`` towers (each tapping exactly ``layers`` layers, when given)."""
        if len(inputs) != towers:
            raise EncoderError(f"fusion {self.name}: expects {towers} towers, got {len(inputs)}")
        for t, spec in enumerate(inputs):
            if layers is not None and len(spec.dims) != layers:
                raise EncoderError(
                    f"fusion {self.name}: towers[{t}] taps {len(spec.dims)} layers; set its layers to {layers} layer(s)"
                )

    def require_common_grid(self, inputs: Sequence[FeatureSpec], patches_only: bool = False) -> FeatureSpec:
        """All towers on one grid with one token count (and no prefix tokens if ``patches_only``)."""
        first = inputs[0]
        for t, spec in enumerate(inputs):
            if (spec.grid, spec.num_tokens) != (first.grid, first.num_tokens):
                found = ", ".join(f"towers[{i}] {s.grid} ({s.num_tokens} tokens)" for i, s in enumerate(inputs))
                raise EncoderError(
                    f"fusion {self.name}: needs one token grid, found {found}; set the fused encoder's grid "
                    "(and drop_prefix: true on the towers)"
                )
            if patches_only and spec.has_prefix:
                raise EncoderError(f"fusion {self.name}: towers[{t}] keeps prefix tokens; set its drop_prefix: true")
        return first
