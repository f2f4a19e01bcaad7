"""Inner products for the spherical merge methods (slerp, nuslerp, multislerp, karcher, model_stock).

These methods normalise vectors that may span the whole tensor, or a column running across every row.
Everything they need of such a vector is a set of inner products <v_i, v_j> between the inputs, which
are sums over the vector's entries: a scan adds them up over the row blocks (in float64), and the
result is a linear combination of the inputs with fixed coefficients, which each row block applies to
its own rows. Memory: one block plus k x k numbers per vector (k = the inputs taking part).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch

from mllm.merge.methods.base import fp32

Axis = Literal["all", 0, -1]  # the vector: the whole tensor, a column (along dim 0), a row (along dim -1)


def gram(vectors: Sequence[torch.Tensor], axis: Axis = "all") -> torch.Tensor:
    """float64 inner products G[i, j] = <v_i, v_j> of equally shaped tensors: [k, k] for ``"all"``,
    [k, k, *rest] for vectors along ``axis`` (``rest``: the tensor's shape without that axis)."""
    vs = [v.to(torch.float64) for v in vectors]
    if axis == "all" or vs[0].dim() == 0:
        flat = torch.stack([v.reshape(-1) for v in vs])
        return flat @ flat.T
    k = len(vs)
    out = torch.empty((k, k, *(s for d, s in enumerate(vs[0].shape) if d != axis % vs[0].dim())),
                      dtype=torch.float64)
    for i in range(k):
        for j in range(i, k):
            out[i, j] = (vs[i] * vs[j]).sum(axis)
            out[j, i] = out[i, j]
    return out


def vector_axis(ndim: int, axis: Axis) -> Axis:
    """The axis a vector runs along in a tensor of ``ndim`` dims: a 0-D or 1-D tensor is one vector."""
    return "all" if ndim <= 1 else axis


def spans_rows(ndim: int, axis: Axis) -> bool:
    """Whether such a vector spans several rows (dim 0), so that its inner products need a scan."""
    return vector_axis(ndim, axis) != -1


def add_block(state: dict[str, Any], vectors: Sequence[torch.Tensor], axis: Axis) -> None:
    """Scan step: add one row block's inner products into ``state["gram"]``."""
    g = gram(vectors, axis)
    state["gram"] = g if "gram" not in state else state["gram"].add_(g)


def gram_scan_result(state: dict[str, Any]) -> dict[str, Any]:
    """The scan's result handed to ``merge`` as ``info.prepared``: the accumulated inner products (none
    when no block spanned rows, e.g. a row-wise vector, whose products each block computes itself)."""
    return {"gram": state["gram"]} if "gram" in state else {}


def block_gram(prepared: Any, vectors: Sequence[torch.Tensor], axis: Axis, ndim: int) -> torch.Tensor:
    """The inner products a row block is merged with: the scan's sums when the vectors span rows (and a
    scan ran), else those of the block itself (a row-local vector, or a whole tensor merged directly)."""
    if spans_rows(ndim, axis) and "gram" in prepared:
        return prepared["gram"]
    return gram(vectors, vector_axis(ndim, axis))


def task_vectors(tensors: Mapping[str, torch.Tensor], base: torch.Tensor | None) -> list[torch.Tensor]:
    """theta_i - theta_0 in float32 for each model (theta_i itself without a base)."""
    if base is None:
        return [fp32(t) for t in tensors.values()]
    b = fp32(base)
    return [fp32(t) - b for t in tensors.values()]


def combine(vectors: Sequence[torch.Tensor], coefs: Sequence[torch.Tensor | float], axis: Axis) -> torch.Tensor:
    """sum_i c_i v_i in float32, with c_i a number or one value per vector along ``axis``."""
    out: torch.Tensor | None = None
    for v, c in zip(vectors, coefs, strict=True):
        if isinstance(c, torch.Tensor) and c.dim() > 0:
            c = c.to(torch.float32).unsqueeze(axis if axis != "all" else 0)
        elif isinstance(c, torch.Tensor):
            c = float(c)
        term = v.to(torch.float32) * c
        out = term if out is None else out.add_(term)
    assert out is not None
    return out
