"""WIDEN, weight disentanglement (Yu et al., arXiv 2408.03092; METHODS.md 9.6; official MergeLLM code).

For a 2-D weight W (out x in; token embeddings are transposed first so that each token is a column),
per expert t against the base (all in fp32):

1. column magnitudes m = ||W[:, j]||_2 (in-vector), directions D = W / m;
   dm_t = |m_t - m_0|,  dd_t = 1 - cos(D_t[:, j], D_0[:, j]).
2. within-model rank of dm_t (and dd_t): r = rank / in in {0, 1/in, ..., (in-1)/in}, ascending,
   ties in index order (stable sort).
3. scores S = softmax over experts of r; where r_t > ratio * mean_j(r_t), S_t = calibration value.
4. weight_t[j] = (S_mag + S_dir) / 2;  W = W_0 + sum_t weight_t[j] tau_t[:, j]  (not renormalised).

Other tensors (norms, biases): significance |theta_t - theta_0| elementwise, the same softmax and
calibration (mean over the tensor's elements), W = W_0 + sum_t S_t * tau_t. No global lambda.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from mllm.merge.methods.base import MergeMethod, TensorInfo, fp32


@dataclass(frozen=True, kw_only=True)
class WidenParams:
    above_average_value_ratio: float = 1.0  # calibration threshold, times the expert's mean significance
    score_calibration_value: float = 1.0  # score given to above-threshold entries
    embedding_pattern: str = r"embed_tokens\.weight$"  # regex of token-embedding tensors (transposed)

    def __post_init__(self) -> None:
        try:
            re.compile(self.embedding_pattern)
        except re.error as err:
            raise ValueError(f"embedding_pattern: invalid regex: {err}") from err


def within_model_rank(x: torch.Tensor) -> torch.Tensor:
    """Rows of ``x`` [T, n] -> normalised ascending ranks (stable): the smallest gets 0, the largest (n-1)/n."""
    n = x.shape[1]
    order = torch.argsort(x, dim=1, stable=True)
    ranks = torch.arange(n, dtype=torch.float32).div_(n).expand_as(order)
    return torch.zeros_like(ranks).scatter_(1, order, ranks)


def importance(significance: torch.Tensor, ratio: float, calibration: float) -> torch.Tensor:
    """Softmax over experts (dim 0), then calibration of above-average entries (mean over dim 1)."""
    scores = torch.softmax(significance, dim=0)
    above = significance > significance.mean(dim=1, keepdim=True) * ratio
    scores[above] = calibration
    return scores


class Widen(MergeMethod):
    name = "widen"
    config_cls = WidenParams
    elementwise = False  # column magnitudes span all rows

    @classmethod
    def merge(cls, tensors: dict[str, torch.Tensor], base: torch.Tensor | None, params: WidenParams,
              info: TensorInfo) -> torch.Tensor:
        assert base is not None
        transpose = re.search(params.embedding_pattern, info.name) is not None and base.dim() == 2
        w0 = fp32(base).t() if transpose else fp32(base)
        ws = [fp32(t).t() if transpose else fp32(t) for t in tensors.values()]
        taus = torch.stack([w - w0 for w in ws])
        ratio, calib = params.above_average_value_ratio, params.score_calibration_value
        if w0.dim() == 2:
            m0 = w0.norm(dim=0)
            # An all-zero column (e.g. a padding token's embedding) gets direction 0, not NaN.
            d0 = w0 / m0.clamp_min(1e-12)
            dm = torch.stack([(w.norm(dim=0) - m0).abs() for w in ws])
            dd = torch.stack([
                1.0 - torch.cosine_similarity(w / w.norm(dim=0).clamp_min(1e-12), d0, dim=0) for w in ws
            ])
            weight = 0.5 * (importance(within_model_rank(dm), ratio, calib)
                            + importance(within_model_rank(dd), ratio, calib))
            merged = w0 + (taus * weight.unsqueeze(1)).sum(0)
        else:
            flat = taus.reshape(len(ws), -1)
            scores = importance(flat.abs(), ratio, calib)
            merged = w0 + (flat * scores).sum(0).reshape(w0.shape)
        return merged.t() if transpose else merged
