"""Hand-made ShapesWorld scenes and a fake, deterministic generator for the runner tests."""

from __future__ import annotations

from typing import Any

import pytest
from PIL import Image

from eval.tasks.shapesworld import ShapesWorldTask
from train.data.shapesworld import ShapesWorldConfig


def _scene(sid: str, colour: tuple[int, int, int], items: list[tuple[str, str, str]]) -> dict[str, Any]:
    return {
        "id": sid,
        "image": Image.new("RGB", (16, 16), colour),
        "items": [{"type": t, "question": q, "answer": a, "box": None} for t, q, a in items],
    }


SCENES = [
    _scene("test-000000", (200, 0, 0), [
        ("colour", "What colour is the circle?", "red"),
        ("count", "How many objects are there?", "2"),
        ("grounding", "Where is the red circle?", "[100, 100, 500, 500]"),
    ]),
    _scene("test-000001", (0, 200, 0), [
        ("shape", "What shape is the red object?", "square"),
        ("exists", "Is there a blue cross?", "no"),
        ("grounding", "Where is the red square?", "[0, 0, 200, 400]"),
    ]),
    _scene("test-000002", (0, 0, 200), [
        ("relpos", "Is the red circle left or right of the blue square?", "left"),
        ("grounding", "Where is the blue square?", "[600, 600, 1000, 1000]"),
    ]),
]

# The fake model's answers, by question. Scores by hand:
#   colour "Red." -> "red" right; count "two" -> "2" right; shape wrong; exists "No" right; relpos wrong
#   -> VQA 3/5 = 0.6.
#   grounding: IoU 1 (hit); [0,0,200,200] vs [0,0,200,400]: 40000 / 80000 = 0.5 (hit, >= 0.5);
#   no box (miss) -> 2/3; mean IoU (1 + 0.5 + 0) / 3 = 0.5.
ANSWERS = {
    "What colour is the circle?": "Red.",
    "How many objects are there?": "two",
    "Where is the red circle?": "[100, 100, 500, 500]",
    "What shape is the red object?": "circle",
    "Is there a blue cross?": "No",
    "Where is the red square?": "[0, 0, 200, 200]",
    "Is the red circle left or right of the blue square?": "right",
    "Where is the blue square?": "I don't know",
}


class FakeGenerator:
    """Answers from ANSWERS; records every call; raises on call number ``fail_on`` (1-based)."""

    def __init__(self, fail_on: int | None = None) -> None:
        self.fail_on = fail_on
        self.calls: list[list[str]] = []  # prompts of every successful call
        self.kwargs: list[dict[str, Any]] = []

    def generate(self, images: list[Image.Image], prompts: list[str], **kw: Any) -> list[str]:
        if self.fail_on is not None and len(self.calls) + 1 == self.fail_on:
            raise RuntimeError("simulated crash")
        assert len(images) == len(prompts) and all(im.mode == "RGB" for im in images)
        self.calls.append(list(prompts))
        self.kwargs.append(kw)
        return [ANSWERS[p.removeprefix("<image>\n")] for p in prompts]


@pytest.fixture
def task() -> ShapesWorldTask:
    return ShapesWorldTask(ShapesWorldConfig(), split="test", data=SCENES)


@pytest.fixture
def fake() -> type[FakeGenerator]:
    """The fake generator class (test modules cannot import conftest under --import-mode=importlib)."""
    return FakeGenerator
