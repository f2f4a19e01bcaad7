"""MMMU validation: the MMMU/MMMU per-subject parquet files and the lmms-lab copy give the same samples;
the official multiple-choice and open-answer parsing, computed by hand. The fixture files are
written by tests/exam_copies.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from exam_copies import MMMU_ROWS, mmmu_release, view
from hf_rows import save_to_disk, write_parquet

from eval.choice import mmmu_choice
from eval.runner import Dist, EvalConfig, run_task
from eval.tasks.base import EvalDataError
from eval.tasks.mmmu import eval_open, normalize_answer, parse_open_response
from mllm.registry import EVAL_TASKS

# By hand: "(B) blue" -> B right; Art_10's long answer quotes "watercolor" -> B, wrong; "The answer is
# 3.14159" -> 3.14 right; "so D" -> D right; "x = 3.429" -> 3.43 equals the second answer 3.429 -> 3.43,
# right. Accuracy 4/5; Art 1/2, Math 3/3.
ANSWERS = {"sky": "(B) blue", "medium": "I would say the painting uses watercolor technique here",
           "pi to": "The answer is 3.14159", "sides": "Let me think: the value is 4, so D", "24/7": "x = 3.429"}


def test_mmmu_multiple_choice_parsing() -> None:
    abcd = {"A": "dog", "B": "cat", "C": "bird", "D": "fish"}
    assert mmmu_choice("B", abcd, "x") == ("B", False)
    assert mmmu_choice("The answer is (C), not (A).", abcd, "x") == ("A", False)  # the last one named wins
    assert mmmu_choice("I think A or B, finally B.", abcd, "x") == ("B", False)
    assert mmmu_choice("It is definitely the bird over there", abcd, "x") == ("C", False)  # > 5 words: option text
    guess = mmmu_choice("hmm", abcd, "validation_Art_3")
    assert guess[1] and guess[0] in abcd and mmmu_choice("no idea", abcd, "validation_Art_3") == guess


def test_mmmu_open_parsing() -> None:
    assert normalize_answer("3.1416") == [3.14] and normalize_answer(" C") == [" c", "c "]
    # No indicator: the whole answer; numbers with commas, and "000" as the plain pattern finds it
    assert parse_open_response("1,000 apples") == ["1,000 apples", 1000.0, 0.0]
    assert parse_open_response("The answer is 3.14159.") == [3.14]  # "is " leaves the shortest tail
    assert eval_open("1000", parse_open_response("1,000 apples"))
    assert eval_open(["Tampa", "Florida"], parse_open_response("It is in Florida."))
    assert eval_open("C", parse_open_response("C")) and not eval_open("C", parse_open_response("ABC"))


def test_mmmu_release_and_hub_copies_agree(tmp_path: Path) -> None:
    release = EVAL_TASKS.build("mmmu_val", {"data": str(mmmu_release(tmp_path / "MMMU"))})
    expected = view(release)
    assert [e[0] for e in expected] == ["validation_Art_2", "validation_Art_10", "validation_Math_1",
                                        "validation_Math_2", "validation_Math_3"]
    assert expected[0][4] == {"question_type": "multiple-choice", "n_images": 2,
                              "choices": {"A": "red", "B": "blue", "C": "green"}}
    assert expected[4][2] == ["24/7", "3.429"]
    first = next(iter(release.samples()))
    assert release.build_prompt(first) == ("<image>\nWhich colour is the sky in <image 1>?\nA. red\nB. blue\nC. green\n\n"
                                           "Answer with the option's letter from the given choices directly.")
    assert release.build_prompt(list(release.samples())[2]) == (
        "<image>\nWhat is pi to two decimals?\n\nAnswer the question using a single word or phrase.")
    snapshot = tmp_path / "lmms-lab-MMMU"
    write_parquet(MMMU_ROWS[::-1], snapshot, "validation")
    write_parquet(MMMU_ROWS[:1], snapshot, "dev")
    assert view(EVAL_TASKS.build("mmmu_val", {"data": str(snapshot)})) == expected
    saved = save_to_disk(MMMU_ROWS, tmp_path / "saved", image_columns=("image_1", "image_2"))
    assert view(EVAL_TASKS.build("mmmu_val", {"data": str(saved)})) == expected


def test_mmmu_accuracy_end_to_end(tmp_path: Path, scripted: Any) -> None:
    task = EVAL_TASKS.build("mmmu_val", {"data": str(mmmu_release(tmp_path / "MMMU"))})
    m = run_task(scripted(ANSWERS), task, EvalConfig(batch_size=2), tmp_path / "out", dist=Dist(), progress=False)
    assert m["accuracy"] == pytest.approx(0.8) and m["n"] == 5 and m["guessed"] == 0
    assert m["per_type"] == {"Art": 0.5, "Math": 1.0}
    assert m["per_discipline"] == {"Art and Design": 0.5, "Science": 1.0}
    assert m["lmms_eval"] == [{"task": "mmmu_val", "metric": "mmmu_acc", "value": 0.8}]


def test_mmmu_bad_rows(tmp_path: Path) -> None:
    bad = [{**MMMU_ROWS[0], "options": "red, blue"}]
    with pytest.raises(EvalDataError, match=r"validation row 0: field 'options' should be a list of strings"):
        list(EVAL_TASKS.build("mmmu_val", {"data": str(write_parquet(bad, tmp_path / "a", "validation"))}).samples())
    bad = [{**MMMU_ROWS[1], "image_1": None}]
    with pytest.raises(EvalDataError, match=r"row 0: field 'image_1' is empty"):
        list(EVAL_TASKS.build("mmmu_val", {"data": str(write_parquet(bad, tmp_path / "b", "validation"))}).samples())
    with pytest.raises(EvalDataError, match=r"expected MMMU's parquet files"):
        list(EVAL_TASKS.build("mmmu_val", {"data": str(tmp_path / "nowhere")}).samples())
