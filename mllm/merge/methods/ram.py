"""RAM: Reinforced Agent Merging (Yuan, Shi, Zhang, Liu, Yao, Vosoughi & Lee, 2026, "Behavior Knowledge
Merge in Reinforced Agentic Models", arXiv 2601.13572), as mergekit's ``ram`` computes it.

Entries a task vector changes by at most epsilon count as unchanged. Per entry i, with task vectors
tau_t = theta_t - theta_0 (fp32), a_t[i] = [|tau_t[i]| > epsilon] and c[i] = sum_t a_t[i] models that
change it: an entry one model alone changes takes that model's value whole, an entry several change
takes their mean (unchanged entries do not dilute it)::

    theta[i] = theta_0[i] + sum_t a_t[i] tau_t[i] * ([c[i] = 1] + [c[i] > 1] / c[i])

No ``weight``, ``lambda`` or normalisation: mergekit's ``ram`` takes only ``epsilon``. Entry-wise, so
it streams in the engine's row blocks with no statistics.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from mllm.merge.methods.base import MergeMethod, TensorInfo, fp32
from mllm.merge.methods.sce import task_vectors
from mllm.merge.tensors import MergeError


@dataclass(frozen=True, kw_only=True)
class RamParams:
    epsilon: float = 1e-5  # |tau| above this counts as a change

    def __post_init__(self) -> None:
        if self.epsilon < 0:
            raise MergeError(f"epsilon must be >= 0, got {self.epsilon}")


class Contributions(NamedTuple):
    """Stacked task vectors zeroed where unchanged, and the unique / shared entry masks."""

    tvs: torch.Tensor  # [T, ...] a_t * tau_t
    changed: torch.Tensor  # [T, ...] a_t
    unique: torch.Tensor  # [...] c = 1
    shared: torch.Tensor  # [...] c > 1
    count: torch.Tensor  # [...] c, at least 1


def contributions(tensors: dict[str, torch.Tensor], base: torch.Tensor, epsilon: float) -> Contributions:
    tvs = task_vectors(tensors, base)
    changed = tvs.abs() > epsilon
    count = changed.sum(dim=0)
    tvs.mul_(changed)
    return Contributions(tvs, changed, count == 1, count > 1, count.clamp(min=1))


def merged_tv(c: Contributions, unique_scale: list[float] | None = None) -> torch.Tensor:
    """sum_t a_t tau_t ([c = 1] s_t + [c > 1] / c); s_t = 1 (RAM) or RAM+'s lambda_t."""
    out = torch.zeros(c.tvs.shape[1:])
    for t, tv in enumerate(c.tvs):
        own = tv * c.unique
        out.add_(own if unique_scale is None else own.mul_(unique_scale[t])).add_(tv * c.shared / c.count)
    return out


class Ram(MergeMethod):
    config_cls = RamParams

    @classmethod
    def merge(cls, tensors: dict[str, torch.Tensor], base: torch.Tensor | None, params: RamParams,
              info: TensorInfo) -> torch.Tensor:
        assert base is not None
        return merged_tv(contributions(tensors, base, params.epsilon)).add_(fp32(base))
