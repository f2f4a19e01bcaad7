"""How the next-token cross-entropy of a batch is reduced to one number.

``token`` (LLaVA, Hugging Face's default): the mean over every supervised token of the batch,
``L = sum_{i,t} l_{i,t} / sum_i T_i``, so a sample weighs in proportion to its answer length.
``sample``: the mean of the per-sample means, ``L = (1/N) sum_i (1/T_i) sum_t l_{i,t}``, over the N
samples with at least one supervised token, so every conversation weighs the same; with mixed
answer lengths (a 10-token box beside a one-word VQA answer) the long answers otherwise dominate
the gradient. ``l_{i,t} = -log p(y_{i,t+1} | y_{i,<=t})`` is the shifted cross-entropy, and
``T_i`` the number of labels of row ``i`` that are not ``IGNORE_INDEX``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSS_REDUCTIONS = ("token", "sample")


def sample_mean_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """``(1/N) sum_i (1/T_i) sum_t l_{i,t}`` for ``logits [B, L, V]`` and ``labels [B, L]`` (unshifted)."""
    targets = labels[:, 1:]
    per_token = F.cross_entropy(
        logits[:, :-1].float().transpose(1, 2), targets, ignore_index=ignore_index, reduction="none"
    )
    counts = (targets != ignore_index).sum(dim=1)
    rows = counts > 0
    if not bool(rows.any()):
        raise ValueError("labels: no supervised token in this batch (every label is ignore_index)")
    return (per_token.sum(dim=1)[rows] / counts[rows]).mean()
