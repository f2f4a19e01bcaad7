"""SEED-Bench (image questions): the release JSON + image folder and the lmms-lab parquet copy give the
same samples; first-character answers and per-dimension accuracy computed by hand."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hf_rows import hf_image, png, save_to_disk, write_parquet

from eval.runner import Dist, EvalConfig, run_task
from eval.tasks.base import EvalDataError
from eval.tasks.seed import seed_choice
from mllm.registry import EVAL_TASKS

# question_id, question_type_id, question, choices, answer, data_id, colour
QUESTIONS = [
    ("101", 1, "Where is this photo taken?", ["beach", "forest", "city", "desert"], "B", "1454426_2591111986.jpg", (1, 2, 3)),
    ("102", 5, "How many towels are in the image?", ["One", "Two", "Three", "Four"], "C", "1454427_1.jpg", (4, 5, 6)),
    ("v1", 10, "What is the person doing?", ["run", "sit", "walk", "jump"], "A", "video_1.mp4", (0, 0, 0)),  # video
    ("103", 9, "What does the sign say?", ["STOP", "GO", "EXIT", "OPEN"], "A", "1454428_2.jpg", (7, 8, 9)),
]
# By hand (first character, case ignored): "B" right; " c. Three" -> C right; "The answer is A" -> T wrong.
ANSWERS = {"photo": "B", "towels": " c. Three", "sign": "The answer is A"}


def _release(root: Path) -> Path:
    rows = [{"answer": a, "choice_a": c[0], "choice_b": c[1], "choice_c": c[2], "choice_d": c[3], "data_id": d,
             "data_type": "video" if t > 9 else "image", "question": q, "question_id": qid, "question_type_id": t}
            for qid, t, q, c, a, d, _ in QUESTIONS]
    (root / "SEED-Bench-image").mkdir(parents=True)
    for _, t, *_, data_id, colour in QUESTIONS:
        if t <= 9:
            (root / "SEED-Bench-image" / data_id).write_bytes(png(colour))
    (root / "SEED-Bench.json").write_text(json.dumps({"question_type": {"Scene Understanding": 1}, "questions": rows}))
    return root / "SEED-Bench.json"


def _hub_rows() -> list[dict[str, Any]]:
    return [{"answer": a, "choice_a": c[0], "choice_b": c[1], "choice_c": c[2], "choice_d": c[3], "data_id": d,
             "data_type": "video" if t > 9 else "image", "question": q, "question_id": qid, "question_type_id": t,
             "image": [hf_image(png(colour))] * (3 if t > 9 else 1), "segment": None}
            for qid, t, q, c, a, d, colour in QUESTIONS]


def _view(task: Any) -> list[tuple[Any, ...]]:
    return [(s.id, s.question, s.reference, s.type, s.load_image().tobytes()) for s in task.samples()]


def test_seed_choice() -> None:
    assert [seed_choice(t) for t in ("B", " c. Three", "(A) dog", "", "The answer is A")] == ["B", "C", "(", "", "T"]


def test_seed_release_and_hub_copies_agree(tmp_path: Path) -> None:
    release = EVAL_TASKS.build("seedbench", {"data": str(_release(tmp_path / "release"))})
    expected = _view(release)
    assert [e[0] for e in expected] == ["101", "102", "103"]  # the video question is left out
    assert release.build_prompt(next(iter(release.samples()))) == (
        "<image>\nWhere is this photo taken?\nA. beach\nB. forest\nC. city\nD. desert\n"
        "Answer with the option's letter from the given choices directly.")
    assert _view(EVAL_TASKS.build("seedbench", {"data": str(write_parquet(_hub_rows(), tmp_path / "hub", "test"))})) \
        == expected
    assert _view(EVAL_TASKS.build("seedbench", {"data": str(save_to_disk(_hub_rows(), tmp_path / "saved", ()))})) \
        == expected


def test_seed_accuracy_end_to_end(tmp_path: Path, scripted: Any) -> None:
    task = EVAL_TASKS.build("seedbench", {"data": str(_release(tmp_path / "release"))})
    m = run_task(scripted(ANSWERS), task, EvalConfig(batch_size=2), tmp_path / "out", dist=Dist(), progress=False)
    assert m["accuracy"] == pytest.approx(2 / 3) and m["n"] == 3
    assert m["per_type"] == {"Instances Counting": 1.0, "Scene Understanding": 1.0, "Text Understanding": 0.0}
    assert m["lmms_eval"] == [{"task": "seedbench", "metric": "seed_image", "value": pytest.approx(2 / 3)}]


def test_seed_missing_image(tmp_path: Path) -> None:
    path = _release(tmp_path / "release")
    (path.parent / "SEED-Bench-image" / "1454427_1.jpg").unlink()
    with pytest.raises(EvalDataError, match=r"questions\[1\]: image .*SEED-Bench-image/1454427_1.jpg not found"):
        list(EVAL_TASKS.build("seedbench", {"data": str(path)}).samples())
