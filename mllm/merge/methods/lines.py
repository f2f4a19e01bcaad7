"""LiNeS, layer-increasing network scaling (Wang et al., ICLR 2025; METHODS.md 9.4).

The merged task vector tau_m (generalized task arithmetic, see task_arithmetic.py; plain weighted sum
by default, TIES/DARE variants via ``sparsifier`` / ``consensus``) is scaled per decoder block,
0-based l = 0..L-1:

    lambda(l) = alpha + beta * l / (L - 1),     theta = theta_0 + lambda_global * lambda(l) * tau_m

Tensors outside the decoder blocks (embeddings, final norm, heads) are scaled by alpha (as in the
official code). Single-task editing: alpha = gamma, beta = 1 - gamma. Multi-task: the paper sets
alpha = (||sum_t tau_t||_1 / ||tau_MTL||_1) / T and tunes beta; give that alpha here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mllm.merge.methods.base import TensorInfo, fp32, per_model
from mllm.merge.methods.task_arithmetic import Sparsifier, TaskArithmetic, TaskArithmeticParams, merged_delta


@dataclass(frozen=True, kw_only=True)
class LinesParams(TaskArithmeticParams):
    weight: dict[str, float] = per_model(1.0)
    alpha: float  # scale of the shallowest block and of everything outside the blocks
    beta: float  # extra scale reached at the deepest block
    sparsifier: Sparsifier = "none"
    consensus: bool = False


class Lines(TaskArithmetic):
    """Task arithmetic (its magnitude-threshold ``prepare`` included) with a per-block scale; the
    sparsifier and sign consensus are parameters here, not fixed by the class."""

    name = "lines"
    config_cls = LinesParams

    @staticmethod
    def scale(params: LinesParams, info: TensorInfo) -> float:
        """lambda(l); alpha outside the decoder blocks."""
        if info.layer is None:
            return params.alpha
        return params.alpha + params.beta * info.layer / max(info.num_layers - 1, 1)

    @classmethod
    def needs_prepare(cls, params: LinesParams) -> bool:  # type: ignore[override]
        return params.sparsifier == "magnitude"

    @classmethod
    def merge(cls, tensors: dict[str, torch.Tensor], base: torch.Tensor | None, params: LinesParams,
              info: TensorInfo) -> torch.Tensor:
        assert base is not None
        base = fp32(base)
        tau = merged_delta(tensors, base, params, info, params.sparsifier, params.consensus)
        return tau.mul_(params.lambda_ * cls.scale(params, info)).add_(base)
