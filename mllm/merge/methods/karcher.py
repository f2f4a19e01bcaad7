"""Karcher mean (Riemannian centre of mass; Karcher, Comm. Pure Appl. Math. 30(5), 1977) of the
models' tensors on the unit hypersphere, rescaled by their mean norm (mergekit ``karcher``, whose
reference is arXiv:2603.04972). The inputs are the listed models and, when the YAML names one, the
base model, as one more input, the last (mergekit ignores the base role here); alpha_i = 1/n.

Per tensor, flattened into one vector x_i:

    u_i = x_i / |x_i|;  only inputs with |x_i| > tol take part, with alpha_i renormalised over them
    m = sum_i alpha_i u_i;  m <- m / |m|    (m = u_first when |m| < tol)
    repeat max_iter times (the fixed-point iteration of Buss & Fillmore, ACM TOG 20(2), 2001):
        theta_i = arccos(clamp(<m, u_i>, -1, 1))
        g = sum_{i: theta_i >= tol} alpha_i theta_i / sin(theta_i) (u_i - <m, u_i> m)
        stop if |g| < tol
        m <- cos(|g|) m + sin(|g|) g / |g|;  m <- m / |m| (when |m| > tol)
    theta = (sum_i alpha_i |x_i|) m           (all inputs, 1/n each)

Streaming: m stays a linear combination of the u_i, so the iteration runs on the inner products
<x_i, x_j> (n x n numbers), which the scan accumulates over the row blocks in float64; each block is
then sum_i c_i x_i with fixed c_i. Memory: one block; every merged tensor is read twice (scan, merge).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from mllm.merge.methods.base import MergeMethod, TensorInfo, fp32
from mllm.merge.methods.spherical import add_block, block_gram, combine, gram_scan_result
from mllm.merge.tensors import MergeError


@dataclass(frozen=True, kw_only=True)
class KarcherParams:
    max_iter: int = 10  # fixed-point iterations at most
    tol: float = 1e-5  # convergence and zero-norm tolerance

    def __post_init__(self) -> None:
        if self.max_iter < 0 or self.tol < 0:
            raise MergeError("max_iter and tol must be >= 0")


def karcher_coefficients(gram: torch.Tensor, max_iter: int, tol: float) -> torch.Tensor:
    """c with the merged tensor = sum_i c_i x_i, from the inner products [n, n] of the x_i (float64)."""
    n = gram.shape[0]
    norms = gram.diagonal().sqrt()
    valid = [i for i in range(n) if float(norms[i]) > tol]
    coefs = torch.zeros(n, dtype=torch.float64)
    if not valid:
        return coefs
    to_unit = torch.where(norms > 0, 1.0 / norms, 0.0)  # u_i = to_unit_i x_i
    unit_gram = gram * to_unit[:, None] * to_unit[None, :]
    alpha = torch.zeros(n, dtype=torch.float64)
    alpha[valid] = 1.0 / len(valid)  # 1/n renormalised over the valid inputs

    def norm(c: torch.Tensor) -> float:  # |sum_i c_i u_i|
        return math.sqrt(max(float(c @ unit_gram @ c), 0.0))

    mean = alpha.clone()
    mean_norm = norm(mean)
    if mean_norm < tol:
        mean = torch.zeros(n, dtype=torch.float64)
        mean[valid[0]] = 1.0
    else:
        mean = mean / mean_norm
    for _ in range(max_iter):
        tangent = torch.zeros(n, dtype=torch.float64)
        dots = unit_gram @ mean  # <m, u_i>
        for i in valid:
            dot = min(1.0, max(-1.0, float(dots[i])))
            theta = math.acos(dot)
            if theta < tol:
                continue
            tangent -= (alpha[i] * theta / math.sin(theta) * dot) * mean
            tangent[i] += alpha[i] * theta / math.sin(theta)
        tangent_norm = norm(tangent)
        if tangent_norm < tol:
            break
        mean = math.cos(tangent_norm) * mean + (math.sin(tangent_norm) / tangent_norm) * tangent
        unit_norm = norm(mean)
        if unit_norm > tol:
            mean = mean / unit_norm
    scale = float(norms.sum()) / n
    return scale * mean * to_unit


class Karcher(MergeMethod):
    config_cls = KarcherParams
    base = "optional"  # a named base is one more input
    min_models = 1

    @classmethod
    def needs_scan(cls, params: KarcherParams) -> bool:
        return True  # the norms span the whole tensor

    @staticmethod
    def _inputs(tensors: dict[str, torch.Tensor], base: torch.Tensor | None) -> list[torch.Tensor]:
        return [*tensors.values(), *([] if base is None else [base])]

    @classmethod
    def scan_block(cls, state: dict[str, Any], tensors: dict[str, torch.Tensor], base: torch.Tensor | None,
                   params: KarcherParams, info: TensorInfo) -> None:
        add_block(state, cls._inputs(tensors, base), "all")

    @classmethod
    def scan_result(cls, state: dict[str, Any], params: KarcherParams, info: TensorInfo) -> dict[str, Any]:
        return gram_scan_result(state)

    @classmethod
    def merge(cls, tensors: dict[str, torch.Tensor], base: torch.Tensor | None, params: KarcherParams,
              info: TensorInfo) -> torch.Tensor:
        """One row block (a whole tensor when called directly, without ``info.prepared``)."""
        inputs = cls._inputs(tensors, base)
        if len(inputs) == 1:
            return fp32(inputs[0])
        gram = block_gram(info.prepared, inputs, "all", inputs[0].dim())
        return combine(inputs, list(karcher_coefficients(gram, params.max_iter, params.tol)), "all")
