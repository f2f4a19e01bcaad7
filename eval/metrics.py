"""Evaluation metrics as pure functions, each matching an official scorer.

* VQA accuracy (VQAv2 ``vqaEval.py``, GT-Vision-Lab/VQA at a013f00, "Fixed processing answers bug",
  2021): unless the human answers all agree, the prediction and every answer are normalised by
  ``processPunctuation`` then ``processDigitArticle``; the accuracy against the answers ``a_1..a_n``
  (n = 10) is the mean over the n leave-one-out subsets ``acc = 1/n * sum_i min(1, #{j != i : a_j == pred} / 3)``
  (Antol et al., 2015, arXiv:1505.00468, Sec. 2).
* TextVQA accuracy (LLaVA's ``m4c_evaluator.TextVQAAccuracyEvaluator``, from MMF/EvalAI): the same
  leave-one-out formula, with the EvalAI answer processor applied to the prediction *and* every answer.
* VizWiz accuracy (the VizWiz challenge's vqaEval.py): the same formula; the prediction always processed,
  the answers as stored. AI2D multiple choice as lmms-eval scores it (leading-letter filter, exact match
  ignoring case and punctuation). ChartQA, DocVQA and OCRBench metrics live in ``eval/doc_metrics.py``.
* GQA (LLaVA ``convert_gqa_for_eval.py`` + GQA ``eval.py`` v1.2, gqadataset.org): exact match, the
  binary/open split, validity and plausibility (``belongs``), consistency over entailed questions and the
  chi-square answer-distribution score. ScienceQA letter extraction
  (LLaVA ``eval_science_qa.py``), POPE yes/no parsing and acc/precision/recall/F1/yes-ratio
  (LLaVA ``eval_pope.py``), box IoU and Acc@threshold (RefCOCO REC: a hit iff IoU >= 0.5).
"""

from __future__ import annotations

import re
import string
from collections import Counter, defaultdict
from collections.abc import Collection, Iterable, Mapping, Sequence
from fractions import Fraction

Box = tuple[float, float, float, float]

# --- the official VQA normalisation tables (vqaEval.py, copied key for key) ----------------------
CONTRACTIONS: dict[str, str] = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've",
    "hasnt": "hasn't", "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've",
    "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've",
    "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've",
    "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've",
    "werent": "weren't", "whatll": "what'll", "whatre": "what're", "whats": "what's",
    "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's",
    "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're",
    "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've",
    "youll": "you'll", "youre": "you're", "youve": "you've",
}
NUMBER_WORDS: dict[str, str] = {  # vqaEval.py's ``manualMap``
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
ARTICLES = ("a", "an", "the")
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@",
               "`", ",", "?", "!")
# ``(?!<=\d)`` is the official script's typo for a look-behind: as written it is a look-ahead that can
# never match at a '.', so the rule is "drop every '.' not followed by a digit" ("3.5" keeps its point).
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(\,)(\d)")
# The official call is ``periodStrip.sub("", text, re.UNICODE)``: the flag lands in ``count``, so at
# most re.UNICODE == 32 periods are removed. Kept for exactness.
_PERIOD_COUNT = 32


def process_punctuation(text: str) -> str:
    """vqaEval.py ``processPunctuation``.

    Each punctuation mark is deleted when it touches a space anywhere in the text, or when the text has
    a digit-comma-digit group ("1,000" -> "1000"); otherwise it becomes a space ("yes/no" -> "yes no").
    Then every '.' not followed by a digit is deleted.
    """
    out = text
    has_number_comma = _COMMA_STRIP.search(text) is not None
    for p in PUNCTUATION:
        if p + " " in text or " " + p in text or has_number_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, count=_PERIOD_COUNT)


def process_digit_article(text: str) -> str:
    """vqaEval.py ``processDigitArticle``: lower-case, number words -> digits, drop articles, contractions."""
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def strip_vqa_whitespace(text: str) -> str:
    """What vqaEval.py does to every answer and prediction first: newlines and tabs -> spaces, strip."""
    return text.replace("\n", " ").replace("\t", " ").strip()


def normalize_vqa_answer(text: str) -> str:
    """The full official VQA processing of one answer: whitespace, punctuation, digits/articles/contractions."""
    return process_digit_article(process_punctuation(strip_vqa_whitespace(text)))


