"""Metric goldens: every expected value is worked out by hand from the official scorers' rules."""

from __future__ import annotations

import pytest

from eval.metrics import (
    box_iou,
    evalai_normalize,
    exact_match,
    grounding_accuracy,
    normalize_vqa_answer,
    parse_box,
    pope_answer_is_yes,
    pope_metrics,
    process_punctuation,
    scienceqa_choice,
    textvqa_accuracy,
    vizwiz_accuracy,
    vqa_accuracy,
    xywh_to_xyxy,
)


# --- VQA normalisation -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("yes/no", "yes no"),  # '/' touches no space: becomes a space
        ("hello, world", "hello world"),  # ', ' touches a space: deleted
        ("x,y", "x y"),
        ("1,000", "1000"),  # a digit-comma-digit group: every mark is deleted, none becomes a space
        ("end.", "end"),  # '.' not followed by a digit is dropped ...
        ("3.5", "3.5"),  # ... one followed by a digit stays
        ("Mr. Smith", "mr smith"),
        ("Two", "2"),  # number words -> digits
        ("none", "0"),
        ("ten dogs", "10 dogs"),
        ("eleven", "eleven"),  # the map stops at ten
        ("The red ball", "red ball"),  # articles dropped
        ("an apple", "apple"),
        ("dont", "don't"),  # contractions table
        ("isnt it", "isn't it"),
        ("Im", "im"),  # lower-cased before the lookup, so the table's "Im" never applies (official quirk)
        (" yes\n", "yes"),
        ("a b-c", "b c"),
    ],
)
def test_normalize_vqa_answer(raw: str, expected: str) -> None:
    assert normalize_vqa_answer(raw) == expected


def test_period_strip_stops_after_32_like_the_official_call() -> None:
    # vqaEval.py passes re.UNICODE (== 32) as re.sub's count: 40 dots lose only 32.
    assert process_punctuation("x" + "." * 40) == "x" + "." * 8


def test_evalai_processor_differs_where_its_word_tokenize_acts() -> None:
    assert evalai_normalize("What's up?") == "what 's up"  # "'s" split off, '?' deleted
    assert normalize_vqa_answer("What's up?") == "what's up"
    assert evalai_normalize("Coca-Cola, Two") == "coca cola 2"


# --- VQA accuracy ----------------------------------------------------------------------------------
def test_two_of_ten_humans_gives_0_6_exactly() -> None:
    # 10 leave-one-out subsets. Dropping one of the 2 matching humans leaves 1 match: min(1, 1/3) = 1/3
    # (2 subsets). Dropping one of the 8 others leaves 2 matches: 2/3 (8 subsets).
    # Mean = (2 * 1/3 + 8 * 2/3) / 10 = (2/3 + 16/3) / 10 = 6 / 10 = 0.6.
    answers = ["2", "2"] + ["3"] * 8
    assert vqa_accuracy("two", answers) == 0.6


@pytest.mark.parametrize(
    ("n_match", "expected"),
    # 0: 0. 1: dropping the match -> 0 (1 subset), else 1/3 (9) -> 3/10. 3: 2/3 (3) and 1 (7) -> 9/10.
    # 4 or more: every subset keeps >= 3 matches -> 1. (10 matches: all agree, see below.)
    [(0, 0.0), (1, 0.3), (3, 0.9), (4, 1.0), (9, 1.0)],
)
def test_vqa_accuracy_leave_one_out(n_match: int, expected: float) -> None:
    answers = ["cat"] * n_match + ["dog"] * (10 - n_match)
    assert vqa_accuracy("A cat.", answers) == pytest.approx(expected, abs=1e-12)


def test_vqa_all_ten_agree_compares_stripped_text_only() -> None:
    # vqaEval.py (a013f00): with one distinct answer neither side is punctuation/digit/article processed;
    # only newlines/tabs -> spaces and strip apply.
    assert vqa_accuracy("cat", ["cat"] * 10) == 1.0
    assert vqa_accuracy(" cat\n", ["cat"] * 10) == 1.0
    assert vqa_accuracy("A cat.", ["cat"] * 10) == 0.0  # article and period stay on the prediction
    assert vqa_accuracy("Two", ["2"] * 10) == 0.0  # no number-word map, no lower-casing
    assert vqa_accuracy("2", ["two"] * 10) == 0.0  # ... nor on the answers
    assert vqa_accuracy("two", ["two"] * 10) == 1.0
    assert vqa_accuracy("red blue", ["red-blue"] * 10) == 0.0  # '-' kept on the answers
    assert vqa_accuracy("red blue", ["red-blue\t"] + ["red-blue"] * 9) == 0.0  # identical once stripped


