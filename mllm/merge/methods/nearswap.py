"""NearSwap (mergekit ``nearswap``, from the QuartetAnemoi-70B-t0.0001 model card by alchemonaut):
take the other model's value where it lies near the base's, keep the base's where they differ much.

Elementwise, with a = the base model's entry, b = the other model's:

    w = clamp(t / max(|a - b|, 1e-6), 0, 1)
    theta = w b + (1 - w) a

so entries closer than t are swapped in whole, farther ones by t / |a - b|. ``t`` (required) is
mergekit's similarity threshold; a per-tensor ``{filter, value}`` list or a layer gradient resolves to
one ``t`` per tensor. ``base_model`` is required and exactly one other model is merged.

Streaming: elementwise, so each row block is merged on its own (no scan, one read).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mllm.merge.methods.base import MergeMethod, TensorInfo, fp32


@dataclass(frozen=True, kw_only=True)
class NearswapParams:
    t: float  # similarity threshold: entries closer than t take the other model's value


class Nearswap(MergeMethod):
    config_cls = NearswapParams
    min_models = 1
    max_models = 1

    @classmethod
    def merge(cls, tensors: dict[str, torch.Tensor], base: torch.Tensor | None, params: NearswapParams,
              info: TensorInfo) -> torch.Tensor:
        assert base is not None
        a, b = fp32(base), fp32(next(iter(tensors.values())))
        weight = (params.t / (a - b).abs().clamp(min=1e-6)).clamp(min=0, max=1)
        return weight * b + (1 - weight) * a
