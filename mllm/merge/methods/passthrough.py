"""Passthrough (mergekit ``passthrough``): each output tensor is its one input tensor, optionally scaled.

    theta_out = scale * theta_in          (scale unset: theta_in unchanged)

With ``slices:`` this is layer stacking -- the "frankenmerge" depth up-scaling of SOLAR (Kim et al.,
2023, arXiv 2312.15166): the output's decoder layers are the slices' layer ranges in order, renumbered
from 0, and the output config's layer count is their total (see :mod:`mllm.merge.layout`). Every slice
has exactly one source. ``base_model`` is accepted and only lends its config and tokenizer, as in
mergekit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mllm.merge.methods.base import MergeMethod, TensorInfo, fp32, per_model


@dataclass(frozen=True, kw_only=True)
class PassthroughParams:
    scale: dict[str, float | None] = per_model(None)  # multiplies the tensor (per model; unset: unchanged)


class Passthrough(MergeMethod):
    config_cls = PassthroughParams
    base = "ignored"
    min_models = 1
    max_models = 1

    @classmethod
    def merge(cls, tensors: dict[str, torch.Tensor], base: torch.Tensor | None, params: PassthroughParams,
              info: TensorInfo) -> torch.Tensor:
        ((mid, tensor),) = tensors.items()
        scale = params.scale[mid]
        return tensor if scale is None else fp32(tensor) * scale
