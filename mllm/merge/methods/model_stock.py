"""Model Stock (Jang, Yun & Han, "Model Stock: All we need is just a few fine-tuned models", ECCV 2024,
arXiv:2403.19522; mergekit ``model_stock``): average N >= 2 fine-tunes, then move back towards the base
by the interpolation ratio the paper derives from the angle between the fine-tunes' task vectors:

    tau_i = theta_i - theta_0
    cos(phi) = mean over pairs i < j of clamp(<tau_i, tau_j> / max(|tau_i| |tau_j|, 1e-6), -1, 1)
    t = N cos(phi) / (1 + (N - 1) cos(phi))        (t = 0 where |1 + (N - 1) cos(phi)| < 1e-6)
    theta = t (1/N) sum_i theta_i + (1 - t) theta_0

with the vectors taken, as mergekit does, over the whole tensor (``filter_wise: false``, the default)
or over each row along the last dim (``filter_wise: true``; a 1-D tensor is then one vector).

Streaming: for whole-tensor (and 1-D) vectors the scan accumulates the inner products <tau_i, tau_j>
(N x N numbers) over the row blocks in float64; filter-wise rows lie within one row block. Each block
is then merged with its t. Memory: one block; every merged tensor is read twice (scan, merge), also
filter-wise, where only 1-D tensors need the scan.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from mllm.merge.methods.base import MergeMethod, TensorInfo, fp32
from mllm.merge.methods.spherical import (
    Axis,
    add_block,
    block_gram,
    gram_scan_result,
    spans_rows,
    task_vectors,
    vector_axis,
)


@dataclass(frozen=True, kw_only=True)
class ModelStockParams:
    filter_wise: bool = False  # one ratio t per row (last dim) instead of per tensor


def stock_ratio(gram: torch.Tensor) -> torch.Tensor:
    """t above, one per vector, from the task vectors' inner products [N, N, ...] (float64)."""
    n = gram.shape[0]
    norms = torch.stack([gram[i, i].sqrt() for i in range(n)])
    cosines = [(gram[i, j] / (norms[i] * norms[j]).clamp(min=1e-6)).clamp(-1, 1)
               for i in range(n) for j in range(i + 1, n)]
    cos = torch.stack(cosines).mean(0)
    denominator = 1 + (n - 1) * cos
    singular = denominator.abs() < 1e-6
    return torch.where(singular, 0.0, n * cos / torch.where(singular, 1.0, denominator))


class ModelStock(MergeMethod):
    config_cls = ModelStockParams
    min_models = 2

    @staticmethod
    def axis(params: ModelStockParams) -> Axis:
        return -1 if params.filter_wise else "all"

    @classmethod
    def needs_scan(cls, params: ModelStockParams) -> bool:
        return True  # whole-tensor and 1-D vectors span rows

    @classmethod
    def scan_block(cls, state: dict[str, Any], tensors: dict[str, torch.Tensor], base: torch.Tensor | None,
                   params: ModelStockParams, info: TensorInfo) -> None:
        assert base is not None
        axis = cls.axis(params)
        if spans_rows(len(info.shape), axis):
            add_block(state, task_vectors(tensors, base), vector_axis(len(info.shape), axis))

    @classmethod
    def scan_result(cls, state: dict[str, Any], params: ModelStockParams, info: TensorInfo) -> dict[str, Any]:
        return gram_scan_result(state)

    @classmethod
    def merge(cls, tensors: dict[str, torch.Tensor], base: torch.Tensor | None, params: ModelStockParams,
              info: TensorInfo) -> torch.Tensor:
        """One row block (a whole tensor when called directly, without ``info.prepared``)."""
        assert base is not None
        deltas = task_vectors(tensors, base)
        axis = vector_axis(base.dim(), cls.axis(params))
        t = stock_ratio(block_gram(info.prepared, deltas, axis, base.dim())).to(torch.float32)
        if axis == -1:
            t = t.unsqueeze(-1)
        average = sum(fp32(x) for x in tensors.values()) / len(tensors)
        assert isinstance(average, torch.Tensor)
        return t * average + (1 - t) * fp32(base)