@pytest.mark.parametrize(
    ("prediction", "answers", "expected"),
    [
        # Once the answers disagree, both sides are fully processed. 3 of 10 match -> 9/10, 2 -> 6/10.
        ("2", ["two"] * 3 + ["3"] * 7, 0.9),  # answer number words -> digits
        ("Two", ["2"] * 3 + ["3"] * 7, 0.9),  # prediction lower-cased, then mapped
        ("none", ["0"] * 2 + ["1"] * 8, 0.6),  # "none" -> "0"
        ("cat", ["the cat"] * 3 + ["dog"] * 7, 0.9),  # articles dropped from the answers
        ("An apple", ["apple"] * 2 + ["pear"] * 8, 0.6),  # ... and from the prediction
        ("red blue", ["red-blue"] * 4 + ["green"] * 6, 1.0),  # '-' touching no space -> ' '
        ("1000", ["1,000"] * 2 + ["2000"] * 8, 0.6),  # digit-comma-digit: every mark deleted
        ("1,000", ["1000"] * 2 + ["2000"] * 8, 0.6),
        ("yes.", ["yes"] * 3 + ["no"] * 7, 0.9),  # '.' not followed by a digit dropped
        ("3.5", ["3.5"] * 3 + ["35"] * 7, 0.9),  # '.' followed by a digit kept: "3.5" != "35"
        ("dont", ["don't"] * 2 + ["no"] * 8, 0.6),  # contractions table on the prediction
        ("don't", ["dont"] * 2 + ["no"] * 8, 0.6),  # ... and on the answers
        ("Im", ["I'm"] * 3 + ["me"] * 7, 0.0),  # "im" (lower-cased before lookup) vs "i'm"
    ],
)
def test_vqa_disagreeing_answers_normalise_both_sides(prediction: str, answers: list[str], expected: float) -> None:
    assert vqa_accuracy(prediction, answers) == pytest.approx(expected, abs=1e-12)


def test_vizwiz_accuracy_processes_the_prediction_only() -> None:
    # The VizWiz script: prediction always fully processed, answers compared as stored.
    assert vizwiz_accuracy("Two", ["2"] * 10) == 1.0  # vqa_accuracy gives 0 here (all ten agree)
    assert vizwiz_accuracy("2", ["two"] * 10) == 0.0  # "two" on the answer side is not mapped
    assert vizwiz_accuracy("Unanswerable.", ["unanswerable"] * 10) == 1.0
    assert vizwiz_accuracy("cat", [" cat"] * 10) == 0.0  # answers not even stripped
    # 2 of 10: dropping one of the 2 leaves 1/3 (2 subsets), else 2/3 (8 subsets) -> 0.6.
    assert vizwiz_accuracy("A red-blue", ["red blue"] * 2 + ["red-blue"] * 8) == pytest.approx(0.6)


def test_textvqa_accuracy_normalises_both_sides() -> None:
    assert textvqa_accuracy("2", ["two"] * 10) == 1.0
    # 3 of 10 "Coca-Cola" -> "coca cola": 9/10 as in the leave-one-out table above.
    assert textvqa_accuracy("Coca Cola", ["Coca-Cola"] * 3 + ["coke"] * 7) == pytest.approx(0.9)


def test_vqa_accuracy_needs_answers() -> None:
    with pytest.raises(ValueError, match="at least one"):
        vqa_accuracy("yes", [])


def test_exact_match_gqa() -> None:
    assert exact_match("Yes.", "yes") == 1.0
    assert exact_match(" left \n", "left") == 1.0
    assert exact_match("the left", "left") == 0.0
    assert exact_match("left", "Left") == 0.0  # the gold answer is compared verbatim


