"""GQA's eval.py scores on fixture files in the official formats, every expected value computed by hand.

The fixture (question id: structural / semantic type, gold -> scripted prediction after LLaVA's
``rstrip('.').lower()``, ``groups.global``, ``entailed``); all balanced but ``e``:

    a  verify  / attr  yes   -> yes        right  group None     entailed [a, b, c]
    b  query   / attr  blue  -> blue       right  group color    entailed [e]
    c  query   / rel   left  -> the right  wrong  group side     entailed [d]
    d  choose  / rel   right -> right      right  group side     entailed [d]
    f  compare / obj   color -> material   wrong  group common   entailed [a]   (detailed type twoCommon)
    g  query   / attr  red   -> blue       wrong  group color    entailed []
    e  compare / attr  no    -> no         right  group color    entailed [c]   (isBalanced false)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from eval.metrics import gqa_belongs, gqa_consistency, gqa_distribution
from eval.runner import Dist, EvalConfig, run_task
from eval.tasks.base import EvalDataError
from mllm.registry import EVAL_TASKS

# id: (question, answer, structural, semantic, detailed, global group, entailed, isBalanced)
QUESTIONS: dict[str, tuple[str, str, str, str, str, str | None, list[str], bool]] = {
    "a": ("Is the sky blue?", "yes", "verify", "attr", "verifyAttr", None, ["a", "b", "c"], True),
    "b": ("What color is the sky?", "blue", "query", "attr", "queryAttr", "color", ["e"], True),
    "c": ("Which side is the cup on?", "left", "query", "rel", "relS", "side", ["d"], True),
    "d": ("Is the plate on the left or right?", "right", "choose", "rel", "chooseRel", "side", ["d"], True),
    "f": ("What do the cup and the bowl have in common?", "color", "compare", "obj", "twoCommon", "common",
          ["a"], True),
    "g": ("What color is the bowl?", "red", "query", "attr", "queryAttr", "color", [], True),
    "e": ("Do the cup and the plate have the same color?", "no", "compare", "attr", "sameColor", "color",
          ["c"], False),
}
ANSWERS = {"sky blue": "Yes.", "color is the sky": "blue", "side is the cup": "The right", "plate on the": "right",
           "in common": "material", "color is the bowl": "blue", "same color": "no"}
# validity: c ("the right") is invalid; f is valid by eval.py's "Common" rule alone -> 5/6.
# plausibility: c and g ("blue" for the bowl) are implausible -> 4/6. No entry for the unbalanced e.
CHOICES = {
    "a": {"valid": ["yes", "no"], "plausible": ["yes", "no"]},
    "b": {"valid": ["blue", "red", "green"], "plausible": ["blue", "red"]},
    "c": {"valid": ["left", "right"], "plausible": ["left", "right"]},
    "d": {"valid": ["left", "right"], "plausible": ["left", "right"]},
    "f": {"valid": ["color"], "plausible": ["color"]},
    "g": {"valid": ["red", "blue", "green"], "plausible": ["red", "green"]},
}


def _question(qid: str) -> dict[str, Any]:
    question, answer, structural, semantic, detailed, group, entailed, balanced = QUESTIONS[qid]
    return {
        "imageId": "n1", "question": question, "answer": answer, "fullAnswer": f"The answer is {answer}.",
        "isBalanced": balanced, "entailed": entailed, "equivalent": [qid],
        "groups": {"global": group, "local": f"local-{qid}"},
        "types": {"structural": structural, "semantic": semantic, "detailed": detailed},
    }


def _write(path: Path, obj: Any) -> str:
    path.write_text(json.dumps(obj))
    return str(path)


@pytest.fixture
def gqa(tmp_path: Path) -> dict[str, Any]:
    """The fixture's task config: questions, choices and the one image."""
    (tmp_path / "images").mkdir()
    Image.new("RGB", (8, 8), (40, 90, 200)).save(tmp_path / "images" / "n1.jpg")
    return {
        "data": _write(tmp_path / "testdev_all_questions.json", {q: _question(q) for q in QUESTIONS}),
        "choices": _write(tmp_path / "testdev_choices.json", CHOICES),
        "images": str(tmp_path / "images"),
    }


def _run(cfg: dict[str, Any], out: Path, scripted: Any) -> dict[str, Any]:
    task = EVAL_TASKS.build("gqa", cfg)
    return run_task(scripted(ANSWERS), task, EvalConfig(batch_size=2), out, dist=Dist(), progress=False)


