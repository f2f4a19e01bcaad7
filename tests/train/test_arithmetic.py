"""train/data/arithmetic.py: hand-computed chains, parsing, determinism, value bounds."""

from __future__ import annotations

import pytest

from train.data.arithmetic import Arithmetic, ArithmeticConfig, chain, expression, final_answer


def test_chain_is_worked_left_to_right() -> None:
    assert chain(3, [("+", 4), ("-", 2)]) == ("3 + 4 = 7 , 7 - 2 = 5 → 5", 5)
    assert chain(9, [("-", 9)]) == ("9 - 9 = 0 → 0", 0)
    assert expression(3, [("+", 4), ("-", 2)]) == "3 + 4 - 2"
    with pytest.raises(ValueError, match="at least one operation"):
        chain(3, [])


@pytest.mark.parametrize(("text", "want"), [
    ("3 + 4 = 7 , 7 - 2 = 5 → 5", 5), ("12 → 3 → 14", 14), ("the answer is 21", 21), ("no number", None),
    ("3 + 4 = 7 , 7 - 2 = 5", 5),
])
def test_final_answer(text: str, want: int | None) -> None:
    assert final_answer(text) == want


def test_split_is_deterministic_bounded_and_consistent() -> None:
    cfg = ArithmeticConfig(train_size=300, max_value=12, max_operand=9)
    split = Arithmetic(cfg).split("train")
    assert split[17] == split[17] and split[17]["id"] == "arith-train-000017"
    for sample in split:
        human, gpt = sample["conversations"]
        assert human["value"] == f"Compute {sample['expression']}"
        assert final_answer(gpt["value"]) == sample["answer"] == eval(sample["expression"])  # noqa: S307
        steps = [int(s.split("= ")[1]) for s in gpt["value"].split(" → ")[0].split(" , ")]
        assert all(0 <= v <= 12 for v in steps)
        assert 1 <= len(steps) <= cfg.max_terms - 1
    assert Arithmetic(cfg).split("test")[0] != split[0]  # splits are drawn from other streams


def test_statements_and_vocabulary() -> None:
    gen = Arithmetic(ArithmeticConfig())
    for s in gen.statements(50):
        lhs, rhs = s.split(" = ")
        assert eval(lhs) == int(rhs) and 0 <= int(rhs) <= 30  # noqa: S307
    words = " ".join(gen.vocabulary_texts()).split()
    assert {"Compute", "→", ",", "=", "+", "-", *map(str, range(10))} <= set(words)
    with pytest.raises(ValueError, match="min_terms"):
        ArithmeticConfig(min_terms=1)
