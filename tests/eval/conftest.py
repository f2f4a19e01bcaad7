"""Test fixtures: hand-made ShapesWorld scenes, fake generators, and benchmark files in the official formats."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from bench_copies import RELEASES
from exam_copies import RELEASES as EXAM_RELEASES
from PIL import Image

from eval.tasks.shapesworld import ShapesWorldTask
from mllm.registry import EVAL_TASKS
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


# --- benchmark fixtures in the official file formats ----------------------------------------------
class Scripted:
    """Answers each prompt with the value of the one key of ``answers`` it contains."""

    def __init__(self, answers: dict[str, str]) -> None:
        self.answers = answers

    def generate(self, images: list[Image.Image], prompts: list[str], **kw: Any) -> list[str]:
        out = []
        for p in prompts:
            (key,) = [k for k in self.answers if k in p]
            out.append(self.answers[key])
        return out


def _write_image(path: Path, size: tuple[int, int] = (8, 8)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (90, 120, 30)).save(path)


def _dump(path: Path, obj: Any) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))
    return str(path)


def _jsonl(path: Path, rows: list[dict[str, Any]]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def make_vqav2(root: Path) -> dict[str, Any]:
    for image_id in (10, 11):
        _write_image(root / "val2014" / f"COCO_val2014_{image_id:012d}.jpg")
    questions = {"data_subtype": "val2014", "questions": [
        {"question_id": 1, "image_id": 10, "question": "What color is the cat?"},
        {"question_id": 2, "image_id": 11, "question": "Is it raining?"},
    ]}
    annotations = {"annotations": [
        {"question_id": 1, "image_id": 10, "answer_type": "other", "question_type": "what color is the",
         "answers": [{"answer": a, "answer_id": j + 1} for j, a in enumerate(["white"] * 2 + ["black"] * 8)]},
        {"question_id": 2, "image_id": 11, "answer_type": "yes/no", "question_type": "is it",
         "answers": [{"answer": "no", "answer_id": j + 1} for j in range(10)]},
    ]}
    return {"data": _dump(root / "v2_OpenEnded_mscoco_val2014_questions.json", questions),
            "annotations": _dump(root / "v2_mscoco_val2014_annotations.json", annotations),
            "images": str(root / "val2014")}


def make_gqa(root: Path) -> dict[str, Any]:
    for name in ("n1", "n2"):
        _write_image(root / "images" / f"{name}.jpg")
    questions = {
        "q1": {"imageId": "n1", "question": "Is the sky blue?", "answer": "yes",
               "types": {"structural": "verify", "semantic": "attr", "detailed": "verifyAttr"}},
        "q2": {"imageId": "n2", "question": "Which side is the cup on?", "answer": "left",
               "types": {"structural": "query", "semantic": "rel", "detailed": "relS"}},
    }
    return {"data": _dump(root / "testdev_balanced_questions.json", questions), "images": str(root / "images")}


def make_textvqa(root: Path) -> dict[str, Any]:
    for name in ("abc1", "abc2"):
        _write_image(root / "train_images" / f"{name}.jpg")
    data = {"dataset_name": "textvqa", "data": [
        {"question_id": 7, "image_id": "abc1", "question": "what brand is this?",
         "answers": ["coca-cola"] * 3 + ["coke"] * 7},
        {"question_id": 8, "image_id": "abc2", "question": "how many bottles?", "answers": ["two"] * 10},
    ]}
    ocr = {"data": [{"image_id": "abc1", "ocr_tokens": ["coca", "cola"]}, {"image_id": "abc2", "ocr_tokens": []}]}
    return {"data": _dump(root / "TextVQA_0.5.1_val.json", data),
            "ocr": _dump(root / "TextVQA_Rosetta_OCR_v0.2_val.json", ocr)}


def make_scienceqa_img(root: Path) -> dict[str, Any]:
    def problem(question, choices, answer, hint, image, subject, split):  # type: ignore[no-untyped-def]
        return {"question": question, "choices": choices, "answer": answer, "hint": hint, "image": image,
                "subject": subject, "split": split, "lecture": "", "solution": ""}

    problems = {
        "1": problem("Which is a mammal?", ["frog", "whale", "trout"], 1, "", "image.png", "natural science", "test"),
        "2": problem("Which word rhymes?", ["cat", "dog"], 0, "A poem.", "image.png", "language science", "test"),
        "3": problem("No image here?", ["yes", "no"], 0, "", None, "social science", "test"),
        "4": problem("A validation one?", ["yes", "no"], 0, "", "image.png", "social science", "val"),
    }
    for pid in ("1", "2"):
        _write_image(root / "images" / "test" / pid / "image.png")
    _dump(root / "pid_splits.json", {"test": ["2", "1", "3"], "val": ["4"]})
    return {"data": _dump(root / "problems.json", problems)}


def make_pope(root: Path) -> dict[str, Any]:
    for name in ("COCO_val2014_000000000001.jpg", "COCO_val2014_000000000002.jpg"):
        _write_image(root / "val2014" / name)
    img1, img2 = "COCO_val2014_000000000001.jpg", "COCO_val2014_000000000002.jpg"
    _jsonl(root / "pope" / "coco_pope_random.json", [
        {"question_id": 1, "image": img1, "text": "Is there a dog in the image?", "label": "yes"},
        {"question_id": 2, "image": img1, "text": "Is there a cat in the image?", "label": "no"},
        {"question_id": 3, "image": img2, "text": "Is there a car in the image?", "label": "yes"},
    ])
    _jsonl(root / "pope" / "coco_pope_adversarial.json", [
        {"question_id": 1, "image": img2, "text": "Is there a fork in the image?", "label": "no"},
        {"question_id": 2, "image": img2, "text": "Is there a bus in the image?", "label": "yes"},
    ])
    return {"data": str(root / "pope"), "images": str(root / "val2014")}


def make_refcoco(root: Path) -> dict[str, Any]:
    _write_image(root / "images" / "COCO_train2014_000000000009.jpg", size=(200, 100))
    rows = [
        {"file_name": "COCO_train2014_000000000009.jpg", "sent": ["man on left", "left guy"],
         "bbox": [50, 25, 100, 50], "width": 200, "height": 100, "split": "val"},
        {"file_name": "COCO_train2014_000000000009.jpg", "sent": "dog", "bbox": [0, 0, 20, 20], "split": "testA"},
    ]
    return {"data": _dump(root / "refcoco_val.json", rows), "images": str(root / "images")}


# make_<task> per registered task that reads files (the others generate their data; refcoco+ and
# refcocog read refcoco's format, see test_prompts.FIXTURE)
BENCHMARKS = {name: globals()[f"make_{name}"] for name in EVAL_TASKS.names() if f"make_{name}" in globals()}
# the VizWiz / ChartQA / DocVQA / OCRBench / AI2D release fixtures, shared with their own test files
BENCHMARKS.update({name: write for name, write in RELEASES.items() if name in EVAL_TASKS.names()})
BENCHMARKS.update({name: write for name, write in EXAM_RELEASES.items() if name in EVAL_TASKS.names()})


@pytest.fixture
def bench(tmp_path: Path) -> Any:
    """``bench(name)`` writes that benchmark's fixture files under tmp_path and returns its config mapping."""
    return lambda name: BENCHMARKS[name](tmp_path / "data" / name)


@pytest.fixture
def scripted() -> type[Scripted]:
    return Scripted