def test_gqa_official_scores(gqa: dict[str, Any], scripted: Any, tmp_path: Path) -> None:
    m = _run(gqa, tmp_path / "out", scripted)
    # Balanced a, b, c, d, f, g: right a, b, d -> 3/6 (with the unbalanced e it would be 4/7).
    assert m["n"] == 6 and m["accuracy"] == 0.5
    # binary = not query: a (right), d (right), f (wrong); open = query: b (right), c, g (wrong).
    assert m["binary_accuracy"] == pytest.approx(2 / 3) and m["open_accuracy"] == pytest.approx(1 / 3)
    # e (compare, right) is not counted: compare = f alone.
    assert m["per_type"] == {"choose": 1.0, "compare": 0.0, "query": pytest.approx(1 / 3), "verify": 1.0}
    assert m["per_semantic_type"] == {"attr": pytest.approx(2 / 3), "obj": 0.0, "rel": 0.5}
    assert m["validity"] == pytest.approx(5 / 6) and m["plausibility"] == pytest.approx(4 / 6)
    # Right and with other entailed questions: a -> {b right, c wrong} = 1/2; b -> {e right} = 1
    # (an unbalanced question still counts as an entailed one); d's list holds only itself -> skipped.
    assert m["consistency"] == pytest.approx(3 / 4)
    # gold / predicted counts per group (a has no group, e is unbalanced):
    #   color  {blue 1, red 1} / {blue 2}              -> (2-1)^2/1 + (0-1)^2/1 = 2, weight 2
    #   side   {left 1, right 1} / {the right 1, right 1} -> (0-1)^2/1 + (1-1)^2/1 = 1, weight 2
    #   common {color 1} / {material 1}                -> 1, weight 1
    # -> (2*2 + 1*2 + 1*1) / 5 / 100.
    assert m["distribution"] == pytest.approx(7 / 5 / 100)
    assert m["protocol"]["dataset_revision"][1]["file"] == "testdev_choices.json"


def test_gqa_optional_scores_are_omitted(gqa: dict[str, Any], bench: Any, scripted: Any, tmp_path: Path) -> None:
    m = _run({**gqa, "choices": None}, tmp_path / "no-choices", scripted)
    assert "validity" not in m and "plausibility" not in m
    assert m["consistency"] == pytest.approx(3 / 4) and m["distribution"] == pytest.approx(7 / 500)
    # The LLaVA-style file without entailed, groups or isBalanced fields: accuracy scores only.
    plain = run_task(scripted({"sky": "Yes.", "cup": "right"}), EVAL_TASKS.build("gqa", bench("gqa")),
                     EvalConfig(), tmp_path / "plain", dist=Dist(), progress=False)
    assert not {"validity", "plausibility", "consistency", "distribution"} & set(plain)
    assert (plain["binary_accuracy"], plain["open_accuracy"]) == (1.0, 0.0)


def test_gqa_consistency_needs_every_entailed_question(gqa: dict[str, Any], scripted: Any, tmp_path: Path) -> None:
    # Without e (entailed by b) eval.py has no prediction to check b against: the score is left out.
    questions = {q: _question(q) for q in QUESTIONS if q != "e"}
    cfg = {**gqa, "data": _write(Path(gqa["data"]), questions)}
    m = _run(cfg, tmp_path / "out", scripted)
    assert "consistency" not in m and m["accuracy"] == 0.5


@pytest.mark.parametrize(("change", "error"), [
    (lambda c: c["b"].update(valid="blue"), r"testdev_choices\.json: \['b'\]: field 'valid' should be list"),
    (lambda c: c["g"].pop("plausible"), r"testdev_choices\.json: \['g'\]: missing field 'plausible'"),
    (lambda c: c["c"]["valid"].append(3), r"testdev_choices\.json: \['c'\]: field 'valid'\[2\] should be str"),
    (lambda c: c.pop("d"), r"testdev_choices\.json: no entry for question 'd'"),
])
def test_gqa_malformed_choices(gqa: dict[str, Any], change: Any, error: str) -> None:
    choices = json.loads(json.dumps(CHOICES))
    change(choices)
    _write(Path(gqa["choices"]), choices)
    with pytest.raises(EvalDataError, match=error):
        list(EVAL_TASKS.build("gqa", gqa).samples())


def test_gqa_choices_not_an_object(gqa: dict[str, Any]) -> None:
    _write(Path(gqa["choices"]), [CHOICES])
    with pytest.raises(EvalDataError, match=r"testdev_choices\.json: expected a JSON object"):
        list(EVAL_TASKS.build("gqa", gqa).samples())


def test_gqa_belongs_common_rule() -> None:
    assert gqa_belongs("shape", ["color"], "twoCommon") and not gqa_belongs("shape", ["color"], "twoSame")
    assert not gqa_belongs("red", ["red"], "twoCommon")  # the fixed group replaces the choices list


def test_gqa_consistency_and_distribution_edge_cases() -> None:
    # Wrong questions and questions entailing only themselves give no score: None, not eval.py's 0.
    assert gqa_consistency({"x": ["x"], "y": ["x"]}, {"x": True, "y": False}) is None
    assert gqa_distribution([(None, "yes", "no")]) is None
    # One group, gold {a 2, b 1}, predicted {a 1, c 2}: (1-2)^2/2 + (0-1)^2/1 = 1.5 -> 1.5 / 100.
    rows = [("g", "a", "a"), ("g", "a", "c"), ("g", "b", "c")]
    assert gqa_distribution(rows) == pytest.approx(0.015)
