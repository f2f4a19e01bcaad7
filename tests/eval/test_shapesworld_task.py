"""ShapesWorld task on the real generator, and the shared sample/image helpers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from eval.runner import Dist, EvalConfig, run_task
from eval.tasks.base import EvalDataError, EvalSample
from eval.tasks.shapesworld import ShapesWorldTask
from train.data.shapesworld import GROUNDING_TYPE, VQA_TYPES, ShapesWorld, ShapesWorldConfig

CFG = ShapesWorldConfig(test_images=4)


class Oracle:
    """Answers every question with its reference answer, in another surface form where it can."""

    def __init__(self, answers: dict[str, str]) -> None:
        self.answers = answers

    def generate(self, images: list[Image.Image], prompts: list[str], **kw: Any) -> list[str]:
        return [f"The {self.answers[p]}." for p in prompts]  # "The red." normalises to "red"


def test_one_sample_per_item_with_the_training_prompt() -> None:
    task = ShapesWorldTask(CFG, split="test")
    samples = list(task.samples())
    scenes = ShapesWorld(CFG).split("test")
    items = [(scene["id"], k, item) for scene in scenes for k, item in enumerate(scene["items"])]
    assert len(samples) == len(items)
    for sample, (sid, k, item) in zip(samples, items, strict=True):
        assert sample.id == f"{sid}-{k}" and sample.type == item["type"]
        assert task.build_prompt(sample) == "<image>\n" + item["question"]
        if item["type"] == GROUNDING_TYPE:
            assert sample.reference == [float(v) for v in item["answer"].strip("[]").split(",")]
        else:
            assert sample.type in VQA_TYPES and sample.reference == item["answer"]
    assert {s.type for s in samples} >= {GROUNDING_TYPE, "count", "exists"}


def test_oracle_scores_one(tmp_path: Path) -> None:
    task = ShapesWorldTask(CFG, split="test")
    answers = {}
    for scene in ShapesWorld(CFG).split("test"):
        for item in scene["items"]:
            answers["<image>\n" + item["question"]] = item["answer"]
    metrics = run_task(Oracle(answers), task, EvalConfig(batch_size=5), tmp_path, dist=Dist(), progress=False)
    assert metrics["vqa_accuracy"] == 1.0 and metrics["grounding_accuracy"] == 1.0
    assert metrics["grounding_mean_iou"] == 1.0
    assert set(metrics["per_type"].values()) == {1.0}
    assert metrics["protocol"]["dataset_revision"]["test_images"] == 4
    assert metrics["protocol"]["split"] == "test"


def test_image_files_load_lazily_and_bad_ones_are_named(tmp_path: Path) -> None:
    good, bad = tmp_path / "good.png", tmp_path / "bad.png"
    Image.new("L", (5, 3), 7).save(good)
    bad.write_bytes(b"not a png")
    img = EvalSample("s", good, "q", "a").load_image()
    assert img.mode == "RGB" and img.size == (5, 3) and img.getpixel((0, 0)) == (7, 7, 7)
    with pytest.raises(EvalDataError, match=r"bad\.png: cannot read the image of sample 'x'"):
        EvalSample("x", bad, "q", "a").load_image()
    with pytest.raises(EvalDataError, match="missing.png"):
        EvalSample("y", tmp_path / "missing.png", "q", "a").load_image()
