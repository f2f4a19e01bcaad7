"""NuSLERP (mergekit ``nuslerp``, mergekit's own): slerp of two models with mergekit's weight
parameterisation, optionally of their task vectors, over the whole tensor or per row / column.

With per-model weights w_1, w_2 (exactly two models besides the optional base):

    t = w_2 / (w_1 + w_2)    (0.5 when |w_1 + w_2| < 1e-6)
    v_i = theta_i - theta_0 with a base model, else theta_i
    u_i = v_i / max(|v_i|, 1e-7);  cos(theta) = <u_1, u_2>, clamped to [-1, 1]
    out = (sin((1 - t) theta) v_1 + sin(t theta) v_2) / sin(theta)     (Shoemake 1985)
        = (1 - t) v_1 + t v_2                         where 1 - cos(theta)^2 <= eps^2, eps = 1e-8
    theta_merged = theta_0 + out with a base model, else out

The vectors |v| and <u_1, u_2> are taken over: the whole tensor (``nuslerp_flatten: true``, the
default); else each column, along dim 0 (``nuslerp_row_wise: true``); else each row, along the last
dim. A 1-D tensor is one vector in every mode.

Streaming: for vectors that span rows (whole tensor, columns, 1-D tensors) the scan accumulates
|v_1|^2, |v_2|^2 and <v_1, v_2> over the row blocks (float64; per column: 3 numbers a column); each
block is then a fixed combination of its rows. Row vectors lie within one block and need nothing
beforehand, but the scan still reads them (every merged tensor is read twice).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from mllm.merge.methods.base import MergeMethod, TensorInfo, fp32, per_model
from mllm.merge.methods.spherical import (
    Axis,
    add_block,
    block_gram,
    combine,
    gram_scan_result,
    spans_rows,
    task_vectors,
    vector_axis,
)

NORM_EPS = 1e-7  # mergekit's clamp of |v| when normalising
EPS = 1e-8  # mergekit's collinearity tolerance: 1 - cos^2 <= EPS^2


@dataclass(frozen=True, kw_only=True)
class NuslerpParams:
    weight: dict[str, float] = per_model()  # w_i, per model (required); t = w_2 / (w_1 + w_2)
    nuslerp_row_wise: bool = False  # vectors are columns (along dim 0) instead of rows
    nuslerp_flatten: bool = True  # one vector: the whole tensor (overrides nuslerp_row_wise)


def interpolation_t(params: NuslerpParams, model_ids: list[str]) -> float:
    w1, w2 = (params.weight[m] for m in model_ids)
    return 0.5 if abs(w1 + w2) < 1e-6 else w2 / (w1 + w2)


def nuslerp_coefficients(gram: torch.Tensor, t: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(c1, c2), each one value per vector, with out = c1 v_1 + c2 v_2, from the inner products [2, 2, ...]."""
    n1, n2 = gram[0, 0].sqrt().clamp(min=NORM_EPS), gram[1, 1].sqrt().clamp(min=NORM_EPS)
    cos = (gram[0, 1] / (n1 * n2)).clamp(-1, 1)
    colinear = (1 - cos.square()) <= EPS**2
    theta = torch.acos(torch.where(colinear, 0.0, cos))
    sin = torch.where(colinear, 1.0, torch.sin(theta))
    c1 = torch.where(colinear, 1.0 - t, torch.sin((1 - t) * theta) / sin)
    c2 = torch.where(colinear, t, torch.sin(t * theta) / sin)
    return c1, c2


class Nuslerp(MergeMethod):
    config_cls = NuslerpParams
    base = "optional"
    min_models = 2
    max_models = 2

    @staticmethod
    def axis(params: NuslerpParams) -> Axis:
        return "all" if params.nuslerp_flatten else 0 if params.nuslerp_row_wise else -1

    @classmethod
    def needs_scan(cls, params: NuslerpParams) -> bool:
        return True  # whole-tensor, column and 1-D vectors span rows

    @classmethod
    def scan_block(cls, state: dict[str, Any], tensors: dict[str, torch.Tensor], base: torch.Tensor | None,
                   params: NuslerpParams, info: TensorInfo) -> None:
        axis = cls.axis(params)
        if spans_rows(len(info.shape), axis):
            add_block(state, task_vectors(tensors, base), vector_axis(len(info.shape), axis))

    @classmethod
    def scan_result(cls, state: dict[str, Any], params: NuslerpParams, info: TensorInfo) -> dict[str, Any]:
        return gram_scan_result(state)

    @classmethod
    def merge(cls, tensors: dict[str, torch.Tensor], base: torch.Tensor | None, params: NuslerpParams,
              info: TensorInfo) -> torch.Tensor:
        """One row block (a whole tensor when called directly, without ``info.prepared``)."""
        vectors = task_vectors(tensors, base)
        ndim = vectors[0].dim()
        axis = vector_axis(ndim, cls.axis(params))
        t = interpolation_t(params, list(tensors))
        c1, c2 = nuslerp_coefficients(block_gram(info.prepared, vectors, axis, ndim), t)
        out = combine(vectors, [c1, c2], axis)
        return out.add_(fp32(base)) if base is not None else out

