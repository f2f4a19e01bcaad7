"""RAM+ (tensor-local): Reinforced Agent Merging Plus (Yuan et al., 2026, arXiv 2601.13572), as mergekit's
``ramplus_tl`` computes it (tensor-local: the counts below are taken per tensor). RAM (see ``ram.py``:
entries one model alone changes by more than epsilon take its value, shared ones the mean of the models
changing them), with the unique entries of model t scaled up by how much of what t changes it shares
with other models::

    rho_t    = S_t / max(U_t, epsilon)      S_t = #{i: a_t[i], c[i] > 1},  U_t = #{i: a_t[i], c[i] = 1}
    lambda_t = 1 + r * clip(rho_t, 0, alpha)
    theta[i] = theta_0[i] + sum_t a_t[i] tau_t[i] * ([c[i] = 1] lambda_t + [c[i] > 1] / c[i])

Defaults as in mergekit: r = 0.1, alpha = 0.2, epsilon = 1e-5.

Streaming: S_t and U_t are whole-tensor counts, taken by a scan of the tensor's row blocks before it is
merged (one more read of the tensor; memory: one block).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from mllm.merge.methods.base import TensorInfo, fp32
from mllm.merge.methods.ram import Ram, RamParams, contributions, merged_tv


@dataclass(frozen=True, kw_only=True)
class RamPlusParams(RamParams):
    r: float = 0.1  # gain on the shared/unique ratio
    alpha: float = 0.2  # upper clip of the ratio


def unique_scale(shared: float, unique: float, params: RamPlusParams) -> float:
    """lambda_t from a model's counts of shared and unique changed entries."""
    return 1.0 + params.r * min(max(shared / max(unique, params.epsilon), 0.0), params.alpha)


def _counts(c: Any) -> tuple[list[int], list[int]]:
    return ([int((a & c.shared).sum()) for a in c.changed], [int((a & c.unique).sum()) for a in c.changed])


class RamPlusTL(Ram):
    config_cls = RamPlusParams

    @classmethod
    def needs_scan(cls, params: RamPlusParams) -> bool:
        return True

    @classmethod
    def scan_block(cls, state: dict[str, Any], tensors: dict[str, torch.Tensor], base: torch.Tensor | None,
                   params: RamPlusParams, info: TensorInfo) -> None:
        assert base is not None
        shared, unique = _counts(contributions(tensors, base, params.epsilon))
        for mid, s, u in zip(tensors, shared, unique, strict=True):
            acc = state.setdefault(mid, [0, 0])
            acc[0] += s
            acc[1] += u

    @classmethod
    def scan_result(cls, state: dict[str, Any], params: RamPlusParams, info: TensorInfo) -> dict[str, float]:
        return {mid: unique_scale(s, u, params) for mid, (s, u) in state.items()}

    @classmethod
    def merge(cls, tensors: dict[str, torch.Tensor], base: torch.Tensor | None, params: RamPlusParams,
              info: TensorInfo) -> torch.Tensor:
        assert base is not None
        c = contributions(tensors, base, params.epsilon)
        if info.prepared:
            scale = [info.prepared[mid] for mid in tensors]
        else:  # the block is the whole tensor
            scale = [unique_scale(s, u, params) for s, u in zip(*_counts(c), strict=True)]
        return merged_tv(c, scale).add_(fp32(base))
