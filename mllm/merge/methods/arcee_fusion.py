"""Arcee Fusion (mergekit ``arcee_fusion``, Arcee AI's own method): take the other model's entries
where they both moved far from the base and changed the output distribution of their row, keep the
base's elsewhere.

With theta_0 the base model's tensor and theta_1 the other model's, softmax over the last dim:

    KL_r = sum_j p_rj log(p_rj / q_rj),  p = softmax(theta_1) + 1e-8,  q = softmax(theta_0) + 1e-8
    I = |theta_1 - theta_0| * KL_r                    (importance; KL_r of the entry's row r)
    threshold = Q2(I) + 1.5 (Q3(I) - Q1(I))           (quartiles: sorted I at floor(q (n - 1)))
    theta = theta_0 + (theta_1 - theta_0) * [I >= threshold]

A 1-D tensor is one row. ``base_model`` is required and exactly one other model is merged. The
quartiles are exact over the whole tensor; mergekit takes them from 1,000,000 entries it draws at
random (unseeded) once a tensor has more, so only tensors up to that size are reproducible there.

Streaming: the quartiles need the whole importance tensor, so ``prepare`` computes it in place of the
other model's whole float32 tensor, row slice by row slice with the base's, selects the quartiles there
(O(n), no sort) and returns the threshold (and a 1-D tensor's KL); each row block then recomputes its
rows' importance, which depends only on those rows. Memory: during ``prepare``, one float32 copy of the
tensor and the base's as stored (as for TIES' trimming); every merged tensor is read twice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812

from mllm.merge.methods.base import MergeMethod, TensorInfo, fp32

ROWS_AT_ONCE = 1 << 12  # rows of importance computed at a time in ``prepare`` (bounds its temporaries)


@dataclass(frozen=True, kw_only=True)
class ArceeFusionParams:
    pass


def row_kl(params: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """KL_r of each row (last dim), keepdim, as mergekit computes it."""
    p = F.softmax(params, dim=-1) + 1e-8
    q = F.softmax(base, dim=-1) + 1e-8
    return torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)


def importance(params: torch.Tensor, base: torch.Tensor, kl: torch.Tensor | None = None) -> torch.Tensor:
    """I above (``kl``: a 1-D tensor's KL, computed over the whole tensor beforehand)."""
    return (params - base).abs() * (row_kl(params, base) if kl is None else kl)


def fusion_threshold(scores: torch.Tensor, overwrite: bool = False) -> float:
    """Q2 + 1.5 (Q3 - Q1), with mergekit's quartile index floor(q (n - 1)) (q in float32), in float32 as
    mergekit computes it (O(n) selection; ``overwrite`` lets it reorder ``scores`` instead of copying them)."""
    flat = scores.detach().to(torch.float32, copy=not overwrite).reshape(-1).numpy()
    index = (torch.tensor([0.25, 0.5, 0.75]) * (flat.size - 1)).long().tolist()
    flat.partition(index)  # in place: the three order statistics land at their sorted positions
    q1, q2, q3 = (torch.tensor(flat[i]) for i in index)
    return float(q2 + 1.5 * (q3 - q1))


class ArceeFusion(MergeMethod):
    config_cls = ArceeFusionParams
    min_models = 1
    max_models = 1

    @classmethod
    def needs_prepare(cls, params: ArceeFusionParams) -> bool:
        return True  # the quartiles span the whole tensor

    @classmethod
    def prepare(cls, tensor: torch.Tensor, base: torch.Tensor | None, params: ArceeFusionParams,
                info: TensorInfo, model_id: str) -> dict[str, Any]:
        """The threshold (and a 1-D tensor's KL) from the whole tensor; ``tensor`` is overwritten with I."""
        assert base is not None
        if tensor.dim() <= 1:
            kl = row_kl(tensor, fp32(base))
            return {"threshold": fusion_threshold(importance(tensor, fp32(base), kl)), "kl": kl}
        for r in range(0, tensor.shape[0], ROWS_AT_ONCE):
            rows = tensor[r:r + ROWS_AT_ONCE]
            rows.copy_(importance(rows, fp32(base[r:r + ROWS_AT_ONCE])))
        return {"threshold": fusion_threshold(tensor, overwrite=True)}

    @classmethod
    def merge(cls, tensors: dict[str, torch.Tensor], base: torch.Tensor | None, params: ArceeFusionParams,
              info: TensorInfo) -> torch.Tensor:
        """One row block; without ``info.prepared`` (a single block, or direct use) the block is the
        whole tensor and the threshold is its own."""
        assert base is not None
        b, x = fp32(base), fp32(next(iter(tensors.values())))
        prepared = next(iter(info.prepared.values()), None)
        scores = importance(x, b, prepared.get("kl") if prepared else None)
        threshold = prepared["threshold"] if prepared else fusion_threshold(scores)
        return b + (x - b) * (scores >= threshold).float()
