"""Per-sample loss reduction on a hand-computed case."""

from __future__ import annotations

import math

import pytest
import torch

from mllm.loss import sample_mean_loss

LN3 = math.log(3)


def test_sample_mean_by_hand() -> None:
    # V = 2. logits [0, 0] -> CE ln 2 for either target; [ln 3, 0] -> p = (3/4, 1/4): CE ln(4/3) or ln 4.
    logits = torch.tensor([[[0.0, 0.0], [LN3, 0.0], [9.0, 9.0]],
                           [[5.0, 1.0], [LN3, 0.0], [9.0, 9.0]]])
    labels = torch.tensor([[-100, 1, 0],  # predicts 1 from [0, 0] (ln 2) and 0 from [ln 3, 0] (ln 4/3)
                           [-100, -100, 1]])  # predicts 1 from [ln 3, 0] (ln 4)
    row_a, row_b = (math.log(2) + math.log(4 / 3)) / 2, math.log(4)
    assert sample_mean_loss(logits, labels).item() == pytest.approx((row_a + row_b) / 2, rel=1e-6)
    # the token mean would weigh row a twice: (ln 2 + ln 4/3 + ln 4) / 3 differs
    assert (row_a + row_b) / 2 != pytest.approx((math.log(2) + math.log(4 / 3) + math.log(4)) / 3)


def test_rows_without_labels_are_left_out() -> None:
    logits = torch.zeros(3, 2, 4)
    labels = torch.tensor([[-100, 2], [-100, -100], [-100, 1]])
    assert sample_mean_loss(logits, labels).item() == pytest.approx(math.log(4))  # uniform over V = 4
    with pytest.raises(ValueError, match="no supervised token"):
        sample_mean_loss(logits, torch.full((3, 2), -100))
