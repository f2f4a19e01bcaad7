"""Linear merge / model soup (Wortsman et al., 2022; mergekit ``linear``).

    theta = sum_i w_i theta_i / sum_i w_i          (normalize: true, the default)
    theta = sum_i w_i theta_i                      (normalize: false)

``base_model`` does what it does in mergekit, which gives linear no base role: in the ``models:`` form a
base not listed under ``models`` is one more model of the average, the last, with no parameters of its
own (its weight comes from the top-level ``parameters``; without one the merge is refused, as mergekit
refuses it); listed under ``models`` it is just that model. With ``slices:`` it only lends the output its
config and tokenizer. Computed in fp32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mllm.merge.methods.base import MergeMethod, TensorInfo, fp32, per_model
from mllm.merge.tensors import MergeError


@dataclass(frozen=True, kw_only=True)
class LinearParams:
    weight: dict[str, float] = per_model()  # w_i, per model (required)
    normalize: bool = True  # divide by sum_i w_i

    def __post_init__(self) -> None:
        if self.normalize and abs(sum(self.weight.values())) < 1e-8:
            raise MergeError("weights sum to 0; set normalize: false or change the weights")


class Linear(MergeMethod):
    config_cls = LinearParams
    base = "input"  # a base_model joins the averaged models (mergekit)

    @classmethod
    def merge(cls, tensors: dict[str, torch.Tensor], base: torch.Tensor | None, params: LinearParams,
              info: TensorInfo) -> torch.Tensor:
        out: torch.Tensor | None = None
        for mid, t in tensors.items():
            term = fp32(t)  # scaled in place when it is a copy; an input is left as read
            term = term * params.weight[mid] if term is t else term.mul_(params.weight[mid])
            out = term if out is None else out.add_(term)
        assert out is not None
        if params.normalize:
            out /= sum(params.weight[m] for m in tensors)
        return out
