"""ShapesWorld counting + arithmetic: a compositional task neither FRANK-toy parent was trained on.

For test scene ``i`` of the ShapesWorld generator a count question (all objects, a colour or a shape
present in the scene) is followed by one arithmetic operation written as in the arithmetic task:

    <image>\\nHow many red objects are there? + 3            reference: count + 3

(a subtraction never goes below 0); with ``image_first: false`` in the ShapesWorld config the image
marker follows the question, the layout a model trained on that config expects. The expected answer
is a chain, ``"2 + 3 = 5 → 5"``; the score is exact match of the stated result
(:func:`train.data.arithmetic.final_answer`). ``aggregate`` also reports ``count_accuracy``: how often
the chain's first number is the true count, which separates the visual half of a miss from the
arithmetic half. Questions use only words of the two parents'
vocabularies. Operation and operand of scene ``i`` come from ``default_rng([seed, 300, i])``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from eval.tasks.base import BaseTask, EvalSample, mean_score, per_type
from train.data.arithmetic import apply, final_answer
from train.data.shapesworld import (
    PLURALS,
    Q_COUNT_ALL,
    Q_COUNT_COLOUR,
    Q_COUNT_SHAPE,
    ShapesWorld,
    ShapesWorldConfig,
    first_turn,
)

_FIRST_INT = re.compile(r"\d+")


@dataclass
class CompositionalConfig:
    data: ShapesWorldConfig = field(default_factory=ShapesWorldConfig)
    max_operand: int = 5  # the added / subtracted number k is drawn from 1..max_operand
    seed: int = 0


def count_question(objects: list[dict[str, Any]], rng: np.random.Generator) -> tuple[str, int]:
    """A count question about the scene and its answer: all objects, a present colour or shape."""
    kind = int(rng.integers(3))
    if kind == 0:
        return Q_COUNT_ALL, len(objects)
    key = "colour" if kind == 1 else "shape"
    value = objects[int(rng.integers(len(objects)))][key]
    n = sum(o[key] == value for o in objects)
    q = Q_COUNT_COLOUR.format(colour=value) if key == "colour" else Q_COUNT_SHAPE.format(plural=PLURALS[value])
    return q, n


class CompositionalTask(BaseTask):
    """One count-then-compute question per scene of ShapesWorld split ``split``."""

    config_cls = CompositionalConfig
    name = "compositional"
    prompt_version = "compositional-v1"
    generated = True

    def __init__(self, cfg: CompositionalConfig, split: str = "test") -> None:
        self.cfg, self.split = cfg, split
        self.prompt = first_turn("{question}", cfg.data.image_first)  # as ShapesWorldTask lays out its prompt

    def samples(self) -> Iterator[EvalSample]:
        for i, scene in enumerate(ShapesWorld(self.cfg.data).split(self.split)):
            rng = np.random.default_rng([self.cfg.seed, 300, i])
            question, count = count_question(scene["objects"], rng)
            op = "+" if count == 0 or rng.random() < 0.5 else "-"
            k = int(rng.integers(1, (self.cfg.max_operand if op == "+" else min(count, self.cfg.max_operand)) + 1))
            yield EvalSample(f"{scene['id']}-comp", scene["image"], f"{question} {op} {k}", apply(count, op, k),
                             "plus" if op == "+" else "minus", meta={"count": count, "op": op, "k": k})

    def parse(self, sample: EvalSample, text: str) -> Any:
        first = _FIRST_INT.search(text)
        return {"result": final_answer(text), "first": int(first.group()) if first else None}

    def score(self, sample: EvalSample, parsed: Any) -> float:
        return float(parsed["result"] is not None and parsed["result"] == sample.reference)

    def aggregate(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        counted = [float(r["parsed"]["first"] == r["meta"]["count"]) for r in records]
        return {"accuracy": mean_score(records), "count_accuracy": sum(counted) / len(counted) if counted else None,
                **per_type(records), "n": len(records)}

    def protocol_extra(self) -> dict[str, Any]:
        return {"split": self.split, "answer": "integer after the last arrow, else the last integer",
                "dataset_revision": asdict(self.cfg)}
