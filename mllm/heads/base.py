"""What an auxiliary head is: a training-only loss on the encoder's features and declared batch keys.

The model knows no data set. A head that needs targets beyond the answer tokens (the objects in each
patch, say) declares the batch keys it reads (``batch_keys``), says how one sample becomes those
targets (:meth:`AuxHead.sample_targets`, handed to the collator by the run), and which encoder features
it reads (``reads_towers``: also each tower of a fused encoder). The model passes exactly those
features, returned explicitly by the encoder's forward, and adds the head's loss to the answer loss
while the encoder trains. Built as ``CLS(cfg, spec=HeadSpec)``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from common.errors import UserError

SampleTargets = Callable[[Mapping[str, Any]], dict[str, torch.Tensor]]


class HeadError(UserError, ValueError):
    """A head cannot be built for this encoder or fed from this data; the message names the field."""


@dataclass(frozen=True)
class HeadSpec:
    """The encoder output a head is sized for."""

    dim: int  # width of the encoder's last tapped layer
    grid: tuple[int, int]  # its patch grid
    num_tokens: int  # its tokens per image
    tower_dims: tuple[int, ...] = ()  # a fused encoder: each tower's last tapped width ...
    tower_tokens: tuple[int, ...] = ()  # ... and its tokens on the common grid (empty for a plain encoder)


@dataclass
class HeadInputs:
    """The features a head reads: the encoder's last tapped layer, and each tower's when asked for."""

    tokens: torch.Tensor  # [B, N, D]
    towers: list[torch.Tensor] = field(default_factory=list)  # [B, N_t, D_t] per tower (reads_towers only)


class AuxHead(nn.Module):
    batch_keys: ClassVar[tuple[str, ...]] = ()  # batch entries loss() reads, made by sample_targets()
    data: ClassVar[str | None] = None  # the data set whose samples carry the targets (None: any)
    reads_towers: bool = False  # also each tower's features (a fused encoder)

    def sample_targets(self, data: Any) -> SampleTargets:
        """``sample -> {batch key: tensor}`` for one sample with an image, given the run's data config;
        the collator stacks them over the rows that have an image."""
        raise NotImplementedError

    def loss(self, inputs: HeadInputs, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError
