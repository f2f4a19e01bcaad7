"""SCE: Select, Calculate, Erase (FuseChat: Wan et al., 2024, arXiv 2408.07990) -- mergekit's ``sce``.

Per tensor, with task vectors tau_t = theta_t - theta_0 (fp32) of the T models:

1. select (when 0 < select_topk < 1): keep, in every tau_t, the entries whose variance across the models
   var_i = (1/T) sum_t (tau_t[i] - mean_t tau_t[i])^2 is among the k = floor(select_topk * #{var_i != 0})
   largest (one mask for all models; k = 0 keeps nothing; select_topk <= 0 drops everything, >= 1 keeps all).
   Entries tied in variance with the k-th are all kept;
2. calculate: w_t = mean_i tau_t[i]^2 / sum_s mean_i tau_s[i]^2 over the whole (selected) tensor, or 1/T
   when that sum is below 1e-6;
3. erase: gamma = sign(sum_t tau_t) (0 counted as +), e_t = [sign(tau_t) = gamma] (TIES' election, on the
   unweighted task vectors, as mergekit does);
4. theta = theta_0 + sum_t w_t e_t tau_t / max(sum_t w_t e_t, 1e-6).

``int8_mask`` is accepted and changes nothing (masks are boolean here). There is no ``weight`` or
``lambda``: the weights are step 2's.

Streaming: the variance threshold (step 1) and the weights (step 2) are whole-tensor statistics across
all models. A scan of each tensor (when 0 < select_topk < 1) gathers the variances -- one fp32 copy of the
tensor -- for the k-th largest; the statistics pass (``collect``, before the merge pass) streams the
selected sums of squares per model. A tensor is read three times (twice without selection); memory beyond
the engine's blocks is that one copy during the scan.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from mllm.merge.methods.base import MergeMethod, TensorInfo, fp32
from mllm.merge.methods.task_arithmetic import elected_sign

WEIGHT_EPS = 1e-6  # mergekit: uniform weights below this sum of mean squares; floor of the divisor


@dataclass(frozen=True, kw_only=True)
class SceParams:
    select_topk: float = 1.0  # fraction of the nonzero-variance entries kept (step 1)
    int8_mask: bool = False  # accepted for mergekit YAML; masks are boolean here, so it changes nothing


def _selects(params: SceParams) -> bool:
    return 0.0 < params.select_topk < 1.0


def task_vectors(tensors: dict[str, torch.Tensor], base: torch.Tensor) -> torch.Tensor:
    """tau_t stacked [T, ...] in fp32."""
    base = fp32(base)
    out = torch.empty((len(tensors), *base.shape))
    for i, t in enumerate(tensors.values()):
        torch.sub(t, base, out=out[i])
    return out


def variance_threshold(var: torch.Tensor, select_topk: float) -> float:
    """The k-th largest variance, k = floor(select_topk * #nonzero) (inf when k = 0: nothing kept)."""
    k = int(int(torch.count_nonzero(var)) * select_topk)
    if k == 0:
        return float("inf")
    a = var.detach().reshape(-1).numpy().copy()
    a.partition(a.size - k)
    return float(a[a.size - k])


def select_(tvs: torch.Tensor, params: SceParams, threshold: float | None) -> torch.Tensor:
    """Step 1 in place on stacked task vectors (``threshold``: from the scan; None: ``tvs`` is whole)."""
    if params.select_topk >= 1.0:
        return tvs
    if params.select_topk <= 0.0:
        return tvs.zero_()
    var = tvs.var(dim=0, unbiased=False)
    return tvs.mul_(var >= (threshold if threshold is not None else variance_threshold(var, params.select_topk)))


def sce_weights(mean_squares: list[float]) -> list[float]:
    """Step 2 from each model's mean of tau_t^2."""
    total = sum(mean_squares)
    if abs(total) < WEIGHT_EPS:
        return [1.0 / len(mean_squares)] * len(mean_squares)
    return [m / total for m in mean_squares]


class Sce(MergeMethod):
    config_cls = SceParams

    @classmethod
    def needs_scan(cls, params: SceParams) -> bool:
        return _selects(params)

    @classmethod
    def scan_block(cls, state: dict[str, Any], tensors: dict[str, torch.Tensor], base: torch.Tensor | None,
                   params: SceParams, info: TensorInfo) -> None:
        assert base is not None
        state.setdefault("ids", list(tensors))
        state.setdefault("var", []).append(task_vectors(tensors, base).var(dim=0, unbiased=False).reshape(-1))

    @classmethod
    def scan_result(cls, state: dict[str, Any], params: SceParams, info: TensorInfo) -> dict[str, float]:
        threshold = variance_threshold(torch.cat(state.pop("var")), params.select_topk)
        return {mid: threshold for mid in state["ids"]}  # one threshold, shared by the models

    @classmethod
    def two_pass(cls, params: SceParams) -> bool:
        return True

    @classmethod
    def collect(cls, tensors: dict[str, torch.Tensor], base: torch.Tensor | None, params: SceParams,
                info: TensorInfo) -> Mapping[str, float]:
        """Each model's share of mean_i tau_t[i]^2 from this block, keyed "<tensor name>\\n<model id>"."""
        assert base is not None
        tvs = select_(task_vectors(tensors, base), params, _threshold(info, tensors))
        numel = max(1, int(torch.Size(info.shape).numel()))
        return {f"{info.name}\n{mid}": float(tv.square().sum(dtype=torch.float64)) / numel
                for mid, tv in zip(tensors, tvs, strict=True)}

    @classmethod
    def finalize(cls, sums: Mapping[int | str, Mapping[str, float]], params: SceParams,
                 num_layers: int) -> dict[str, Any]:
        """Per tensor name, the weights w_t per model id."""
        squares: dict[str, dict[str, float]] = {}
        for group in sums.values():
            for key, value in group.items():
                name, mid = key.split("\n", 1)
                squares.setdefault(name, {})[mid] = value
        return {name: dict(zip(ms, sce_weights(list(ms.values())), strict=True)) for name, ms in squares.items()}

    @classmethod
    def merge(cls, tensors: dict[str, torch.Tensor], base: torch.Tensor | None, params: SceParams,
              info: TensorInfo) -> torch.Tensor:
        assert base is not None
        tvs = select_(task_vectors(tensors, base), params, _threshold(info, tensors))
        weights = info.stats.get(info.name)  # absent: the block is the whole tensor
        if weights is None:
            weights = dict(zip(tensors, sce_weights([float(tv.square().mean()) for tv in tvs]), strict=True))
        sign = elected_sign(tvs)
        merged = torch.zeros(tvs.shape[1:])
        divisor = torch.zeros(tvs.shape[1:])
        for mid, tv in zip(tensors, tvs, strict=True):
            erased = (tv * sign > 0).to(torch.float32).mul_(weights[mid])
            merged.add_(tv.mul_(erased))
            divisor.add_(erased)
        return merged.div_(divisor.clamp_(min=WEIGHT_EPS)).add_(fp32(base))


def _threshold(info: TensorInfo, tensors: dict[str, torch.Tensor]) -> float | None:
    return info.prepared.get(next(iter(tensors))) if info.prepared else None