def evalai_normalize(text: str) -> str:
    """EvalAI/MMF ``EvalAIAnswerProcessor`` (LLaVA ``m4c_evaluator.py``; also LLaVA's VQAv2 submission).

    Differs from :func:`normalize_vqa_answer` by a first ``word_tokenize`` step: lower-case, delete
    every ',' and '?', split "'s" off its word. (Its comma regex ``(?<=\\d)(\\,)+(?=\\d)`` differs from
    vqaEval's, but no comma survives ``word_tokenize``, so :func:`process_punctuation` gives the same result.)
    """
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    return normalize_vqa_answer(text)


def _leave_one_out(prediction: str, answers: Sequence[str]) -> float:
    """``1/n * sum_i min(1, #{j != i : answers[j] == prediction} / 3)``, computed in exact fractions."""
    if not answers:
        raise ValueError("VQA accuracy needs at least one reference answer")
    matches = sum(a == prediction for a in answers)
    total = Fraction(0)
    for a in answers:
        # Leaving out answer i removes one match exactly when answer i itself matches. (vqaEval.py drops
        # the answer records unequal to record i; VQAv2 records carry distinct ``answer_id``s, so one.)
        total += min(Fraction(1), Fraction(matches - (a == prediction), 3))
    return float(total / len(answers))


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQA accuracy of one prediction, as vqaEval.py (GT-Vision-Lab/VQA, commit a013f00, 2021) computes it.

    Both sides first get :func:`strip_vqa_whitespace`. Then, only when the answers (so stripped) are not
    all identical, the prediction *and* every answer get ``processPunctuation`` and
    ``processDigitArticle`` (:func:`normalize_vqa_answer`). When all answers agree, neither side is
    processed further: the prediction must equal the answer as written ("Two" or "yes." score 0 against
    ten "2" or ten "yes"). Then the leave-one-out mean of ``min(1, matches / 3)``.
    """
    pred = strip_vqa_whitespace(prediction)
    gts = [strip_vqa_whitespace(a) for a in answers]
    if len(set(gts)) > 1:
        pred = normalize_vqa_answer(pred)
        gts = [normalize_vqa_answer(a) for a in gts]
    return _leave_one_out(pred, gts)


def vizwiz_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VizWiz-VQA accuracy as the VizWiz challenge's ``vqaEval.py`` (VizWiz VQA API; Gurari et al., 2018,
    arXiv:1802.08218) computes it.

    Unlike VQAv2's script: the prediction always gets the full processing (:func:`normalize_vqa_answer`,
    whatever the answers), and the answers are compared exactly as stored (no stripping, no processing).
    "unanswerable" is an answer like any other. Leave-one-out by position, as in :func:`vqa_accuracy`.
    """
    return _leave_one_out(normalize_vqa_answer(prediction), list(answers))


def textvqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """TextVQA accuracy as LLaVA's m4c ``TextVQAAccuracyEvaluator``: EvalAI-normalise both sides, then VQA."""
    return _leave_one_out(evalai_normalize(prediction), [evalai_normalize(a) for a in answers])


def exact_match(prediction: str, answer: str) -> float:
    """GQA accuracy of one prediction: LLaVA's ``text.rstrip('.').lower()`` (after the usual strip)
    compared verbatim with the official answer, as GQA's ``eval.py`` does (``prediction == gold``)."""
    return float(prediction.strip().rstrip(".").lower() == answer)


# --- GQA eval.py (v1.2) beyond accuracy ------------------------------------------------------------
# eval.py ``belongs``: a question whose detailed type names "Common" ("What do the two objects have in
# common?") accepts any of these three answers as valid and plausible, whatever its choices entry says.
GQA_COMMON_ANSWERS = ("color", "material", "shape")


def gqa_answer_type(structural_type: str) -> str:
    """eval.py: ``"open"`` when ``types.structural == "query"``, else ``"binary"`` (verify, logical,
    choose, compare: the answer is yes/no or one of the named options)."""
    return "open" if structural_type == "query" else "binary"


def gqa_belongs(prediction: str, answers: Collection[str], detailed_type: str) -> bool:
    """eval.py ``belongs``: the prediction is one of ``answers`` (the choices file's ``valid`` or
    ``plausible`` list of the question), or of :data:`GQA_COMMON_ANSWERS` for a "Common" question."""
    return prediction in (GQA_COMMON_ANSWERS if "Common" in detailed_type else answers)


