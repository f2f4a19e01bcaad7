"""LiNeS, layer-increasing network scaling (Wang et al., ICLR 2025, arXiv 2410.17146).

The merged task vector tau_MTL (generalized task arithmetic, see task_arithmetic.py; plain weighted
sum by default, TIES/DARE variants via ``sparsifier`` / ``consensus``) is scaled per decoder block,
0-based l = 0..L-1:

    lambda(l) = alpha + beta * l / (L - 1),     theta = theta_0 + lambda_global * lambda(l) * tau_MTL

Tensors outside the decoder blocks (embeddings, final norm, heads) are scaled by alpha (as in the
official code). Single-task editing: alpha = gamma, beta = 1 - gamma. Multi-task merging of T task
vectors tau_t = theta_t - theta_0 (``alpha: auto``; beta is tuned, lambda_global stays 1):

    alpha = ||sum_t tau_t||_1 / ||tau_MTL||_1 * 1/T  =  ||mean_t tau_t||_1 / ||tau_MTL||_1

with both L1 norms over the whole model (every merged tensor) and tau_MTL taken before any scaling,
so the shallowest block gets the L1 norm of the average task vector. The engine's statistics pass
streams the two norms block by block (``collect`` / ``finalize``); ``report`` writes them, alpha and
lambda(l) into lines_alpha.json.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from mllm.merge.methods.base import TensorInfo, fp32, per_model, single_value
from mllm.merge.methods.task_arithmetic import Sparsifier, TaskArithmetic, TaskArithmeticParams, merged_delta

AUTO = "auto"
_SCHEDULE = "LiNeS' alpha and beta set the per-layer scale lambda(l) themselves"
ALPHA_JSON = "lines_alpha.json"


@dataclass(frozen=True, kw_only=True)
class LinesParams(TaskArithmeticParams):
    weight: dict[str, float] = per_model(1.0)
    # scale of the shallowest block and of everything outside the blocks; 'auto': the multi-task rule
    alpha: float | Literal["auto"] = single_value(_SCHEDULE)
    beta: float = single_value(_SCHEDULE)  # extra scale reached at the deepest block
    sparsifier: Sparsifier = "none"
    consensus: bool = False


def layer_scale(alpha: float, beta: float, layer: int | None, num_layers: int) -> float:
    """lambda(l) = alpha + beta l / (L - 1); alpha outside the decoder blocks (layer None)."""
    if layer is None:
        return alpha
    return alpha + beta * layer / max(num_layers - 1, 1)


def _l1(t: torch.Tensor) -> float:
    return float(t.abs().sum(dtype=torch.float64))  # fp64 accumulation: a model has ~1e9 entries


class Lines(TaskArithmetic):
    """Task arithmetic (its magnitude-threshold ``prepare`` included) with a per-block scale; the
    sparsifier and sign consensus are parameters here, not fixed by the class."""

    config_cls = LinesParams

    @classmethod
    def two_pass(cls, params: LinesParams) -> bool:  # type: ignore[override]
        return params.alpha == AUTO  # the two model-wide L1 norms come before any tensor is merged

    @classmethod
    def needs_prepare(cls, params: LinesParams) -> bool:  # type: ignore[override]
        return params.sparsifier == "magnitude"

    @staticmethod
    def scale(params: LinesParams, info: TensorInfo) -> float:
        """lambda(l) of this tensor, with alpha from the statistics pass when it is 'auto'."""
        alpha = info.stats["alpha"] if params.alpha == AUTO else params.alpha
        return layer_scale(alpha, params.beta, info.layer, info.num_layers)

    @classmethod
    def collect(cls, tensors: dict[str, torch.Tensor], base: torch.Tensor | None, params: LinesParams,
                info: TensorInfo) -> Mapping[str, float]:
        """This block's ||mean_t tau_t||_1 and ||tau_MTL||_1 (summed over the model by the engine)."""
        assert base is not None
        base = fp32(base)
        mean = sum(fp32(t) - base for t in tensors.values()) / len(tensors)
        merged = merged_delta(tensors, base, params, info, params.sparsifier, params.consensus)
        return {"l1_mean": _l1(mean), "l1_merged": _l1(merged)}

    @classmethod
    def finalize(cls, sums: Mapping[int | str, Mapping[str, float]], params: LinesParams,
                 num_layers: int) -> dict[str, Any]:
        l1_mean = sum(s["l1_mean"] for s in sums.values())
        l1_merged = sum(s["l1_merged"] for s in sums.values())
        # tau_MTL = 0 (e.g. consensus cancelled everything): the merge is theta_0 whatever alpha is
        alpha = l1_mean / l1_merged if l1_merged > 0 else 1.0
        return {"alpha": alpha, "l1_mean_task_vector": l1_mean, "l1_merged_task_vector": l1_merged,
                "num_layers": num_layers}

    @classmethod
    def merge(cls, tensors: dict[str, torch.Tensor], base: torch.Tensor | None, params: LinesParams,
              info: TensorInfo) -> torch.Tensor:
        assert base is not None
        base = fp32(base)
        tau = merged_delta(tensors, base, params, info, params.sparsifier, params.consensus)
        return tau.mul_(params.lambda_ * cls.scale(params, info)).add_(base)

    @classmethod
    def report(cls, stats: Mapping[str, Any], params: LinesParams, out_dir: Path) -> list[str]:
        """lines_alpha.json: the automatic alpha, the norms it came from and lambda(l) per block."""
        if "alpha" not in stats:  # alpha was a number: nothing computed
            return []
        layers = range(stats["num_layers"])
        doc = {
            "method": "lines", "equation": "alpha = ||sum_t tau_t||_1 / ||tau_MTL||_1 / T (Wang et al., ICLR 2025)",
            "alpha": stats["alpha"], "beta": params.beta, "lambda": params.lambda_,
            "l1_mean_task_vector": stats["l1_mean_task_vector"],
            "l1_merged_task_vector": stats["l1_merged_task_vector"],
            "layers": [{"layer": lyr, "scale": layer_scale(stats["alpha"], params.beta, lyr, len(layers))}
                       for lyr in layers],
        }
        (out_dir / ALPHA_JSON).write_text(json.dumps(doc, indent=2))
        return [ALPHA_JSON]
