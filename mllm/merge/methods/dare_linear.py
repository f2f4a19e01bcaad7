"""DARE + task arithmetic (Yu et al., ICML 2024, arXiv 2311.03099): drop each task-vector entry with
probability p = 1 - density, rescale the rest by 1/(1 - p), add the weighted sum to the base.
Masks are drawn from a generator seeded per tensor name, so a merge is reproducible.
"""

from __future__ import annotations

from dataclasses import dataclass

from mllm.merge.methods.task_arithmetic import TaskArithmetic, TaskArithmeticParams


@dataclass(frozen=True, kw_only=True)
class DareParams(TaskArithmeticParams):
    rescale: bool = True  # DARE's 1/(1 - p)


class DareLinear(TaskArithmetic):
    config_cls = DareParams
    sparsifier = "random"
    consensus = False
