"""Linear DELLA (Deep et al., 2024, arXiv 2406.11617): DELLA's MagPrune sparsifier (magnitude-ranked keep
probabilities over [density - epsilon, density + epsilon], L1 rescaling; see ``della.py``) without the sign
election -- mergekit's ``della_linear``::

    theta = theta_0 + lambda * sum_t w_t tau~_t  (/ sum_t w_t if normalize; off by default)

Streams as DELLA does (one scan of each tensor before it is merged).
"""

from __future__ import annotations

from dataclasses import dataclass

from mllm.merge.methods.della import Della, DellaParams


@dataclass(frozen=True, kw_only=True)
class DellaLinearParams(DellaParams):
    normalize: bool = False


class DellaLinear(Della):
    config_cls = DellaLinearParams
    consensus = False
