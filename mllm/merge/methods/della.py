"""DELLA-Merging (Deep et al., 2024, arXiv 2406.11617): MagPrune drops task-vector entries at random with
probabilities ranked by magnitude (larger entries are kept more often), then TIES' sign election and
disjoint merge -- mergekit's ``della`` (``della_linear``: the same without the election).

Per tensor and model, with tau_t = theta_t - theta_0 and r_i in {0, ..., n - 1} the rank of |tau_t[i]|
among the n entries of its row (ascending; along dim 1 as mergekit ranks it; a 1-D tensor is one row;
ties ranked by position), the keep probability rises linearly with the rank over [density - epsilon,
density + epsilon]::

    p_i = density - epsilon + 2 epsilon r_i / (n - 1)          (density - epsilon for n = 1)
    m_i ~ Bernoulli(p_i),   tau~_t = m * tau_t * s_t

``rescale: true`` makes s_t = ||tau_t||_1 / ||m * tau_t||_1 (mergekit's L1 rescaling, 1 when either norm is
below 1e-7, over the whole tensor) -- not the paper's per-entry 1 / p_i; ``rescale: false``: s_t = 1. Then
d_t = w_t tau~_t, the elected sign gamma = sign(sum_t d_t) (0 counted as +) and::

    theta = theta_0 + lambda * sum_t [sign(d_t) = gamma] d_t  (/ sum_t [sign(d_t) = gamma] w_t if normalize)

``density: 1`` keeps tau_t whole and ``density: 0`` drops it; otherwise density +/- epsilon must lie in
(0, 1), as mergekit requires. Defaults follow mergekit: epsilon 0.15, normalize and rescale on (della).
``int8_mask`` is accepted and changes nothing (masks are boolean here).

Draws: m_i is u_i < p_i with u_i uniform from a generator seeded by (plan seed, tensor name, model
position, flat index i), as for DARE, so a tensor merged whole or in row blocks gets the same mask.

Streaming: each tensor is scanned once before it is merged (one more read of its blocks): the scan sums
||tau_t||_1 and ||m * tau_t||_1 per model for ``rescale``. Row blocks hold whole rows, so ranks need no
more; a 1-D tensor is ranked whole: its scan keeps |tau_t| and p of every entry per model (vectors).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from mllm.merge.methods.base import TensorInfo, fp32, per_model, tensor_seed
from mllm.merge.methods.task_arithmetic import (
    SparsifyFn,
    TaskArithmetic,
    TaskArithmeticParams,
    l1_scale,
    uniform,
)
from mllm.merge.tensors import MergeError


@dataclass(frozen=True, kw_only=True)
class DellaParams(TaskArithmeticParams):
    epsilon: dict[str, float] = per_model(0.15)  # half-width of the keep-probability range around density
    normalize: bool = True  # disjoint mean
    rescale: bool = True  # match the L1 norm of the kept entries to tau's (mergekit)

    def __post_init__(self) -> None:
        super().__post_init__()
        for mid in {*self.density, *self.epsilon}:
            d, e = self.density[mid], self.epsilon[mid]
            if 0.0 < d < 1.0 and not (0.0 < d - e and d + e < 1.0):
                raise MergeError(f"density +/- epsilon of {mid!r} must lie in (0, 1), got density {d}, epsilon {e}")


class Prepared(NamedTuple):
    """A model's scanned statistics: the L1 factor s_t, and p of every entry of a 1-D tensor (else None)."""

    scale: float
    probs: torch.Tensor | None


def keep_probs(tau: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """p of every entry of ``tau`` (whole rows; ranked along dim 1, a 1-D tensor as one row)."""
    x = tau.abs().reshape(1, -1) if tau.dim() < 2 else tau.abs().movedim(1, -1)
    n = x.shape[-1]
    rank = x.argsort(dim=-1, stable=True).argsort(dim=-1).to(torch.float32)
    p = (density - epsilon) + rank * (2 * epsilon / (n - 1) if n > 1 else 0.0)
    return (p.reshape(tau.shape) if tau.dim() < 2 else p.movedim(-1, 1)).contiguous()


def _mask(tau: torch.Tensor, probs: torch.Tensor, seed: int, offset: int) -> torch.Tensor:
    return uniform(seed, offset, tau.numel()).reshape(tau.shape) < probs


class Della(TaskArithmetic):
    """MagPrune + TIES consensus (mergekit ``della``)."""

    config_cls = DellaParams
    consensus = True

    @classmethod
    def needs_scan(cls, params: DellaParams) -> bool:
        return True

    @classmethod
    def scan_block(cls, state: dict[str, Any], tensors: dict[str, torch.Tensor], base: torch.Tensor | None,
                   params: DellaParams, info: TensorInfo) -> None:
        assert base is not None
        base = fp32(base)
        for i, (mid, t) in enumerate(tensors.items()):
            d = params.density[mid]
            if not 0.0 < d < 1.0:
                continue
            tau = fp32(t) - base
            acc = state.setdefault(mid, {"total": 0.0, "kept": 0.0, "chunks": [], "position": i})
            if len(info.shape) < 2:
                acc["chunks"].append(tau.reshape(-1))
            elif params.rescale:
                keep = _mask(tau, keep_probs(tau, d, params.epsilon[mid]), tensor_seed(info.seed, f"model{i}"),
                             info.offset(tau))
                a = tau.abs_()
                acc["total"] += float(a.sum(dtype=torch.float64))
                acc["kept"] += float(a.mul_(keep).sum(dtype=torch.float64))

    @classmethod
    def scan_result(cls, state: dict[str, Any], params: DellaParams, info: TensorInfo) -> dict[str, Prepared]:
        out = {}
        for mid, acc in state.items():
            probs = None
            if acc["chunks"]:  # a 1-D tensor: rank it whole
                tau = torch.cat(acc["chunks"])
                probs = keep_probs(tau, params.density[mid], params.epsilon[mid])
                keep = _mask(tau, probs, tensor_seed(info.seed, f"model{acc['position']}"), 0)
                a = tau.abs_()
                acc["total"], acc["kept"] = float(a.sum(dtype=torch.float64)), float(a.mul_(keep).sum(dtype=torch.float64))
            out[mid] = Prepared(l1_scale(acc["total"], acc["kept"]), probs)
        return out

    @classmethod
    def sparsifier_for(cls, params: DellaParams, info: TensorInfo, base: torch.Tensor) -> SparsifyFn:
        offset = info.offset(base)

        def sparsify(tau: torch.Tensor, model_id: str, position: int) -> torch.Tensor:
            d = params.density[model_id]
            if d >= 1.0:
                return tau
            if d <= 0.0:
                return tau.zero_()
            prepared = info.prepared.get(model_id)  # absent: the block is the whole tensor
            if prepared is not None and prepared.probs is not None:
                probs = prepared.probs[offset:offset + tau.numel()].reshape(tau.shape)
            else:
                probs = keep_probs(tau, d, params.epsilon[model_id])
            total = float(tau.abs().sum(dtype=torch.float64)) if prepared is None and params.rescale else 0.0
            tau.mul_(_mask(tau, probs, tensor_seed(info.seed, f"model{position}"), offset))
            if not params.rescale:
                return tau
            scale = prepared.scale if prepared is not None else l1_scale(total, float(tau.abs().sum(dtype=torch.float64)))
            return tau.mul_(scale)

        return sparsify