# --- boxes -----------------------------------------------------------------------------------------
def test_parse_box_conventions() -> None:
    assert parse_box("[100, 200, 300, 400]") == (100.0, 200.0, 300.0, 400.0)
    assert parse_box("[100, 200, 300, 400]", "0-1000", (640, 480)) == pytest.approx((64, 96, 192, 192))
    assert parse_box("[0.1, 0.2, 0.5, 1.0]", "0-1", (200, 100)) == pytest.approx((20, 20, 100, 100))
    assert parse_box("(10,20,30,40)", "pixels", (999, 999)) == (10.0, 20.0, 30.0, 40.0)
    assert parse_box("The box is 12.5, 3, 40, 50.", "pixels") == (12.5, 3.0, 40.0, 50.0)
    assert parse_box("[.5, 0, 1, 1] and [0, 0, 0, 0]", "0-1") == (0.5, 0.0, 1.0, 1.0)  # the first group


@pytest.mark.parametrize("text", ["no box here", "[1, 2, 3]", "", "[a, b, c, d]"])
def test_parse_box_unparsable(text: str) -> None:
    assert parse_box(text) is None


def test_parse_box_rejects_unknown_convention() -> None:
    with pytest.raises(ValueError, match="convention"):
        parse_box("[1, 2, 3, 4]", "0-100")


def test_box_iou_hand_computed() -> None:
    assert box_iou((0, 0, 10, 10), (5, 5, 15, 15)) == pytest.approx(25 / 175)  # inter 5x5, union 100+100-25
    assert box_iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert box_iou((0, 0, 10, 10), (10, 0, 20, 10)) == 0.0  # touching edges
    assert box_iou((0, 0, 10, 10), (0, 0, 10, 5)) == 0.5
    assert box_iou((5, 5, 5, 5), (5, 5, 5, 5)) == 0.0  # empty union
    assert box_iou((10, 10, 0, 0), (0, 0, 10, 10)) == 0.0  # an inverted box has no area
    assert xywh_to_xyxy([10, 20, 30, 40]) == (10.0, 20.0, 40.0, 60.0)


def test_grounding_accuracy() -> None:
    gt = [(0, 0, 10, 10)] * 4
    preds = [(0, 0, 10, 10), (5, 5, 15, 15), None, (0, 0, 10, 5)]  # IoU 1, 1/7, unparsed, exactly 0.5
    assert grounding_accuracy(preds, gt) == 0.5  # hits: IoU 1 and IoU 0.5 (>= threshold)
    assert grounding_accuracy(preds, gt, threshold=0.6) == 0.25
    with pytest.raises(ValueError, match="3 predictions for 4"):
        grounding_accuracy(preds[:3], gt)


# --- ScienceQA and POPE ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "n_choices", "expected"),
    [
        ("B", 3, 1),
        (" C ", 3, 2),
        ("B. blue", 3, 1),
        ("A\nbecause", 2, 0),  # the newline becomes ". ": "A. because"
        ("The answer is C.", 3, 2),
        ("The answer is B and The answer is C.", 4, 2),  # the "X." pattern is tried first
        ("D", 3, None),  # not one of this problem's options
        ("I think A", 4, None),
        ("", 2, None),
    ],
)
def test_scienceqa_choice(text: str, n_choices: int, expected: int | None) -> None:
    assert scienceqa_choice(text, n_choices) == expected


@pytest.mark.parametrize(
    ("text", "is_yes"),
    [
        ("Yes, there is a dog.", True),
        ("No.", False),
        ("There is not a cat", False),
        ("no, but. No", False),  # first sentence "no, but"
        ("Yes. No", True),  # only the first sentence counts
        ("NO", True),  # official quirk: only "No", "no", "not" count as negative words
    ],
)
def test_pope_answer_is_yes(text: str, is_yes: bool) -> None:
    assert pope_answer_is_yes(text) is is_yes


def test_pope_metrics_hand_computed() -> None:
    # TP = 2 (items 0, 4), FP = 1 (item 1), TN = 1 (item 2), FN = 1 (item 3).
    m = pope_metrics([True, True, False, False, True], [True, False, False, True, True])
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3)
    assert m["yes_ratio"] == pytest.approx(3 / 5)
    assert pope_metrics([False, False], [True, False])["precision"] == 0.0  # no predicted yes
