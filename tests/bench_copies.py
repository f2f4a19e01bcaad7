"""Tiny benchmark files in release format (and the same rows as lmms-lab copies hold them), per task.

Each ``<task>_release(root)`` writes the release files under ``root`` and returns the task config;
``<task>_hf_rows()`` gives the same questions as hub rows, in the same order. ``RELEASES`` maps each registered task name to its release writer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hf_rows import hf_image, png

# --- vizwiz_vqa_val ---------------------------------------------------------------------------------
VIZWIZ_QUESTIONS = [  # (image stem, question, answers, answer type, colour)
    ("VizWiz_val_00000000", "what is this?", ["soup"] * 3 + ["can of soup"] * 7, "other", (200, 0, 0)),
    ("VizWiz_val_00000001", "what color is this shirt", ["unanswerable"] * 10, "unanswerable", (0, 200, 0)),
    ("VizWiz_val_00000002", "how many coins are there", ["two"] * 3 + ["2"] * 2 + ["three"] * 5, "number",
     (0, 0, 200)),
]


def vizwiz_release(root: Path) -> dict[str, Any]:
    rows = []
    for stem, question, answers, kind, colour in VIZWIZ_QUESTIONS:
        (root / "val").mkdir(parents=True, exist_ok=True)
        (root / "val" / f"{stem}.jpg").write_bytes(png(colour))  # PIL reads by content, not suffix
        rows.append({"image": f"{stem}.jpg", "question": question, "answer_type": kind, "answerable": 1,
                     "answers": [{"answer": a, "answer_confidence": "yes"} for a in answers]})
    (root / "val.json").write_text(json.dumps(rows))
    return {"data": str(root / "val.json")}


def vizwiz_hf_rows() -> list[dict[str, Any]]:
    return [{"question_id": stem, "image": hf_image(png(colour)), "question": question, "answers": answers,
             "category": kind} for stem, question, answers, kind, colour in VIZWIZ_QUESTIONS]


# --- chartqa ----------------------------------------------------------------------------------------
CHARTQA_HUMAN = [("a.png", "How many bars are there?", "12"), ("b.png", "Which country is highest?", "Japan"),
                 ("c.png", "What is the difference?", "5")]
CHARTQA_AUGMENTED = [("d.png", "What is the value in 2010?", "45"), ("e.png", "What is the share of X?", "0")]


def _chartqa_colour(name: str) -> tuple[int, int, int]:
    return (10 * ord(name[0]) % 256, 0, 0)


def chartqa_release(root: Path) -> dict[str, Any]:
    (root / "png").mkdir(parents=True)
    for split, rows in (("test_human", CHARTQA_HUMAN), ("test_augmented", CHARTQA_AUGMENTED)):
        for name, _, _ in rows:
            (root / "png" / name).write_bytes(png(_chartqa_colour(name)))
        (root / f"{split}.json").write_text(json.dumps([{"imgname": n, "query": q, "label": a} for n, q, a in rows]))
    return {"data": str(root)}


def chartqa_hf_rows() -> list[dict[str, Any]]:
    return [{"type": split, "question": q, "answer": a, "image": hf_image(png(_chartqa_colour(n)))}
            for split, rows in (("human_test", CHARTQA_HUMAN), ("augmented_test", CHARTQA_AUGMENTED)) for n, q, a in rows]


# --- docvqa_val -------------------------------------------------------------------------------------
DOCVQA_QUESTIONS = [  # (questionId, question, answers, question types, image name)
    (101, "What is the date?", ["March 5, 1998"], ["form"], "abc_1.png"),
    (102, "What is the total?", ["$1,200", "1200"], ["table/list"], "abc_2.png"),
    (103, "Who signed the letter?", ["John Smith"], ["handwritten", "form"], "abc_2.png"),
]


def _docvqa_colour(name: str) -> tuple[int, int, int]:
    return (0, 40 * int(name[-5]), 0)


def docvqa_release(root: Path) -> dict[str, Any]:
    (root / "documents").mkdir(parents=True)
    rows = []
    for qid, question, answers, types, name in DOCVQA_QUESTIONS:
        (root / "documents" / name).write_bytes(png(_docvqa_colour(name)))
        rows.append({"questionId": qid, "question": question, "question_types": types, "image": f"documents/{name}",
                     "docId": qid // 2, "ucsf_document_id": "abc", "ucsf_document_page_no": "1", "answers": answers,
                     "data_split": "val"})
    (root / "val_v1.0_withQT.json").write_text(json.dumps({"dataset_name": "docvqa", "data": rows}))
    return {"data": str(root / "val_v1.0_withQT.json")}


def docvqa_hf_rows() -> list[dict[str, Any]]:
    return [{"questionId": str(qid), "question": question, "question_types": types, "image": hf_image(png(_docvqa_colour(n))),
             "docId": qid // 2, "ucsf_document_id": "abc", "ucsf_document_page_no": "1", "answers": answers,
             "data_split": "val"} for qid, question, answers, types, n in DOCVQA_QUESTIONS]


# --- ocrbench ---------------------------------------------------------------------------------------
OCRBENCH_FORMULA = "Please write out the expression of the formula in the image using LaTeX format."
OCRBENCH_QUESTIONS = [  # (source, image path, question, answers as released, category)
    ("IIIT5K", "IIIT5K/1.png", "what is written in the image?", "CENTRE", "Regular Text Recognition"),
    ("HME100k", "HME100k/2.png", OCRBENCH_FORMULA, "x ^ { 2 }", "Handwritten Mathematical Expression Recognition"),
    ("docVQA", "docVQA/3.png", "What is the total?", ["$1,200", "1200"], "Doc-oriented VQA"),
    ("IIIT5K", "IIIT5K/4.png", "what is the word in the image? ", "FRIEND", "Regular Text Recognition"),
]


def _ocrbench_colour(path: str) -> tuple[int, int, int]:
    return (0, 0, 50 * int(path[-5]))


def ocrbench_release(root: Path) -> dict[str, Any]:
    rows = []
    for i, (source, image, question, answers, kind) in enumerate(OCRBENCH_QUESTIONS):
        (root / "OCRBench_Images" / image).parent.mkdir(parents=True, exist_ok=True)
        (root / "OCRBench_Images" / image).write_bytes(png(_ocrbench_colour(image)))
        rows.append({"dataset_name": source, "id": 100 + i, "image_path": image, "question": question,
                     "answers": answers, "type": kind})
    (root / "OCRBench.json").write_text(json.dumps(rows))
    return {"data": str(root / "OCRBench.json")}


def ocrbench_hf_rows() -> list[dict[str, Any]]:
    return [{"dataset": source, "question": question, "question_type": kind, "image": hf_image(png(_ocrbench_colour(image))),
             "answer": [answers] if isinstance(answers, str) else answers}
            for source, image, question, answers, kind in OCRBENCH_QUESTIONS]


# --- ai2d -------------------------------------------------------------------------------------------
AI2D_IMAGES = {"5": (10, 10, 10), "3": (30, 30, 30)}
AI2D_QUESTIONS = [  # (image id, question, options, correct index), in test-ids order
    ("5", "Which label shows the sun?", ["moon", "sun", "earth", "mars"], 1),
    ("5", "What comes after larva?", ["egg", "pupa", "adult"], 1),
    ("3", "What eats grass?", ["cow", "lion", "hawk", "snake"], 0),
]


def ai2d_release(root: Path) -> dict[str, Any]:
    (root / "questions").mkdir(parents=True)
    (root / "images").mkdir()
    for image_id, colour in AI2D_IMAGES.items():
        (root / "images" / f"{image_id}.png").write_bytes(png(colour))
        questions = {q: {"abcLabel": False, "answerTexts": opts, "correctAnswer": k, "questionId": f"{image_id}.png-{j}"}
                     for j, (i, q, opts, k) in enumerate(x for x in AI2D_QUESTIONS if x[0] == image_id)}
        (root / "questions" / f"{image_id}.png.json").write_text(
            json.dumps({"imageName": f"{image_id}.png", "questions": questions}))
    (root / "ai2d_test_ids.csv").write_text("5\n3\n")
    return {"data": str(root)}


def ai2d_hf_rows() -> list[dict[str, Any]]:
    return [{"question": q, "options": opts, "answer": str(k), "image": hf_image(png(AI2D_IMAGES[i]))}
            for i, q, opts, k in AI2D_QUESTIONS]


RELEASES = {
    "vizwiz_vqa_val": vizwiz_release,
    "chartqa": chartqa_release,
    "docvqa_val": docvqa_release,
    "ocrbench": ocrbench_release,
    "ai2d": ai2d_release,
}
