"""Model Breadcrumbs (Davari & Belilovsky, 2023, arXiv 2312.06795): task arithmetic on task vectors with
both tails of the magnitude distribution cut away -- the small entries (noise) and the largest outliers.

Per tensor and model, with n entries of tau_t = theta_t - theta_0 sorted by |tau_t| ascending, k =
floor(density * n) entries kept, g = floor(gamma * n) outliers dropped and b = max(0, n - k - g) small
entries dropped (so the outlier cut shrinks when it would leave fewer than k entries)::

    m_t[i] = 1  iff  |tau_t|_(b) <= |tau_t[i]| <= |tau_t|_(b + k - 1)       (order statistics, 0-based)
    theta  = theta_0 + lambda * sum_t w_t (m_t * tau_t) * s_t

with ``rescale: true`` s_t = ||tau_t||_1 / ||m_t * tau_t||_1 (mergekit's L1 rescaling, 1 when either
norm is below 1e-7), else 1; ``density: 1`` keeps tau_t whole (no outlier cut), as in mergekit's
``magnitude_outliers``. Entries tied in magnitude with a band edge are all kept (where mergekit's sort
keeps an arbitrary subset), the tie rule of our TIES. The paper's whole-model percentiles are taken per
tensor here, as mergekit does, so the same YAML gives mergekit's numbers.

Streaming: the band edges (and the L1 ratio) are whole-tensor statistics, taken in ``prepare`` on one
model's tensor at a time: besides the engine's blocks, one fp32 copy of the tensor and the base as stored
(as for TIES). A tensor that fits one row block is merged whole and needs no ``prepare``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from mllm.merge.methods.base import TensorInfo, per_model
from mllm.merge.methods.task_arithmetic import SparsifyFn, TaskArithmetic, TaskArithmeticParams, l1_scale
from mllm.merge.tensors import MergeError


@dataclass(frozen=True, kw_only=True)
class BreadcrumbsParams(TaskArithmeticParams):
    gamma: dict[str, float] = per_model(0.01)  # fraction of the largest |tau| dropped as outliers
    rescale: bool = False  # match the L1 norm of the kept entries to tau's (mergekit)

    def __post_init__(self) -> None:
        super().__post_init__()
        for mid, g in self.gamma.items():
            if not 0.0 <= g <= 1.0:
                raise MergeError(f"gamma of {mid!r} must be in [0, 1], got {g}")


class Band(NamedTuple):
    """Kept magnitudes lo <= |tau| <= hi, and the L1 rescaling factor."""

    lo: float
    hi: float
    scale: float


def outlier_band(tau: torch.Tensor, density: float, gamma: float) -> Band:
    """The magnitude band Breadcrumbs keeps of the whole tensor ``tau`` (for 0 < density < 1)."""
    a = tau.detach().to(torch.float32).abs().reshape(-1).numpy()
    n = a.size
    k, g = int(density * n), int(gamma * n)
    if k == 0:
        return Band(float("inf"), float("-inf"), 1.0)
    b = max(0, n - k - g)
    part = np.partition(a, (b, b + k - 1))
    lo, hi = float(part[b]), float(part[b + k - 1])
    kept = a[(a >= lo) & (a <= hi)]
    return Band(lo, hi, l1_scale(float(a.sum(dtype=np.float64)), float(kept.sum(dtype=np.float64))))


class Breadcrumbs(TaskArithmetic):
    """theta_0 + lambda * sum_t w_t * (tau_t with both magnitude tails cut) (mergekit ``breadcrumbs``)."""

    config_cls = BreadcrumbsParams
    consensus = False

    @classmethod
    def needs_prepare(cls, params: BreadcrumbsParams) -> bool:
        return True

    @classmethod
    def prepare(cls, tensor: torch.Tensor, base: torch.Tensor | None, params: BreadcrumbsParams,
                info: TensorInfo, model_id: str) -> Band:
        assert base is not None
        flat, flat_base, step = tensor.reshape(-1), base.reshape(-1), 1 << 20
        for i in range(0, flat.numel(), step):  # tau in place, by slices (no whole fp32 copy of a bf16 base)
            flat[i:i + step].sub_(flat_base[i:i + step])
        return outlier_band(tensor, params.density[model_id], params.gamma[model_id])

    @classmethod
    def sparsifier_for(cls, params: BreadcrumbsParams, info: TensorInfo, base: torch.Tensor) -> SparsifyFn:
        def sparsify(tau: torch.Tensor, model_id: str, position: int) -> torch.Tensor:
            density = params.density[model_id]
            if density >= 1.0:
                return tau
            band = info.prepared.get(model_id)  # absent: the block is the whole tensor
            if band is None:
                band = outlier_band(tau, density, params.gamma[model_id])
            a = tau.abs()
            tau.mul_((a >= band.lo) & (a <= band.hi))
            return tau.mul_(band.scale) if params.rescale else tau

        return sparsify
