"""Spherical linear interpolation (Shoemake, "Animating rotation with quaternion curves", SIGGRAPH
1985; mergekit ``slerp``) between the base model (v0) and one other model (v1), per tensor:

    cos(theta) = <v0 / |v0|, v1 / |v1|>, clamped to [-1, 1]   (|v| <= eps counts as 1)
    slerp(v0, v1; t) = sin((1 - t) theta) / sin(theta) v0 + sin(t theta) / sin(theta) v1
                     = (1 - t) v0 + t v1                      where |cos(theta)| > dot_threshold

over the whole tensor flattened into one vector, as mergekit does. ``t`` is mergekit's parameter (0 =
base, 1 = the other model); a per-tensor ``{filter, value}`` list or a layer gradient resolves to one
``t`` per tensor. ``base_model`` is required and exactly one other model is merged.

Streaming: |v0|^2, |v1|^2 and <v0, v1> are sums over the tensor, which the scan accumulates over the
row blocks (float64); each block is then the fixed combination above of its rows. Memory: one block
and three numbers; every merged tensor is read twice (scan, merge).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from mllm.merge.methods.base import MergeMethod, TensorInfo
from mllm.merge.methods.spherical import add_block, block_gram, combine, gram_scan_result

DOT_THRESHOLD = 0.9995  # mergekit's: nearly collinear (or antipodal) pairs interpolate linearly
EPS = 1e-8  # mergekit's: a norm at or below this is taken as 1


@dataclass(frozen=True, kw_only=True)
class SlerpParams:
    t: float  # interpolation factor: 0 = base model, 1 = the other model


def slerp_coefficients(gram: torch.Tensor, t: float) -> tuple[float, float]:
    """(c0, c1) with slerp(v0, v1; t) = c0 v0 + c1 v1, from the inner products [2, 2] of v0, v1."""
    norms = [math.sqrt(float(gram[i, i])) for i in range(2)]
    n0, n1 = (n if n > EPS else 1.0 for n in norms)
    dot = min(1.0, max(-1.0, float(gram[0, 1]) / (n0 * n1)))
    if abs(dot) > DOT_THRESHOLD:
        return 1.0 - t, t
    theta = math.acos(dot)
    return math.sin((1.0 - t) * theta) / math.sin(theta), math.sin(t * theta) / math.sin(theta)


class Slerp(MergeMethod):
    config_cls = SlerpParams
    min_models = 1
    max_models = 1

    @classmethod
    def needs_scan(cls, params: SlerpParams) -> bool:
        return True  # the norms span the whole tensor

    @classmethod
    def scan_block(cls, state: dict[str, Any], tensors: dict[str, torch.Tensor], base: torch.Tensor | None,
                   params: SlerpParams, info: TensorInfo) -> None:
        assert base is not None
        add_block(state, [base, *tensors.values()], "all")

    @classmethod
    def scan_result(cls, state: dict[str, Any], params: SlerpParams, info: TensorInfo) -> dict[str, Any]:
        return gram_scan_result(state)

    @classmethod
    def merge(cls, tensors: dict[str, torch.Tensor], base: torch.Tensor | None, params: SlerpParams,
              info: TensorInfo) -> torch.Tensor:
        """One row block; called on a whole tensor without ``info.prepared`` (direct use), the inner
        products are those of the tensors given."""
        assert base is not None
        vectors = [base, *tensors.values()]
        c0, c1 = slerp_coefficients(block_gram(info.prepared, vectors, "all", base.dim()), params.t)
        return combine(vectors, [c0, c1], "all")
