"""DARE + TIES sign consensus (Yu et al., ICML 2024, arXiv 2311.03099) as mergekit's ``dare_ties``: the
random drop-and-rescale sparsifier of ``dare_linear.py`` (with mergekit's whole-tensor L1 rescaling, not the
paper's per-entry 1 / (1 - p)), then TIES' elected sign and disjoint sum (normalize off by default, as in
mergekit).
"""

from __future__ import annotations

from mllm.merge.methods.dare_linear import DareParams
from mllm.merge.methods.task_arithmetic import TaskArithmetic


class DareTies(TaskArithmetic):
    config_cls = DareParams
    sparsifier = "random"
    consensus = True
