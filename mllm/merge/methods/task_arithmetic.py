"""Generalized task arithmetic: task arithmetic, TIES and DARE as one implementation (METHODS.md 9.1-9.3).

For base theta_0 and models t with task vectors tau_t = theta_t - theta_0 (fp32), weights w_t:

1. sparsify (per tensor, per model): ``none``; ``magnitude`` (TIES trim: keep the
   k = max(1, floor(density * n)) largest |tau_t| entries of this tensor, MergeLLM/mergekit
   granularity, not the TIES paper's whole-model threshold); ``random`` (DARE: keep each entry with
   probability density, seeded per tensor name). ``rescale: true`` divides the kept entries by the
   density -- DARE's tau (1 - m) / (1 - p) with p = 1 - density (mergekit instead matches L1 norms).
2. d_t = w_t * sparsified tau_t.
3. sign consensus (TIES elect + disjoint merge, when ``consensus``): gamma = sign(sum_t d_t) with 0
   counted as +; keep d_t only where sign(d_t) = gamma; divisor = sum_t w_t over kept entries.
   Without consensus the divisor is sum_t w_t.
4. tau_m = sum_t d_t (/ divisor if ``normalize``);  theta = theta_0 + lambda * tau_m.

Task arithmetic (Ilharco et al., ICLR 2023) = no sparsifier, no consensus; TIES (Yadav et al.,
NeurIPS 2023) = magnitude + consensus + normalize; DARE (Yu et al., ICML 2024) = random + rescale,
with (dare_ties) or without (dare_linear) consensus. This follows mergekit's
generalized_task_arithmetic, so the same YAML gives the same numbers (tested for TA and TIES).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from mllm.merge.methods.base import MergeMethod, TensorInfo, fp32, per_model, yaml_key

Sparsifier = Literal["none", "magnitude", "random"]


@dataclass(frozen=True, kw_only=True)
class TaskArithmeticParams:
    weight: dict[str, float] = per_model()  # w_t, per model (required)
    density: dict[str, float] = per_model(1.0)  # kept fraction of tau_t for the sparsifier
    normalize: bool = False  # divide by the (kept) sum of weights
    lambda_: float = yaml_key("lambda", 1.0)  # global scale of the merged task vector
    rescale: bool = False  # divide kept entries by density (DARE)
    int8_mask: bool = False  # accepted for mergekit YAML; masks are boolean here, so it changes nothing

    def __post_init__(self) -> None:
        for mid, d in self.density.items():
            if not 0.0 <= d <= 1.0:
                raise ValueError(f"density of {mid!r} must be in [0, 1], got {d}")


def sparsify(tau: torch.Tensor, density: float, method: Sparsifier, rescale: bool,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """Keep a ``density`` fraction of ``tau`` (magnitude top-k or Bernoulli), optionally rescaled."""
    if method == "none" or density >= 1.0:
        return tau
    if density <= 0.0 or tau.numel() == 0:
        return torch.zeros_like(tau)
    if method == "magnitude":
        k = max(1, int(density * tau.numel()))
        keep = torch.zeros(tau.numel(), dtype=torch.bool)
        keep[torch.topk(tau.abs().reshape(-1), k, sorted=False).indices] = True
        keep = keep.reshape(tau.shape)
    else:
        keep = torch.rand(tau.shape, generator=generator) < density
    out = tau * keep
    return out / density if rescale else out


def merged_delta(tensors: dict[str, torch.Tensor], base: torch.Tensor, params: TaskArithmeticParams,
                 info: TensorInfo, sparsifier: Sparsifier, consensus: bool) -> torch.Tensor:
    """tau_m of steps 1-4 (before lambda), fp32. Peak: n_models + 2 copies of the tensor in fp32."""
    base32 = fp32(base)
    gen = torch.Generator().manual_seed(info.seed) if sparsifier == "random" else None
    weights = [params.weight[m] for m in tensors]
    stacked = torch.empty((len(tensors), *base.shape)) if consensus else None
    mixed: torch.Tensor | None = None
    for i, (mid, t) in enumerate(tensors.items()):
        tau = sparsify(fp32(t) - base32, params.density[mid], sparsifier, params.rescale, gen)
        tau.mul_(weights[i])
        if stacked is not None:
            stacked[i] = tau
        else:
            mixed = tau if mixed is None else mixed.add_(tau)
        del tau
    if stacked is not None:
        gamma = torch.where(stacked.sum(0) >= 0, 1.0, -1.0)
        keep = stacked.sign() == gamma
        mixed = stacked.mul_(keep).sum(0)
        divisor = sum(w * k for w, k in zip(weights, keep.unbind(0), strict=True))
        divisor[divisor == 0] = 1.0
    else:
        total = sum(weights)
        divisor = torch.tensor(1.0 if abs(total) < 1e-8 else total)
    assert mixed is not None
    return mixed / divisor if params.normalize else mixed


class TaskArithmetic(MergeMethod):
    """theta_0 + lambda * sum_t w_t tau_t (mergekit ``task_arithmetic``)."""

    name = "task_arithmetic"
    config_cls = TaskArithmeticParams
    sparsifier: ClassVar[Sparsifier] = "none"
    consensus: ClassVar[bool] = False

    @classmethod
    def merge(cls, tensors: dict[str, torch.Tensor], base: torch.Tensor | None,
              params: TaskArithmeticParams, info: TensorInfo) -> torch.Tensor:
        assert base is not None
        tau = merged_delta(tensors, base, params, info, cls.sparsifier, cls.consensus)
        return fp32(base) + params.lambda_ * tau
