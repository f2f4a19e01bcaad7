"""Goldens of the text-rich benchmark metrics, worked out by hand from the official scorers' rules."""

from __future__ import annotations

import pytest

from eval.doc_metrics import anls, levenshtein, ocrbench_hit, relaxed_accuracy


@pytest.mark.parametrize(
    ("prediction", "target", "expected"),
    [
        ("12.5", "12", 1.0),  # |12.5 - 12| / 12 = 4.17% <= 5%
        ("12.61", "12", 0.0),  # 5.08%
        ("105", "100", 1.0),  # exactly 5%: "<=" keeps it
        ("95", "100", 1.0),
        ("40%", "0.4", 1.0),  # a trailing '%' divides by 100
        ("40", "40%", 0.0),  # 40 vs 0.4
        ("1e2", "100", 1.0),  # Python float() syntax counts
        ("1,000", "1000", 0.0),  # ... a thousands comma does not: strings compared
        ("0", "0", 1.0),  # a zero target: string match
        ("0.0", "0", 0.0),
        ("Japan", "japan", 1.0),  # text: case-insensitive exact match
        ("Japan.", "Japan", 0.0),
        (" 12", "12", 1.0),  # float() ignores spaces round a number
    ],
)
def test_relaxed_accuracy(prediction: str, target: str, expected: float) -> None:
    assert relaxed_accuracy(prediction, target) == expected


def test_levenshtein() -> None:
    assert levenshtein("kitten", "sitting") == 3
    assert levenshtein("", "abc") == 3 and levenshtein("abc", "abc") == 0
    assert levenshtein("flaw", "lawn") == 2


@pytest.mark.parametrize(
    ("prediction", "answers", "expected"),
    [
        ("Kitten", ["kitten"], 1.0),  # lower-cased
        ("  the   cat ", ["the cat"], 1.0 - 0 / 12),  # whitespace runs collapse: distance 0
        ("kitten", ["sitting"], 1 - 3 / 7),  # 3 edits over 7 characters = 0.571..., kept
        ("ab", ["ax"], 0.5),  # NL = 1/2 exactly: 1 - 0.5 = 0.5 is not below tau, kept
        ("abc", ["axy"], 0.0),  # NL = 2/3: similarity 1/3 < 0.5 -> 0
        ("kitten", ["dog", "sitting", "kitten!"], 1 - 1 / 7),  # best answer: "kitten!" 1 edit / 7
        ("", [""], 1.0),  # both empty: distance 0 over length 0 counts as 0
        # The length is the unprocessed strings': "ab  " (4 chars) vs "abc": 1 edit ("ab" -> "abc") / 4.
        ("ab  ", ["abc"], 0.75),
    ],
)
def test_anls(prediction: str, answers: list[str], expected: float) -> None:
    assert anls(prediction, answers) == pytest.approx(expected, abs=1e-12)


def test_anls_needs_answers() -> None:
    with pytest.raises(ValueError, match="at least one"):
        anls("x", [])


@pytest.mark.parametrize(
    ("prediction", "answers", "dataset", "expected"),
    [
        ("The word is CENTRE.", ["centre"], "IIIT5K", 1.0),  # case folded, substring
        ("cent re", ["centre"], "IIIT5K", 0.0),  # inner spaces kept
        ("new\nyork city", ["New York"], "ctw", 1.0),  # newline -> space
        ("no match", ["a", "match"], "docVQA", 1.0),  # any answer
        ("x^2+1", ["x ^ 2"], "HME100k", 1.0),  # formulas: every space removed ...
        ("X^2+1", ["x ^ 2"], "HME100k", 0.0),  # ... case kept
        ("X^2", ["x^2"], "IIIT5K", 1.0),  # elsewhere case folded
    ],
)
def test_ocrbench_hit(prediction: str, answers: list[str], dataset: str, expected: float) -> None:
    assert ocrbench_hit(prediction, answers, dataset) == expected
