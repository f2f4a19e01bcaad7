"""MathVista testmini: the release JSON + images and the AI4Math parquet copy give the same samples; the
official normalization (float / int / list answers, precision, nearest option) and both scores by hand. The fixture files are
written by tests/exam_copies.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from exam_copies import mathvista_hf_rows, mathvista_release, view
from hf_rows import save_to_disk, write_parquet

from eval.runner import Dist, EvalConfig, run_task
from eval.tasks.base import EvalDataError
from eval.tasks.mathvista import edit_distance, extract_answer, normalize_extraction
from mllm.registry import EVAL_TASKS

# By hand, raw (the whole response) and extracted (rules):
#   1 "... so the answer is 1.2": raw not a number (wrong); extracted 1.2 after "answer is" -> "1.2" right
#   2 "1,000": raw float("1,000") fails (wrong); extracted "1000" right
#   3 "B": both -> "8/11" right
#   4 "Yes and no": both option texts quoted -> no letter; nearest option to the response is "Yes": wrong
#  10 "The years are [2014, 2016].": raw is not the list (wrong); extracted "[2014, 2016]" right
# accuracy 4/5, raw 1/5
ANSWERS = {"spring": "The spring is compressed by 1.23 meters, so the answer is 1.2", "volume": "1,000",
           "shaded": "B", "straight": "Yes and no", "years": "The years are [2014, 2016]."}


def test_normalization_as_calculate_score() -> None:
    mc = {"question_type": "multi_choice", "answer_type": "text", "choices": ["3/11", "8/11", "6/11"], "precision": 0}
    assert normalize_extraction("(C) 6/11", mc) == "6/11" and normalize_extraction("A", mc) == "3/11"
    assert normalize_extraction("8/12", mc) == "8/11"  # nearest option, edit distance 1
    assert normalize_extraction("", mc) == "3/11"  # an empty extraction: the shortest option (first of ties)
    integer = {"question_type": "free_form", "answer_type": "integer", "choices": [], "precision": 0}
    assert normalize_extraction("3.7", integer) == "3" and normalize_extraction("inf", integer) is None
    one = {"question_type": "free_form", "answer_type": "float", "choices": [], "precision": 1}
    assert normalize_extraction("1.25", one) == "1.2" and normalize_extraction("3", one) == "3.0"
    two = {**one, "precision": 2}
    assert normalize_extraction("0.1", two) == "0.1" and normalize_extraction("2.345", two) == "2.35"
    lst = {"question_type": "free_form", "answer_type": "list", "choices": [], "precision": 0}
    assert normalize_extraction("[1,2]", lst) == "[1,2]"  # raw: not the answer's "[1, 2]"
    assert normalize_extraction(extract_answer("so [1,2]", lst), lst) == "[1, 2]"
    assert edit_distance("kitten", "sitting") == 3


# (question_type, answer_type, precision, choices, extraction, prediction) as the official scorer wrote them
# into the MathVista repository's results/bard/output_bard.json (pids 705, 821, 256, 538) and
# results/chatgpt/output_chatgpt_2shot_solution.json (pids 247, 818, 1, 981, 225, 506)
OFFICIAL = [
    ("multi_choice", "text", None, ["Yes", "No"], "N/A", "No"),
    ("multi_choice", "text", None, ["Yes", "No"], "Sorry, I can't answer this question.", "Yes"),
    ("multi_choice", "text", None, ["3", "4", "5", "6"], "N/A", "3"),
    ("multi_choice", "text", None, ["9π", "6π", "3π", "π"], "(B)", "6π"),
    ("free_form", "float", 2, None, "4.01e18", "4.01e+18"),
    ("free_form", "float", 2, None, "2.00", "2.0"),
    ("free_form", "float", 1, None, "0.0115", "0.0"),
    ("free_form", "float", 1, None, "6009", "6009.0"),
    ("free_form", "list", None, None, "N/A", "N/A"),
    ("free_form", "list", None, None, "[]", "[]"),
]


@pytest.mark.parametrize(("qtype", "atype", "precision", "choices", "extraction", "prediction"), OFFICIAL)
def test_normalization_matches_official_outputs(qtype: str, atype: str, precision: int | None,
                                                choices: list[str] | None, extraction: str, prediction: str) -> None:
    problem = {"question_type": qtype, "answer_type": atype, "choices": choices or [], "precision": precision or 0}
    assert normalize_extraction(extraction, problem) == prediction


def test_extraction_rules() -> None:
    integer = {"question_type": "free_form", "answer_type": "integer", "choices": [], "precision": 0}
    assert extract_answer('The answer is "7".', integer) == "7"  # the official quick pattern
    assert extract_answer("Answer: 12, since 3 * 4 = 12 and 2 + 3 = 5", integer) == "12"  # first after the cue
    assert extract_answer("3 apples and 5 pears make 8", integer) == "8"  # no cue: the last number
    mc = {"question_type": "multi_choice", "answer_type": "text", "choices": ["red", "blue"], "precision": 0}
    assert extract_answer("I choose (B).", mc) == "B" and extract_answer("blue, I think", mc) == "B"


def test_mathvista_release_and_hub_copies_agree(tmp_path: Path) -> None:
    release = EVAL_TASKS.build("mathvista_testmini", {"data": str(mathvista_release(tmp_path / "MathVista" / "data"))})
    expected = view(release)
    assert [e[0] for e in expected] == ["1", "2", "3", "4", "10"]
    prompts = [release.build_prompt(s) for s in release.samples()]
    assert prompts[0] == ("<image>\nHow far is the spring compressed? (Unit: m)\n"
                          "Answer the question using a single floating-point number with one decimal place.")
    assert prompts[2] == ("<image>\nWhat fraction is shaded?\nA. 3/11\nB. 8/11\nC. 6/11\nD. 3/5\n"
                          "Answer with the option's letter from the given choices directly.")
    assert prompts[4].endswith("\nAnswer the question using a Python list.")
    snapshot = tmp_path / "AI4Math-MathVista"
    write_parquet(mathvista_hf_rows(), snapshot, "testmini")
    write_parquet(mathvista_hf_rows()[:1], snapshot, "test")  # another split: not read
    assert view(EVAL_TASKS.build("mathvista_testmini", {"data": str(snapshot)})) == expected
    saved = save_to_disk(mathvista_hf_rows(), tmp_path / "saved", image_columns=("decoded_image",))
    assert view(EVAL_TASKS.build("mathvista_testmini", {"data": str(saved)})) == expected


def test_mathvista_scores_end_to_end(tmp_path: Path, scripted: Any) -> None:
    task = EVAL_TASKS.build("mathvista_testmini", {"data": str(mathvista_release(tmp_path / "data"))})
    m = run_task(scripted(ANSWERS), task, EvalConfig(batch_size=2), tmp_path / "out", dist=Dist(), progress=False)
    assert m["accuracy"] == pytest.approx(0.8) and m["accuracy_raw"] == pytest.approx(0.2) and m["n"] == 5
    assert m["per_type"] == {"figure question answering": 0.5, "math word problem": 1.0,
                             "textbook question answering": 1.0, "visual question answering": 1.0}
    assert m["per_skill"]["logical reasoning"] == 0.0 and m["per_skill"]["arithmetic reasoning"] == 1.0
    assert m["lmms_eval"] == [{"task": "mathvista_testmini_format", "metric": "llm_as_judge_eval", "value": 80.0}]


def test_mathvista_bad_files(tmp_path: Path) -> None:
    path = mathvista_release(tmp_path / "data")
    (path.parent / "images" / "3.jpg").unlink()
    with pytest.raises(EvalDataError, match=r"\['3'\]: image .*images/3.jpg not found"):
        list(EVAL_TASKS.build("mathvista_testmini", {"data": str(path)}).samples())
    rows = mathvista_hf_rows()
    rows[3]["answer"] = "9/11"
    with pytest.raises(EvalDataError, match=r"testmini row 3: a multi_choice answer must be one of the choices"):
        list(EVAL_TASKS.build("mathvista_testmini",
                              {"data": str(write_parquet(rows, tmp_path / "hub", "testmini"))}).samples())