def gqa_consistency(entailed: Mapping[str, Sequence[str]], correct: Mapping[str, bool]) -> float | None:
    """eval.py ``updateConsistency``, averaged: for each scored question q answered correctly whose
    entailed questions E_q (q itself left out) are not empty, the accuracy over E_q; the mean over those q.

    ``entailed`` maps each scored (balanced) question to its ``entailed`` ids; ``correct`` holds every
    question, as entailed questions need not be balanced. None when no question qualifies (eval.py's
    ``avg`` would give 0).
    """
    per_question = []
    for qid, ids in entailed.items():
        inferred = [e for e in ids if e != qid]
        if correct[qid] and inferred:
            per_question.append(sum(correct[e] for e in inferred) / len(inferred))
    return sum(per_question) / len(per_question) if per_question else None


def _chi_square(expected: Mapping[str, int], observed: Mapping[str, int]) -> float:
    """eval.py ``chiSquare`` for one group: sum over the gold answers a of (O_a - E_a)^2 / E_a (predicted
    answers that are never gold in the group add nothing)."""
    return sum((observed.get(a, 0) - e) ** 2 / e for a, e in expected.items())


def gqa_distribution(rows: Iterable[tuple[str | None, str, str]]) -> float | None:
    """eval.py's distribution score (lower is better) from ``(groups.global, gold, prediction)`` rows.

    Per global group, the chi-square of the predicted answer counts against the gold answer counts;
    the mean over groups weighted by each group's number of questions, divided by 100 as eval.py does
    (it prints this value unscaled: it is not a percentage). Questions whose group is None are left out.
    None when no question has a group (eval.py would divide by zero).
    """
    gold: dict[str, Counter[str]] = defaultdict(Counter)
    predicted: dict[str, Counter[str]] = defaultdict(Counter)
    for group, answer, prediction in rows:
        if group is not None:
            gold[group][answer] += 1
            predicted[group][prediction] += 1
    total = sum(c.total() for c in gold.values())
    if not total:
        return None
    return sum(_chi_square(gold[g], predicted[g]) * gold[g].total() for g in gold) / total / 100


# --- boxes ---------------------------------------------------------------------------------------
BOX_CONVENTIONS = ("0-1000", "0-1", "pixels")
_NUM = r"(-?(?:\d+\.?\d*|\.\d+))"
_BOX_RE = re.compile(r"\s*,\s*".join([_NUM] * 4))
_SCALE = {"0-1000": 1000.0, "0-1": 1.0}


def parse_box(text: str, convention: str = "0-1000", image_size: tuple[int, int] | None = None) -> Box | None:
    """The first ``x1, y1, x2, y2`` group of four comma-separated numbers in ``text`` (brackets optional).

    Conventions: ``"0-1000"`` integers or ``"0-1"`` floats relative to the image the model saw, or
    ``"pixels"``. Returns xyxy in the convention's own units when ``image_size`` is None; with
    ``image_size=(width, height)`` a relative box is scaled to pixels of that image (a ``"pixels"`` box is
    returned as written). None when the text holds no such group (an unparsable answer scores as a miss).
    """
    if convention not in BOX_CONVENTIONS:
        raise ValueError(f"box convention: expected one of {list(BOX_CONVENTIONS)}, got {convention!r}")
    match = _BOX_RE.search(text)
    if match is None:
        return None
    x1, y1, x2, y2 = (float(v) for v in match.groups())
    if image_size is None or convention == "pixels":
        return (x1, y1, x2, y2)
    s = _SCALE[convention]
    w, h = image_size
    return (x1 / s * w, y1 / s * h, x2 / s * w, y2 / s * h)


def xywh_to_xyxy(box: Sequence[float]) -> Box:
    """COCO ``[x, y, width, height]`` -> ``(x1, y1, x2, y2)``."""
    x, y, w, h = (float(v) for v in box)
    return (x, y, x + w, y + h)


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two xyxy boxes (continuous coordinates, no +1; inverted sides count as 0)."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih

    def area(r: Sequence[float]) -> float:
        return max(0.0, r[2] - r[0]) * max(0.0, r[3] - r[1])

    union = area(a) + area(b) - inter
    return inter / union if union > 0 else 0.0


def grounding_hit(pred: Sequence[float] | None, gt: Sequence[float], threshold: float = 0.5) -> float:
    """1.0 when the predicted box overlaps the target with IoU >= threshold; an unparsed box (None) misses."""
    return float(pred is not None and box_iou(pred, gt) >= threshold)


