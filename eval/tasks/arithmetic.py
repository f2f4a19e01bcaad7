"""Arithmetic chains (text only): the reasoner skill of the FRANK toy experiment.

Each test problem of :mod:`train.data.arithmetic` is one sample; the prompt is the training question
(``"Compute 3 + 4 - 2"``, no ``<image>`` marker: a text-only generator answers it), the parsed answer
is the integer the chain states after its last ``→`` (else its last integer), scored by exact match
with the true result. ``per_type`` splits by number of operations (``chain1``, ``chain2``, ...).
Samples carry a 1x1 blank image only because the runner's protocol hands every generator images.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict
from typing import Any

from PIL import Image

from eval.tasks.base import BaseTask, EvalSample
from train.data.arithmetic import Arithmetic, ArithmeticConfig, final_answer

BLANK = Image.new("RGB", (1, 1))


class ArithmeticTask(BaseTask):
    """The ``split`` problems of the arithmetic generator configured by ``cfg``."""

    config_cls = ArithmeticConfig
    name = "arithmetic"
    prompt_version = "arithmetic-v1"
    generated = True
    prompt = "{question}"

    def __init__(self, cfg: ArithmeticConfig, split: str = "test") -> None:
        self.cfg, self.split = cfg, split

    def samples(self) -> Iterator[EvalSample]:
        for problem in Arithmetic(self.cfg).split(self.split):
            item = problem["items"][0]
            yield EvalSample(problem["id"], BLANK, item["question"], problem["answer"], item["type"])

    def parse(self, sample: EvalSample, text: str) -> Any:
        return final_answer(text)

    def score(self, sample: EvalSample, parsed: Any) -> float:
        return float(parsed is not None and parsed == sample.reference)

    def protocol_extra(self) -> dict[str, Any]:
        return {"split": self.split, "answer": "integer after the last arrow, else the last integer",
                "dataset_revision": asdict(self.cfg), "modality": "text"}
