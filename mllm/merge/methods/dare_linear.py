"""DARE + task arithmetic (Yu et al., ICML 2024, arXiv 2311.03099) as mergekit's ``dare_linear``: drop each
task-vector entry with probability p = 1 - density, rescale what is kept, add the weighted sum to the base::

    m_t[i] ~ Bernoulli(density),   theta = theta_0 + lambda * sum_t w_t s_t (m_t * tau_t)   (/ sum_t w_t if normalize)

``rescale: true`` (the default, as in mergekit) takes s_t = ||tau_t||_1 / ||m_t * tau_t||_1 over the whole
tensor (1 when either norm is below 1e-7): mergekit's L1 rule, which keeps each tensor's L1 norm exactly,
where the paper's eq. 2 divides every kept entry by 1 - p (s_t = 1 / density, the norm kept in
expectation); ``rescale: false``: s_t = 1. Masks are drawn from generators seeded per (tensor name, model
position), so a merge is reproducible and a scan of the tensor before merging redraws the same mask to
sum the two norms (see ``task_arithmetic.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

from mllm.merge.methods.task_arithmetic import TaskArithmetic, TaskArithmeticParams


@dataclass(frozen=True, kw_only=True)
class DareParams(TaskArithmeticParams):
    rescale: bool = True  # s_t = ||tau_t||_1 / ||m_t * tau_t||_1 (mergekit's L1 rule)


class DareLinear(TaskArithmetic):
    config_cls = DareParams
    sparsifier = "random"
    consensus = False
