"""Metrics of text-rich image benchmarks as pure functions, each following its official scorer.

* ChartQA relaxed accuracy (Masry et al., 2022, arXiv:2203.10244, Sec. 5.1, after Methani et al., 2020):
  a numeric answer is right within 5% relative error of the gold number, any other answer needs an
  exact (case-insensitive) match; written as lmms-eval's ``relaxed_correctness`` (from Qwen-VL's
  ``evaluate_vqa.py``), quirks included.
* ANLS (Biten et al., 2019, arXiv:1905.13648, Eq. 1; DocVQA, Mathew et al., 2021, arXiv:2007.00398):
  ``s = max_j (1 - NL(a_j, o))``, set to 0 when below tau = 0.5, with NL the Levenshtein distance over the
  longer string's length, as the RRC DocVQA scoring script computes it.
* OCRBench (Liu et al., 2024, arXiv:2305.07895; the official ``scripts/*.py`` scoring loop): 1 when an
  answer occurs in the prediction after case folding; HME100k (formulas) case-sensitive with all spaces
  removed. The benchmark score is the count of hits, out of 1000.
"""

from __future__ import annotations

from collections.abc import Sequence

ANLS_THRESHOLD = 0.5
CHARTQA_TOLERANCE = 0.05


def _relaxed_float(text: str) -> float | None:
    """``float(text)``, a trailing '%' (all of them: ``rstrip``) dividing by 100; None when not a number."""
    try:
        return float(text.rstrip("%")) / 100.0 if text.endswith("%") else float(text)
    except ValueError:
        return None


def relaxed_accuracy(prediction: str, target: str, tolerance: float = CHARTQA_TOLERANCE) -> float:
    """ChartQA's relaxed correctness of one prediction (1.0 or 0.0).

    Both parse as numbers (Python ``float``: "1e3" and " 12 " count, "1,000" does not; "12%" is 0.12)
    and the target is not 0: right iff ``|p - t| / |t| <= tolerance``. Otherwise, a target of 0 included,
    the strings must match ignoring case (no stripping: the caller strips the model's text).
    """
    p, t = _relaxed_float(prediction), _relaxed_float(target)
    if p is not None and t:
        return float(abs(p - t) / abs(t) <= tolerance)
    return float(prediction.lower() == target.lower())


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions of one character each cost 1)."""
    if len(a) > len(b):
        a, b = b, a
    previous = list(range(len(a) + 1))
    for j, cb in enumerate(b, 1):
        current = [j]
        for i, ca in enumerate(a, 1):
            current.append(min(previous[i] + 1, current[i - 1] + 1, previous[i - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def anls(prediction: str, answers: Sequence[str], threshold: float = ANLS_THRESHOLD) -> float:
    """Average Normalised Levenshtein Similarity of one prediction against its answers.

    As the RRC script: both strings lower-cased with runs of whitespace collapsed to one space; the
    distance divided by the longer of the two *unprocessed* strings (``len(x.upper())``); the best answer
    kept; a similarity below ``threshold`` scores 0 (exactly 0.5 is kept, 0.5). Two empty strings score 1.
    """
    if not answers:
        raise ValueError("ANLS needs at least one reference answer")
    det = " ".join(prediction.strip().lower().split())
    distances = []
    for answer in answers:
        gt = " ".join(answer.strip().lower().split())
        length = max(len(answer.upper()), len(prediction.upper()))
        distances.append(levenshtein(gt, det) / length if length else 0.0)
    similarity = 1.0 - min(distances)
    return 0.0 if similarity < threshold else similarity


OCRBENCH_FORMULA_SET = "HME100k"  # the handwritten-formula source scored without case folding
OCRBENCH_RECOGNITION = (  # the six categories summed as "Text Recognition" (out of 300)
    "Regular Text Recognition", "Irregular Text Recognition", "Artistic Text Recognition",
    "Handwriting Recognition", "Digit String Recognition", "Non-Semantic Text Recognition",
)


def ocrbench_hit(prediction: str, answers: Sequence[str], dataset_name: str) -> float:
    """OCRBench's score of one prediction: 1.0 when some answer is a substring of the prediction.

    HME100k: answer and prediction stripped, newlines -> spaces, then every space removed; case kept.
    Every other source: lower-cased, stripped, newlines -> spaces (inner spaces kept).
    """
    if dataset_name == OCRBENCH_FORMULA_SET:
        def norm(text: str) -> str:
            return text.strip().replace("\n", " ").replace(" ", "")
    else:
        def norm(text: str) -> str:
            return text.lower().strip().replace("\n", " ")
    predicted = norm(prediction)
    return float(any(norm(a) in predicted for a in answers))
