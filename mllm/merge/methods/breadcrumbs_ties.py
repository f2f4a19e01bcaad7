"""Model Breadcrumbs with TIES sign consensus (Davari & Belilovsky, 2023, arXiv 2312.06795; TIES: Yadav et
al., NeurIPS 2023, arXiv 2306.01708): the Breadcrumbs mask (both magnitude tails of each tau_t cut, see
``breadcrumbs.py``), then d_t = w_t * m_t * tau_t, the elected sign gamma = sign(sum_t d_t) (0 counted as +)
and the disjoint sum over the d_t that agree with it::

    theta = theta_0 + lambda * sum_t [sign(d_t) = gamma] d_t  (/ sum_t [sign(d_t) = gamma] w_t if normalize)

``normalize`` is off by default, as in mergekit's ``breadcrumbs_ties``. Streams as Breadcrumbs does
(``prepare``: one fp32 copy of one model's tensor at a time).
"""

from __future__ import annotations

from mllm.merge.methods.breadcrumbs import Breadcrumbs, BreadcrumbsParams


class BreadcrumbsTies(Breadcrumbs):
    config_cls = BreadcrumbsParams
    consensus = True