def grounding_accuracy(
    pred_boxes: Sequence[Sequence[float] | None], gt_boxes: Sequence[Sequence[float]], threshold: float = 0.5
) -> float:
    """Acc@threshold: the fraction of predictions with IoU >= threshold against their target box."""
    if len(pred_boxes) != len(gt_boxes):
        raise ValueError(f"grounding_accuracy: {len(pred_boxes)} predictions for {len(gt_boxes)} targets")
    if not gt_boxes:
        raise ValueError("grounding_accuracy: no boxes")
    return sum(grounding_hit(p, g, threshold) for p, g in zip(pred_boxes, gt_boxes, strict=True)) / len(gt_boxes)


# --- multiple choice and yes/no -------------------------------------------------------------------
SCIENCEQA_OPTIONS = ("A", "B", "C", "D", "E")
# The official script tries "The answer is X." first, then "The answer is X" (they differ on texts
# naming two letters).
_ANSWER_IS = (re.compile(r"The answer is ([A-E])\."), re.compile(r"The answer is ([A-E])"))


def scienceqa_choice(prediction: str, n_choices: int) -> int | None:
    """The chosen option index, as LLaVA ``eval_science_qa.py`` extracts it; None = FAILED.

    Accepted: the bare letter, a leading "X. ", or "The answer is X" anywhere; the letter must name one of
    the problem's ``n_choices`` options.
    """
    text = prediction.replace("\n", ". ")
    letter: str | None = None
    if text.strip() in SCIENCEQA_OPTIONS:
        letter = text.strip()
    elif len(text) >= 3 and text[0] in SCIENCEQA_OPTIONS and text[1:3] == ". ":
        letter = text[0]
    else:
        matches = (m for m in (rx.search(text) for rx in _ANSWER_IS) if m is not None)
        letter = next((m.group(1) for m in matches), None)
    if letter is None or letter not in SCIENCEQA_OPTIONS[:n_choices]:
        return None
    return SCIENCEQA_OPTIONS.index(letter)


# lmms-eval's ``MultiChoiceRegexFilter`` (ai2d/utils.py): a leading "X." gives the letter X.
_LEADING_LETTER = re.compile(r"^\s*([A-Z])\.")
_PUNCTUATION_TABLE = str.maketrans("", "", string.punctuation)


def lmms_choice_filter(text: str) -> str:
    """lmms-eval's AI2D answer filter: the letter of a leading "X." (spaces before it allowed), else the
    whole response unchanged."""
    match = _LEADING_LETTER.match(text)
    return match.group(1) if match else text


def lmms_exact_match(prediction: str, target: str) -> float:
    """lmms-eval ``exact_match`` with ``ignore_case`` and ``ignore_punctuation``: both sides lower-cased and
    stripped of ``string.punctuation``, then compared whole (whitespace is kept: " b" != "b")."""
    return float(prediction.lower().translate(_PUNCTUATION_TABLE) == target.lower().translate(_PUNCTUATION_TABLE))


def pope_answer_is_yes(prediction: str) -> bool:
    """LLaVA ``eval_pope.py``: keep the first sentence, drop commas; "no" iff a word is No/no/not."""
    text = prediction.split(".")[0] if "." in prediction else prediction
    words = text.replace(",", "").split(" ")
    return not ("No" in words or "not" in words or "no" in words)


def pope_metrics(predicted_yes: Sequence[bool], label_yes: Sequence[bool]) -> dict[str, float]:
    """POPE accuracy, precision, recall, F1 (positive class = "yes") and yes-ratio of the predictions.

    Where the official script would divide by zero (no predicted or no true "yes"), the value is 0.0.
    """
    if len(predicted_yes) != len(label_yes) or not label_yes:
        raise ValueError(f"pope_metrics: {len(predicted_yes)} predictions for {len(label_yes)} labels")
    tp = sum(p and t for p, t in zip(predicted_yes, label_yes, strict=True))
    fp = sum(p and not t for p, t in zip(predicted_yes, label_yes, strict=True))
    tn = sum(not p and not t for p, t in zip(predicted_yes, label_yes, strict=True))
    fn = sum(not p and t for p, t in zip(predicted_yes, label_yes, strict=True))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": (tp + tn) / len(label_yes), "precision": precision, "recall": recall, "f1": f1,
        "yes_ratio": sum(predicted_yes) / len(predicted_yes),
    }
