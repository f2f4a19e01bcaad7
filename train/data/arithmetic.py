"""Arithmetic chains: a deterministic, seeded text-only task (the reasoner skill of the FRANK toy).

A problem is ``terms`` operands ``x_1 .. x_n`` (each in ``[0, max_operand]``) joined by ``+`` / ``-``,
drawn so every partial result stays in ``[0, max_value]``. It is asked as ``"Compute 3 + 4 - 2"``
and answered with a left-to-right chain, one step per operation, then the result::

    3 + 4 = 7 , 7 - 2 = 5 → 5

Problem ``i`` of split ``s`` comes from ``np.random.default_rng([seed, 100 + s, i])`` (random access,
splits disjoint by seed, streams distinct from ShapesWorld's). Samples are LLaVA-style text-only
conversations (no ``image``), so ``train.data.collate.Collator`` takes them as they are.
``statements`` gives one-step facts (``"3 + 4 = 7"``) for a base model's pre-training corpus.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

SPLITS = ("train", "val", "test")
PROMPT = "Compute {expr}"
ARROW = "→"  # separates the chain from the final result
OPS = ("+", "-")
_FINAL_RE = re.compile(ARROW + r"\s*(-?\d+)")
_INT_RE = re.compile(r"-?\d+")


@dataclass
class ArithmeticConfig:
    seed: int = 0
    min_terms: int = 2  # operands per problem (terms - 1 operations)
    max_terms: int = 4
    max_operand: int = 9
    max_value: int = 30  # bound on every partial result (and so on the answer)
    train_size: int = 20000
    val_size: int = 200
    test_size: int = 500

    def __post_init__(self) -> None:
        if not 2 <= self.min_terms <= self.max_terms:
            raise ValueError(f"min_terms/max_terms: expected 2 <= min_terms <= max_terms, got {self.min_terms}, {self.max_terms}")
        if self.max_operand < 1 or self.max_value < self.max_operand:
            raise ValueError(f"max_operand/max_value: expected 1 <= max_operand <= max_value, got {self.max_operand}, {self.max_value}")
        for name in ("train_size", "val_size", "test_size"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: expected a non-negative integer, got {getattr(self, name)}")


def apply(a: int, op: str, b: int) -> int:
    if op not in OPS:
        raise ValueError(f"unknown operation {op!r}; expected one of {OPS}")
    return a + b if op == "+" else a - b


def expression(first: int, steps: Sequence[tuple[str, int]]) -> str:
    """``"3 + 4 - 2"`` for first = 3, steps = [("+", 4), ("-", 2)]."""
    return " ".join([str(first), *(f"{op} {b}" for op, b in steps)])


def chain(first: int, steps: Sequence[tuple[str, int]]) -> tuple[str, int]:
    """The worked answer and the result: ``("3 + 4 = 7 , 7 - 2 = 5 → 5", 5)``."""
    if not steps:
        raise ValueError("chain: at least one operation is needed")
    value, parts = first, []
    for op, b in steps:
        new = apply(value, op, b)
        parts.append(f"{value} {op} {b} = {new}")
        value = new
    return f"{' , '.join(parts)} {ARROW} {value}", value


def final_answer(text: str) -> int | None:
    """The result a chain states: the integer after the last arrow, else the last integer, else None."""
    found = _FINAL_RE.findall(text)
    if found:
        return int(found[-1])
    ints = _INT_RE.findall(text)
    return int(ints[-1]) if ints else None


def draw_steps(rng: np.random.Generator, first: int, n_ops: int, cfg: ArithmeticConfig) -> list[tuple[str, int]]:
    """``n_ops`` operations from ``first`` whose partial results stay in ``[0, max_value]``."""
    steps, value = [], first
    for _ in range(n_ops):
        op = OPS[int(rng.integers(2))]
        if (op == "-" and value == 0) or (op == "+" and value >= cfg.max_value):
            op = "+" if op == "-" else "-"
        room = cfg.max_value - value if op == "+" else value  # a subtraction never goes below 0
        b = int(rng.integers(0, min(room, cfg.max_operand) + 1))
        steps.append((op, b))
        value = apply(value, op, b)
    return steps


class ArithmeticSplit(Sequence[dict[str, Any]]):
    """One split: sample ``i`` = ``{"id", "conversations", "items", "expression", "answer"}`` (no image)."""

    def __init__(self, cfg: ArithmeticConfig, name: str) -> None:
        if name not in SPLITS:
            raise ValueError(f"split: expected one of {list(SPLITS)}, got {name!r}")
        self.cfg, self.name, self.split_id = cfg, name, SPLITS.index(name)
        self._len = int(getattr(cfg, f"{name}_size"))

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> dict[str, Any]:  # type: ignore[override]
        if not isinstance(index, (int, np.integer)):
            raise TypeError(f"ArithmeticSplit indices must be integers, got {type(index).__name__}")
        i = int(index) + (self._len if index < 0 else 0)
        if not 0 <= i < self._len:
            raise IndexError(f"{self.name} split index {index} out of range for {self._len} samples")
        rng = np.random.default_rng([self.cfg.seed, 100 + self.split_id, i])
        n_terms = int(rng.integers(self.cfg.min_terms, self.cfg.max_terms + 1))
        first = int(rng.integers(0, self.cfg.max_operand + 1))
        steps = draw_steps(rng, first, n_terms - 1, self.cfg)
        expr = expression(first, steps)
        answer_text, value = chain(first, steps)
        question = PROMPT.format(expr=expr)
        return {
            "id": f"arith-{self.name}-{i:06d}", "expression": expr, "answer": value,
            "items": [{"type": f"chain{n_terms - 1}", "question": question, "answer": answer_text}],
            "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer_text}],
        }


class Arithmetic:
    """The generator: ``split(name)``, one-step ``statements`` and the closed vocabulary."""

    def __init__(self, cfg: ArithmeticConfig) -> None:
        self.cfg = cfg

    def split(self, name: str) -> ArithmeticSplit:
        return ArithmeticSplit(self.cfg, name)

    def statements(self, n: int, seed: int = 0) -> list[str]:
        """``n`` one-step facts ``"a op b = c"`` with results in range (pre-training text)."""
        rng = np.random.default_rng([self.cfg.seed, 200, seed])
        out = []
        for _ in range(n):
            a = int(rng.integers(0, self.cfg.max_value + 1))
            (op, b), = draw_steps(rng, a, 1, self.cfg)
            out.append(f"{a} {op} {b} = {apply(a, op, b)}")
        return out

    def vocabulary_texts(self) -> list[str]:
        """Every word of prompts and chains (digits are single tokens, so 0-9 cover every number)."""
        sample, _ = chain(3, [("+", 4), ("-", 2)])
        return [PROMPT.format(expr="3 + 4 - 2"), sample, " ".join(str(d) for d in range(10)), f"{ARROW} , = + -"]
