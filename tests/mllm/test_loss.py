"""Loss reductions and the supervised-position shortcut on hand-computed cases."""

from __future__ import annotations

import math

import pytest
import torch

from mllm.loss import causal_lm_loss, supervised_positions

LN3 = math.log(3)
# V = 2. logits [0, 0] -> CE ln 2 for either target; [ln 3, 0] -> p = (3/4, 1/4): CE ln(4/3) or ln 4.
LOGITS = torch.tensor([[[0.0, 0.0], [LN3, 0.0], [9.0, 9.0]],
                       [[5.0, 1.0], [LN3, 0.0], [9.0, 9.0]]])
LABELS = torch.tensor([[-100, 1, 0],  # predicts 1 from [0, 0] (ln 2) and 0 from [ln 3, 0] (ln 4/3)
                       [-100, -100, 1]])  # predicts 1 from [ln 3, 0] (ln 4)


def test_sample_mean_by_hand() -> None:
    row_a, row_b = (math.log(2) + math.log(4 / 3)) / 2, math.log(4)
    assert causal_lm_loss(LOGITS, LABELS, "sample").item() == pytest.approx((row_a + row_b) / 2, rel=1e-6)


def test_token_mean_by_hand_weighs_row_a_twice() -> None:
    expected = (math.log(2) + math.log(4 / 3) + math.log(4)) / 3
    assert causal_lm_loss(LOGITS, LABELS, "token").item() == pytest.approx(expected, rel=1e-6)
    assert causal_lm_loss(LOGITS, LABELS, "sample").item() != pytest.approx(expected)


def test_supervised_positions_by_hand() -> None:
    labels = torch.tensor([[-100, -100, 5, 6, -100], [-100, -100, -100, -100, 7]])
    assert supervised_positions(labels).tolist() == [1, 2, 3]  # position t predicts labels[:, t + 1]
    assert supervised_positions(torch.full((2, 3), -100)).tolist() == []


@pytest.mark.parametrize("reduction", ["token", "sample"])
def test_logits_at_supervised_positions_give_the_same_loss(reduction: str) -> None:
    torch.manual_seed(0)
    logits, labels = torch.randn(3, 7, 11), torch.randint(0, 11, (3, 7))
    labels[0, :4] = labels[1, :6] = labels[2, :] = -100  # row 2 has no label: left out of the sample mean
    keep = supervised_positions(labels)
    assert keep.tolist() == [3, 4, 5]
    full = causal_lm_loss(logits, labels, reduction)
    torch.testing.assert_close(causal_lm_loss(logits[:, keep], labels, reduction, keep), full)


def test_rows_without_labels_are_left_out_and_an_empty_batch_fails() -> None:
    logits = torch.zeros(3, 2, 4)
    labels = torch.tensor([[-100, 2], [-100, -100], [-100, 1]])
    assert causal_lm_loss(logits, labels, "sample").item() == pytest.approx(math.log(4))  # uniform over V = 4
    with pytest.raises(ValueError, match="no supervised token"):
        causal_lm_loss(logits, torch.full((3, 2), -100), "sample")
    with pytest.raises(ValueError, match=r"reduction: expected one of \['token', 'sample'\], got 'row'"):
        causal_lm_loss(logits, labels, "row")
