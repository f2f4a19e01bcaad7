"""TIES-Merging (Yadav et al., NeurIPS 2023, arXiv 2306.01708): trim (magnitude top-k per tensor),
elect sign, disjoint mean -- generalized task arithmetic with ``magnitude`` + consensus, normalize on.
"""

from __future__ import annotations

from dataclasses import dataclass

from mllm.merge.methods.task_arithmetic import TaskArithmetic, TaskArithmeticParams


@dataclass(frozen=True, kw_only=True)
class TiesParams(TaskArithmeticParams):
    normalize: bool = True  # disjoint *mean*


class Ties(TaskArithmetic):
    config_cls = TiesParams
    sparsifier = "magnitude"
    consensus = True
