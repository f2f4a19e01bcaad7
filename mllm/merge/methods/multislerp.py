"""Multi-SLERP (Goddard, "Multi-SLERP", goddard.blog, 2025; mergekit ``multislerp``): barycentric
interpolation of any number of models on the hypersphere, via the tangent space at their weighted mean.

Per tensor, flattened into one vector; v_i = theta_i - theta_0 with a base model, else theta_i; weights
w_i (divided by sum_i w_i when ``normalize_weights``, the default):

    u_i = v_i / (|v_i| + eps)                          (project onto the unit sphere)
    m = sum_i w_i u_i;  m <- m / |m|                   (weighted Euclidean mean, on the sphere)
    tau = sum_i w_i (u_i - <u_i, m> m)                 (tangent vectors at m, interpolated)
    r = cos(|tau|') m + sin(|tau|') / |tau|' tau,  |tau|' = |tau| + eps   (exponential map back)
    theta = theta_0 + (sum_i w_i |v_i|) r              (theta_0 = 0 without a base)

as mergekit computes it. One model: theta_1 unchanged. If |m| < eps: two models fall back to
w_1 v_1 + w_2 v_2 (+ theta_0); more raise an error (antipodal inputs whose weights cancel).

Streaming: every vector above is a linear combination of the v_i, so the whole computation runs on
the inner products <v_i, v_j> (k x k numbers, k = models), which the scan accumulates over the row
blocks in float64; each block is then sum_i c_i v_i with fixed c_i. Memory: one block; every merged
tensor is read twice (scan, merge).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from mllm.merge.methods.base import MergeMethod, TensorInfo, fp32, per_model
from mllm.merge.methods.spherical import add_block, block_gram, combine, gram_scan_result, task_vectors
from mllm.merge.tensors import MergeError


@dataclass(frozen=True, kw_only=True)
class MultislerpParams:
    weight: dict[str, float] = per_model()  # w_i, per model (required)
    normalize_weights: bool = True  # divide the weights by their sum
    eps: float = 1e-8  # added to norms before dividing by them


def multislerp_coefficients(gram: torch.Tensor, weights: list[float], eps: float) -> torch.Tensor | None:
    """c with the merged delta = sum_i c_i v_i, from the inner products [k, k] of the v_i (float64);
    None when |m| < eps (the caller falls back or refuses)."""
    w = torch.tensor(weights, dtype=torch.float64)
    norms = gram.diagonal().sqrt()
    to_unit = 1.0 / (norms + eps)  # u_i = to_unit_i v_i

    def norm(c: torch.Tensor) -> float:  # |sum_i c_i v_i|
        return math.sqrt(max(float(c @ gram @ c), 0.0))

    mean = w * to_unit
    mean_norm = norm(mean)
    if mean_norm < eps:
        return None
    mean = mean / mean_norm
    dots = (gram @ mean) * to_unit  # <u_i, m>
    tangent = w * to_unit - float((w * dots).sum()) * mean
    tangent_norm = norm(tangent) + eps
    result = mean * math.cos(tangent_norm) + tangent * (math.sin(tangent_norm) / tangent_norm)
    return result * float((norms * w).sum())


class Multislerp(MergeMethod):
    config_cls = MultislerpParams
    base = "optional"
    min_models = 1

    @classmethod
    def needs_scan(cls, params: MultislerpParams) -> bool:
        return True  # the norms span the whole tensor

    @classmethod
    def scan_block(cls, state: dict[str, Any], tensors: dict[str, torch.Tensor], base: torch.Tensor | None,
                   params: MultislerpParams, info: TensorInfo) -> None:
        if len(tensors) > 1:
            add_block(state, task_vectors(tensors, base), "all")

    @classmethod
    def scan_result(cls, state: dict[str, Any], params: MultislerpParams, info: TensorInfo) -> dict[str, Any]:
        return gram_scan_result(state)

    @classmethod
    def merge(cls, tensors: dict[str, torch.Tensor], base: torch.Tensor | None, params: MultislerpParams,
              info: TensorInfo) -> torch.Tensor:
        """One row block (a whole tensor when called directly, without ``info.prepared``)."""
        if len(tensors) == 1:
            return fp32(next(iter(tensors.values())))
        weights = [params.weight[m] for m in tensors]
        if params.normalize_weights:
            total = sum(weights)
            weights = [w / total for w in weights]
        vectors = task_vectors(tensors, base)
        coefs = multislerp_coefficients(block_gram(info.prepared, vectors, "all", vectors[0].dim()), weights,
                                        params.eps)
        if coefs is None:
            if len(vectors) != 2:
                raise MergeError(
                    f"tensor {info.name!r}: multislerp: the weighted sum of the inputs is zero (antipodal "
                    f"inputs whose weights cancel); change the weights")
            coefs = torch.tensor(weights, dtype=torch.float64)
        out = combine(vectors, list(coefs), "all")
        return out.add_(fp32(base)) if base is not None else out
