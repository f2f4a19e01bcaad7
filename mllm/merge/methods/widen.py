"""WIDEN, weight disentanglement (Yu et al., 2024, arXiv 2408.03092; official MergeLLM code).

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

Streaming: everything a column needs is a sum over its entries -- ||W_0[:, j]||^2, ||W_t[:, j]||^2
and the dot product W_t[:, j] . W_0[:, j], from which m_t = sqrt(.) and cos = dot / (m_t m_0) (0 for
a zero column, whose direction is 0) -- so the engine's scan accumulates them (in fp64) over row
blocks and ``scan_result`` turns them into the per-column weights; each row block is then merged
with them. A transposed embedding's columns are stored rows, each complete within one block. For the
other tensors the scan sums |tau_t| per expert for the mean. Memory: one block plus 2T + 1 numbers per
column, instead of several fp32 copies of the whole tensor.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any

import torch

from mllm.merge.methods.base import MergeMethod, TensorInfo, fp32, single_value
from mllm.merge.tensors import MergeError


@dataclass(frozen=True, kw_only=True)
class WidenParams:
    above_average_value_ratio: float = 1.0  # calibration threshold, times the expert's mean significance
    score_calibration_value: float = 1.0  # score given to above-threshold entries
    embedding_pattern: str = single_value("a regex of tensor names", r"embed_tokens\.weight$")  # regex of token-embedding tensors (transposed)

    def __post_init__(self) -> None:
        try:
            re.compile(self.embedding_pattern)
        except re.error as err:
            raise MergeError(f"embedding_pattern: invalid regex: {err}") from err


def within_model_rank(x: torch.Tensor) -> torch.Tensor:
    """Rows of ``x`` [T, n] -> normalised ascending ranks (stable): the smallest gets 0, the largest (n-1)/n."""
    n = x.shape[1]
    order = torch.argsort(x, dim=1, stable=True)
    ranks = torch.arange(n, dtype=torch.float32).div_(n).expand_as(order)
    return torch.zeros_like(ranks).scatter_(1, order, ranks)


def importance(significance: torch.Tensor, threshold: torch.Tensor, calibration: float) -> torch.Tensor:
    """Softmax over experts (dim 0), then ``calibration`` where significance > threshold (step 3)."""
    scores = torch.softmax(significance, dim=0)
    scores[significance > threshold] = calibration
    return scores


def rank_scores(x: torch.Tensor, ratio: float, calibration: float) -> torch.Tensor:
    """Steps 2-3 for one significance [T, n]: ranks, softmax, calibration above ratio x mean rank."""
    ranks = within_model_rank(x)
    return importance(ranks, ranks.mean(dim=1, keepdim=True) * ratio, calibration)


def column_weights(sq0: torch.Tensor, sq: torch.Tensor, dot: torch.Tensor, ratio: float,
                   calibration: float) -> torch.Tensor:
    """weight_t[j] of step 4 [T, n] from the column sums ||W_0||^2 [n], ||W_t||^2 and W_t . W_0 [T, n]."""
    m0, m = sq0.sqrt(), sq.sqrt()
    norms = m * m0
    cos = torch.where(norms > 0, dot / norms, 0.0)  # a zero column has direction 0: cos = 0 (dot/0 not taken)
    return 0.5 * (rank_scores((m - m0).abs(), ratio, calibration) + rank_scores(1.0 - cos, ratio, calibration))


def _accumulate(state: dict[str, Any], parts: dict[str, torch.Tensor], size: int, at: slice) -> None:
    """Add ``parts`` (last axis: the block's entries of a length-``size`` statistic) into ``state``."""
    for key, value in parts.items():
        if key not in state:
            state[key] = torch.zeros((*value.shape[:-1], size), dtype=torch.float64)
        state[key][..., at] += value


class Widen(MergeMethod):
    config_cls = WidenParams

    @classmethod
    def needs_scan(cls, params: WidenParams) -> bool:
        return True  # column norms and the elementwise mean span all rows

    @staticmethod
    def transposed(params: WidenParams, info: TensorInfo) -> bool:
        """A token embedding: its columns (tokens) are the stored tensor's rows."""
        return len(info.shape) == 2 and re.search(params.embedding_pattern, info.name) is not None

    @classmethod
    def scan_block(cls, state: dict[str, Any], tensors: dict[str, torch.Tensor], base: torch.Tensor | None,
                   params: WidenParams, info: TensorInfo) -> None:
        assert base is not None
        w0 = base.to(torch.float64)
        ws = [t.to(torch.float64) for t in tensors.values()]
        state["models"] = list(tensors)
        if len(info.shape) != 2:  # |tau_t| summed over the block, for the per-expert mean
            state["abs_sum"] = state.get("abs_sum", 0.0) + torch.stack([(w - w0).abs().sum() for w in ws])
            return
        transposed = cls.transposed(params, info)
        axis = 1 if transposed else 0  # the axis a column runs along
        parts = {"sq0": (w0 * w0).sum(axis), "sq": torch.stack([(w * w).sum(axis) for w in ws]),
                 "dot": torch.stack([(w * w0).sum(axis) for w in ws])}
        # a transposed tensor's block holds whole columns, rows row_start.. of the stored tensor
        at = slice(info.row_start, info.row_start + w0.shape[0]) if transposed else slice(None)
        _accumulate(state, parts, info.shape[0] if transposed else info.shape[1], at)

    @classmethod
    def scan_result(cls, state: dict[str, Any], params: WidenParams, info: TensorInfo) -> dict[str, Any]:
        """Per model: the column weights (matrices) or the calibration threshold ratio x mean |tau_t|."""
        ratio, calib = params.above_average_value_ratio, params.score_calibration_value
        if "sq0" in state:
            weights = column_weights(state["sq0"], state["sq"], state["dot"], ratio, calib)
            return dict(zip(state["models"], weights, strict=True))
        means = state["abs_sum"] / math.prod(info.shape)
        return {m: float(mean) * ratio for m, mean in zip(state["models"], means, strict=True)}

    @classmethod
    def merge(cls, tensors: dict[str, torch.Tensor], base: torch.Tensor | None, params: WidenParams,
              info: TensorInfo) -> torch.Tensor:
        """W_0 + sum_t S_t tau_t over one row block, with S_t from ``info.prepared`` (the scan); called
        on a whole tensor without it (direct use), the tensor is scanned as a single block first."""
        assert base is not None
        if not info.prepared:
            whole = dataclasses.replace(info, shape=tuple(base.shape), row_start=0)
            state: dict[str, Any] = {}
            cls.scan_block(state, tensors, base, params, whole)
            info = dataclasses.replace(whole, prepared=cls.scan_result(state, params, whole))
        w0 = fp32(base)
        taus = [fp32(t) - w0 for t in tensors.values()]
        scores = cls._scores([info.prepared[m] for m in tensors], taus, params, info)
        mixed = sum(s * tau for s, tau in zip(scores, taus, strict=True))
        assert isinstance(mixed, torch.Tensor)
        return w0 + mixed

    @classmethod
    def _scores(cls, prepared: list[Any], taus: list[torch.Tensor], params: WidenParams,
                info: TensorInfo) -> list[torch.Tensor]:
        """S_t for this block, broadcastable against tau_t, from each model's ``scan_result`` value."""
        if len(info.shape) != 2:
            significance = torch.stack([tau.abs() for tau in taus])
            threshold = torch.tensor(prepared).reshape(-1, *([1] * taus[0].dim()))
            return list(importance(significance, threshold, params.score_calibration_value))
        if cls.transposed(params, info):  # weights per stored row
            rows = slice(info.row_start, info.row_start + taus[0].shape[0])
            return [w[rows].unsqueeze(1) for w in prepared]
        return prepared
