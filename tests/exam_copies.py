"""Tiny MME / MMBench / SEED-Bench / MMMU / MathVista files in release format, and the same questions as
the lmms-lab (AI4Math for MathVista) copies hold them, per task.

Each ``<task>_release(root)`` writes the release files under ``root`` and returns the path ``data`` names;
``<task>_hf_rows()`` gives the same questions as hub rows (MMMU's release is itself parquet: ``MMMU_ROWS``).
``RELEASES`` maps each task name to a writer returning the task config; :func:`view` is what the tests
compare between layouts.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from hf_rows import hf_image, png
from PIL import Image

from eval.tasks.mme import SUBTASKS


def view(task: Any) -> list[tuple[Any, ...]]:
    """Every sample of ``task`` as comparable values: id, question, reference, type, meta and pixels."""
    return [(s.id, s.question, s.reference, s.type, s.meta, s.load_image().tobytes()) for s in task.samples()]


# --- mme ---------------------------------------------------------------------------------------------
# (subtask, image file, colour, [(question, answer), (question, answer)])
MME_IMAGES = [
    ("existence", "a.jpg", (200, 0, 0), [("Is there a dog in the image? Please answer yes or no.", "Yes"),
                                         ("Is there a cat in the image? Please answer yes or no.", "No")]),
    ("existence", "b.jpg", (0, 200, 0), [("Is there a car in the image? Please answer yes or no.", "Yes"),
                                         ("Is there a bus in the image? Please answer yes or no.", "No")]),
    ("count", "c.jpg", (0, 0, 200), [("Are there two apples? Please answer yes or no.", "Yes"),
                                     ("Are there three apples? Please answer yes or no.", "No")]),
    ("artwork", "d.jpg", (9, 9, 9), [("Is this painted by Monet? Please answer yes or no.", "No"),
                                     ("Is this painted by Manet? Please answer yes or no.", "Yes")]),
    ("code_reasoning", "0020.png", (50, 60, 70), [("Is the output 3? Please answer yes or no.", "Yes"),
                                                  ("Is the output 4? Please answer yes or no.", "No")]),
]


def mme_release(root: Path) -> Path:
    for subtask in SUBTASKS:
        (root / subtask).mkdir(parents=True)
    for subtask, name, colour, qas in MME_IMAGES:
        boxed = subtask == "artwork"  # the five folders with images/ + questions_answers_YN/
        image_dir = root / subtask / "images" if boxed else root / subtask
        text_dir = root / subtask / "questions_answers_YN" if boxed else root / subtask
        image_dir.mkdir(exist_ok=True)
        text_dir.mkdir(exist_ok=True)
        Image.new("RGB", (4, 4), colour).save(image_dir / name, format="PNG")  # lossless, whatever the name
        (text_dir / f"{Path(name).stem}.txt").write_text("".join(f"{q}\t{a}\n" for q, a in qas))
    return root


def mme_hf_rows() -> list[dict[str, Any]]:
    rows = [{"question_id": f"{s}/{name}", "image": hf_image(png(colour)), "question": q, "answer": a, "category": s}
            for s, name, colour, qas in MME_IMAGES for q, a in qas]
    return rows[-2:] + rows[:-2]  # the copy's own order: the canonical one is restored on reading


# --- mmbench_en_dev ----------------------------------------------------------------------------------
_RED, _BLUE = png((200, 0, 0)), png((0, 0, 200))
# index, hint, options, answer, category, l2, image (bytes, or the index whose image a rotated copy shares)
MMBENCH_ROWS: list[tuple[int, str | None, list[str], str, str, str, bytes | int]] = [
    (1, None, ["blue", "red", "green"], "A", "attribute", "FP-S", _RED),
    (2, "Look closely.", ["cat", "dog"], "B", "recognition", "FP-C", _BLUE),
    (1000001, None, ["red", "green", "blue"], "C", "attribute", "FP-S", 1),
    (1000002, "Look closely.", ["dog", "cat"], "A", "recognition", "FP-C", 2),
    (2000001, None, ["green", "blue", "red"], "B", "attribute", "FP-S", 1),
]
MMBENCH_QUESTIONS = {1: "What colour is the sky?", 2: "Which animal is shown?"}


def mmbench_release(path: Path) -> Path:
    header = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "source",
              "l2-category", "comment", "split"]
    lines = ["\t".join(header)]
    for index, hint, options, answer, category, l2, image in MMBENCH_ROWS:
        cells = [str(index), MMBENCH_QUESTIONS[index % 10**6], hint or "", *(options + [""] * (4 - len(options))), answer,
                 category, image if isinstance(image, int) else base64.b64encode(image).decode(), "src", l2, "", "dev"]
        lines.append("\t".join(str(c) for c in cells))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def mmbench_hf_rows() -> list[dict[str, Any]]:
    images = {index: image for index, *_, image in MMBENCH_ROWS if isinstance(image, bytes)}
    rows = [{"index": str(index), "question": MMBENCH_QUESTIONS[index % 10**6], "hint": hint or "nan", "answer": answer,
             **{k: (options[j] if j < len(options) else "nan") for j, k in enumerate("ABCD")},
             "category": category, "image": hf_image(image if isinstance(image, bytes) else images[image]),
             "source": "src", "L2-category": l2, "comment": "nan", "split": "dev"}
            for index, hint, options, answer, category, l2, image in MMBENCH_ROWS]
    return rows[::-1]  # the copy's own order; samples come sorted by index


# --- seedbench ---------------------------------------------------------------------------------------
# question_id, question_type_id, question, choices, answer, data_id, colour
SEED_QUESTIONS = [
    ("101", 1, "Where is this photo taken?", ["beach", "forest", "city", "desert"], "B", "1454426_2591111986.jpg", (1, 2, 3)),
    ("102", 5, "How many towels are in the image?", ["One", "Two", "Three", "Four"], "C", "1454427_1.jpg", (4, 5, 6)),
    ("v1", 10, "What is the person doing?", ["run", "sit", "walk", "jump"], "A", "video_1.mp4", (0, 0, 0)),  # video
    ("103", 9, "What does the sign say?", ["STOP", "GO", "EXIT", "OPEN"], "A", "1454428_2.jpg", (7, 8, 9)),
]


def seed_release(root: Path) -> Path:
    rows = [{"answer": a, "choice_a": c[0], "choice_b": c[1], "choice_c": c[2], "choice_d": c[3], "data_id": d,
             "data_type": "video" if t > 9 else "image", "question": q, "question_id": qid, "question_type_id": t}
            for qid, t, q, c, a, d, _ in SEED_QUESTIONS]
    (root / "SEED-Bench-image").mkdir(parents=True)
    for _, t, *_, data_id, colour in SEED_QUESTIONS:
        if t <= 9:
            (root / "SEED-Bench-image" / data_id).write_bytes(png(colour))
    (root / "SEED-Bench.json").write_text(json.dumps({"question_type": {"Scene Understanding": 1}, "questions": rows}))
    return root / "SEED-Bench.json"


def seed_hf_rows() -> list[dict[str, Any]]:
    return [{"answer": a, "choice_a": c[0], "choice_b": c[1], "choice_c": c[2], "choice_d": c[3], "data_id": d,
             "data_type": "video" if t > 9 else "image", "question": q, "question_id": qid, "question_type_id": t,
             "image": [hf_image(png(colour))] * (3 if t > 9 else 1), "segment": None}
            for qid, t, q, c, a, d, colour in SEED_QUESTIONS]


# --- mmmu_val ----------------------------------------------------------------------------------------
def _mmmu_row(sample_id: str, question: str, options: str, answer: str, kind: str, images: int = 1) -> dict[str, Any]:
    row = {"id": sample_id, "question": question, "options": options, "explanation": "", "answer": answer,
           "img_type": "['Diagrams']", "topic_difficulty": "Easy", "question_type": kind, "subfield": "x"}
    return {**row, **{f"image_{k}": hf_image(png((k, 2 * k, 3))) if k <= images else None for k in range(1, 8)}}


MMMU_ROWS = [
    _mmmu_row("validation_Art_2", "Which colour is the sky in <image 1>?", "['red', 'blue', 'green']", "B",
         "multiple-choice", images=2),
    _mmmu_row("validation_Art_10", "Which medium is used?", "['oil', 'watercolor']", "A", "multiple-choice"),
    _mmmu_row("validation_Math_1", "What is pi to two decimals?", "[]", "3.14", "open"),
    _mmmu_row("validation_Math_3", "What is 24/7?", "[]", "['24/7', '3.429']", "open"),
    _mmmu_row("validation_Math_2", "How many sides has a square?", "['1', '2', '3', '4']", "D", "multiple-choice"),
]


def mmmu_release(root: Path) -> Path:
    for subject in ("Art", "Math"):
        (root / subject).mkdir(parents=True)
        rows = [r for r in MMMU_ROWS if f"_{subject}_" in r["id"]]
        pq.write_table(pa.Table.from_pylist(rows), root / subject / "validation-00000-of-00001.parquet")
        pq.write_table(pa.Table.from_pylist(rows[:1]), root / subject / "dev-00000-of-00001.parquet")
    return root


# --- mathvista_testmini ------------------------------------------------------------------------------
def _mathvista_problem(pid: str, question: str, answer: str, qtype: str, atype: str, task: str, skills: list[str],
             choices: list[str] | None = None, precision: int | None = None, unit: str | None = None) -> dict[str, Any]:
    return {"pid": pid, "question": question, "image": f"images/{pid}.jpg", "choices": choices, "unit": unit,
            "precision": precision, "answer": answer, "question_type": qtype, "answer_type": atype,
            "metadata": {"split": "testmini", "language": "english", "source": "src", "category": "math-targeted-vqa",
                         "task": task, "context": "scientific figure", "grade": "college", "skills": skills}}


MATHVISTA_PROBLEMS = [
    _mathvista_problem("10", "Which years are shown?", "[2014, 2016]", "free_form", "list", "figure question answering",
             ["statistical reasoning"]),
    _mathvista_problem("1", "How far is the spring compressed?", "1.2", "free_form", "float", "textbook question answering",
             ["scientific reasoning"], precision=1, unit="m"),
    _mathvista_problem("2", "What is the total volume of the cup?", "1000", "free_form", "integer", "visual question answering",
             ["numeric commonsense", "arithmetic reasoning"], unit="g"),
    _mathvista_problem("3", "What fraction is shaded?", "8/11", "multi_choice", "text", "math word problem",
             ["arithmetic reasoning"], choices=["3/11", "8/11", "6/11", "3/5"]),
    _mathvista_problem("4", "Is the line straight?", "No", "multi_choice", "text", "figure question answering",
             ["logical reasoning"], choices=["Yes", "No"]),
]


def mathvista_release(root: Path) -> Path:
    (root / "images").mkdir(parents=True)
    for k, p in enumerate(MATHVISTA_PROBLEMS):
        (root / p["image"]).write_bytes(png((k, 10 * k, 7)))
    (root / "testmini.json").write_text(json.dumps({p["pid"]: p for p in MATHVISTA_PROBLEMS}))
    return root / "testmini.json"


def mathvista_hf_rows() -> list[dict[str, Any]]:
    return [{**p, "precision": float("nan") if p["precision"] is None else float(p["precision"]),
             "decoded_image": hf_image(png((k, 10 * k, 7))), "query": "unused"} for k, p in enumerate(MATHVISTA_PROBLEMS)]


def _config(write: Callable[[Path], Path], name: str) -> Callable[[Path], dict[str, Any]]:
    return lambda root: {"data": str(write(root / name))}


RELEASES: dict[str, Callable[[Path], dict[str, Any]]] = {
    "mme": _config(mme_release, "MME_Benchmark_release_version"),
    "mmbench_en_dev": _config(mmbench_release, "MMBench_DEV_EN.tsv"),
    "seedbench": _config(seed_release, "SEED-Bench"),
    "mmmu_val": _config(mmmu_release, "MMMU"),
    "mathvista_testmini": _config(mathvista_release, "MathVista"),
}
