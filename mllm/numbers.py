"""Number-token embeddings that start ordered: a sinusoidal encoding of each number's value.

With ``tokenizer_numbers: whole`` a box ``[x1, y1, x2, y2]`` is four number tokens. Randomly
initialised, the rows of ``317`` and ``318`` are unrelated, so a from-scratch model must learn the
order of the coordinates token by token. ``model.number_init: sincos`` instead starts the row of every
token spelling an integer ``n`` (``"318"`` or ``"▁318"``) at sinusoids of its value, as the
Transformer's position encoding (Vaswani et al., 2017, §3.5) does for positions, with periods ``T_k``
geometric from 2 to 2000 (twice the 0-1000 coordinate range, so the slowest one is still monotone),
scaled to the initializer's std ``σ``:

    E[n] = σ·√2·[sin(2πn/T_0), cos(2πn/T_0), ..., sin(2πn/T_{m-1}), cos(2πn/T_{m-1})],
    T_k = 2·1000^(k/(m-1)),  m = ⌊d/2⌋

(``√2`` makes each element's RMS ``σ``), plus a tenth of the random row so the two spellings of one
number do not start tied. Nearby numbers get nearby rows, and with tied input/output embeddings nearby
coordinates also get nearby logits. Value-based number embeddings follow FoNE (Zhou et al., 2025,
"FoNE: Precise Single-Token Number Embeddings via Fourier Features"), which uses periods 10^i and a
learned map instead of this fixed geometric ladder.
"""

from __future__ import annotations

import math
from typing import Any

import torch

NUMBER_INITS = ("random", "sincos")
SPACE = "▁"


def number_token_values(tokenizer: Any) -> dict[int, int]:
    """Token id -> value for every vocabulary piece that spells a non-negative integer, with or without the word prefix."""
    values = {}
    for piece, token_id in tokenizer.get_vocab().items():
        digits = piece.removeprefix(SPACE)
        if digits.isascii() and digits.isdigit():
            values[token_id] = int(digits)
    return values


def sincos_rows(values: torch.Tensor, dim: int, std: float) -> torch.Tensor:
    """``E[n]`` above for integer ``values [N]``: ``[N, dim]`` (an odd last column is zero)."""
    m = dim // 2
    periods = 2.0 * torch.pow(1000.0, torch.arange(m, dtype=torch.float64) / max(m - 1, 1))
    angles = 2 * math.pi * values.double()[:, None] / periods[None]
    rows = torch.zeros(len(values), dim, dtype=torch.float64)
    rows[:, 0 : 2 * m : 2], rows[:, 1 : 2 * m : 2] = angles.sin(), angles.cos()
    return (rows * std * math.sqrt(2)).float()


@torch.no_grad()
def init_number_embeddings(embedding: torch.nn.Embedding, tokenizer: Any, std: float) -> int:
    """Overwrite the number rows of ``embedding`` with ``E[n] + 0.1·(their random init)``; returns how many."""
    values = number_token_values(tokenizer)
    if not values:
        return 0
    ids = torch.tensor(sorted(values))
    rows = sincos_rows(torch.tensor([values[i] for i in ids.tolist()]), embedding.embedding_dim, std)
    weight = embedding.weight
    weight[ids] = rows.to(weight.dtype) + 0.1 * weight[ids]
    return len(ids)
