"""Layer swapping (Bandarkar et al., ICLR 2025, arXiv 2410.01335).

Two experts fine-tuned from one base: the ``kept`` expert (e.g. math) supplies the middle decoder
blocks, the ``swap: true`` expert (e.g. language) the bottom ``bottom`` and top ``top`` blocks. Between
them, ``transition`` blocks on each side interpolate linearly; with donor weight w(l):

    theta(l) = w(l) theta_swap(l) + (1 - w(l)) theta_kept(l)
    w = 1 in the swapped zones, w = 1 - k/(transition + 1) for the k-th transition block (k = 1..)
    after a swapped zone that exists (``bottom`` or ``top`` > 0: no zone, no transition beside it),
    w = 0 in the middle.

Embeddings, final norm and lm_head come from the kept expert (``outside: kept``) or the swapped one
(``outside: swap``). The paper's exact b, t and transition width are unconfirmed: all are parameters.
With ``slices:`` the zones count the output's decoder layers and each slice's sources say which of its two
models is that slice's donor; every parameter takes one value (no layer gradient or filter list).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from mllm.merge.methods.base import MergeMethod, TensorInfo, fp32, per_model, single_value
from mllm.merge.tensors import MergeError

_ZONES = "layer_swap's zones are counted in whole decoder layers, and a model is the donor or not"


@dataclass(frozen=True, kw_only=True)
class LayerSwapParams:
    swap: dict[str, bool] = per_model(False, single=_ZONES)  # true for the expert whose bottom/top blocks are used
    bottom: int = single_value(_ZONES)  # swapped blocks at the bottom
    top: int = single_value(_ZONES)  # swapped blocks at the top
    transition: int = single_value(_ZONES, 0)  # interpolated blocks between each swapped zone and the middle
    outside: Literal["kept", "swap"] = single_value(_ZONES, "kept")  # source of embeddings, final norm, lm_head

    def __post_init__(self) -> None:
        if min(self.bottom, self.top, self.transition) < 0:
            raise MergeError("bottom, top and transition must be >= 0")


def donor_weight(layer: int | None, num_layers: int, p: LayerSwapParams) -> float:
    """w(l) above; outside the blocks 1.0 or 0.0 per ``outside``."""
    if layer is None:
        return 1.0 if p.outside == "swap" else 0.0
    from_top = num_layers - 1 - layer
    if layer < p.bottom or from_top < p.top:
        return 1.0
    # 1 = first block after a swapped zone; an empty zone (0 blocks) has no transition beside it
    after = [d + 1 for d, zone in ((layer - p.bottom, p.bottom), (from_top - p.top, p.top)) if zone > 0]
    k = min(after, default=p.transition + 1)
    return 1.0 - k / (p.transition + 1) if k <= p.transition else 0.0


class LayerSwap(MergeMethod):
    config_cls = LayerSwapParams
    base = "none"
    min_models = 2
    max_models = 2

    @classmethod
    def validate(cls, params: LayerSwapParams, model_ids: list[str], num_layers: int) -> None:
        swapped = [m for m in model_ids if params.swap[m]]
        if len(swapped) != 1:
            raise MergeError(f"layer_swap: exactly one model needs parameters.swap: true, got {len(swapped)}")
        zones = (params.bottom > 0) + (params.top > 0)
        if params.bottom + params.top + zones * params.transition > num_layers:
            raise MergeError(
                f"layer_swap: bottom + top + transition per swapped zone = "
                f"{params.bottom + params.top + zones * params.transition} exceeds the {num_layers} decoder layers"
            )

    @classmethod
    def merge(cls, tensors: dict[str, torch.Tensor], base: torch.Tensor | None, params: LayerSwapParams,
              info: TensorInfo) -> torch.Tensor:
        (swapped,) = [m for m in tensors if params.swap[m]]
        (kept,) = [m for m in tensors if not params.swap[m]]
        w = donor_weight(info.layer, info.num_layers, params)
        return w * fp32(tensors[swapped]) + (1.0 - w) * fp32(tensors[kept])
