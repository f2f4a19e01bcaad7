"""The next-token cross-entropy of a batch, read only where it is supervised, reduced to one number.

``l_{i,t} = -log p(y_{i,t+1} | y_{i,<=t})`` is the shifted cross-entropy of row ``i`` at position
``t``, over the positions whose next label is not ``IGNORE_INDEX``; ``T_i`` counts them.

``token`` (LLaVA, Hugging Face's default): the mean over every supervised token of the batch,
``L = sum_{i,t} l_{i,t} / sum_i T_i``, so a sample weighs in proportion to its answer length.
``sample``: the mean of the per-sample means, ``L = (1/N) sum_i (1/T_i) sum_t l_{i,t}``, over the N
samples with at least one supervised token, so every conversation weighs the same; with mixed
answer lengths (a 10-token box beside a one-word VQA answer) the long answers otherwise dominate
the gradient.

Only the supervised positions need logits: :func:`supervised_positions` lists them (over the whole
batch) for the LLM's ``logits_to_keep``, which skips the vocabulary projection and the softmax at
every prompt and image position.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSS_REDUCTIONS = ("token", "sample")


def supervised_positions(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Sorted positions ``t`` (1D) whose logits predict a label, ``labels[i, t + 1] != ignore_index``, in any row."""
    return (labels[:, 1:] != ignore_index).any(dim=0).nonzero().flatten()


def causal_lm_loss(
    logits: torch.Tensor, labels: torch.Tensor, reduction: str = "token",
    positions: torch.Tensor | None = None, ignore_index: int = -100,
) -> torch.Tensor:
    """``L`` above for ``labels [B, L]`` (unshifted) and ``logits [B, L, V]``, or ``[B, K, V]`` taken at
    ``positions [K]`` (:func:`supervised_positions`)."""
    if reduction not in LOSS_REDUCTIONS:
        raise ValueError(f"reduction: expected one of {list(LOSS_REDUCTIONS)}, got {reduction!r}")
    if positions is None:
        logits, targets = logits[:, :-1], labels[:, 1:]
    else:
        targets = labels[:, positions + 1]
    counts = (targets != ignore_index).sum(dim=1)
    if not bool((counts > 0).any()):
        raise ValueError("labels: no supervised token in this batch (every label is ignore_index)")
    per_token = F.cross_entropy(logits.float().transpose(1, 2), targets, ignore_index=ignore_index, reduction="none")
    if reduction == "token":
        return per_token.sum() / counts.sum()
    rows = counts > 0
    return (per_token.sum(dim=1)[rows] / counts[rows]).mean()
