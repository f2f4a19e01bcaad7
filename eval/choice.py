"""Multiple-choice answer matching without an LLM judge, as the official toolkits do it.

* :func:`can_infer` — VLMEvalKit's rule matching (``vlmeval/utils/matching_util.py``, the step the
  MMBench evaluator runs before it would ask an LLM): first an option letter standing alone near the end
  of the answer (``can_infer_option``), else the one option whose text the answer contains
  (``can_infer_text``). VLMEvalKit's ``exact_matching`` mode (no judge) counts an answer this step cannot
  match as wrong; so do we.
* :func:`mmmu_choice` — MMMU's ``parse_multi_choice_response`` (MMMU-Benchmark/MMMU,
  ``mmmu/utils/eval_utils.py``): "(A)" forms, then " A " forms, then option text in long answers, the
  last occurrence winning; with no candidate the official script draws a random letter.
* :func:`options_block` — the "A. text" lines of the LLaVA-1.5 / lmms-eval prompts.
"""

from __future__ import annotations

import random
import re
import string
from collections.abc import Mapping, Sequence

LETTERS = string.ascii_uppercase
# VLMEvalKit: answers that refuse; they match the pseudo-option "Z", which is never the right answer.
REFUSALS = (
    "Sorry, I can't help with images of people yet.", "I can't process this file.",
    "I'm sorry, but without the image provided", "Cannot determine the answer",
)
REFUSED = "Z"
_SPLIT_CHARS = ".()[],:;!*#{}"  # replaced by spaces before the answer is split into words
_VERBOSE = re.compile(r"(?i)(?:correct\s+)?answer\s+is\s+\**([ABCD])\**")


def options_block(options: Sequence[str]) -> str:
    """``"A. first\\nB. second"``: one line per option, lettered from A."""
    return "\n".join(f"{LETTERS[k]}. {text}" for k, text in enumerate(options))


def lettered(options: Sequence[str]) -> dict[str, str]:
    """``{"A": first, "B": second, ...}``."""
    return {LETTERS[k]: text for k, text in enumerate(options)}


def can_infer_option(answer: str, choices: Mapping[str, str]) -> str | None:
    """The option letter an answer names: exactly one letter among its words, standing in its last
    four words (so a leading article "A ..." is not read as option A); else "the answer is X"."""
    if any(refusal in answer for refusal in REFUSALS):
        return REFUSED
    words = answer.translate(str.maketrans(_SPLIT_CHARS, " " * len(_SPLIT_CHARS))).split()
    named = [c for c in choices if c in words]
    if len(named) == 1 and words.index(named[0]) > len(words) - 5:
        return named[0]
    if not named and REFUSED in words:  # the answer names the pseudo-option "Z" and no real one
        return REFUSED
    verbose = _VERBOSE.search(answer)
    if verbose and verbose.group(1).upper() in choices:
        return verbose.group(1).upper()
    return None


def can_infer_text(answer: str, choices: Mapping[str, str]) -> str | None:
    """The one option whose text the (lower-cased) answer contains; None for an answer more than twice
    as long as all options together, or when none or several match."""
    answer = answer.lower()
    if len(answer) > 2 * sum(len(str(v)) for v in choices.values()):
        return None
    found = [k for k, v in choices.items() if str(v).lower() in answer]
    return found[0] if len(found) == 1 else None


def can_infer(answer: str, choices: Mapping[str, str]) -> str | None:
    """VLMEvalKit ``can_infer``: the letter an answer names, else the option it quotes, else None."""
    return can_infer_option(answer, choices) or can_infer_text(answer, choices)


def _mmmu_candidates(padded: str, choices: Mapping[str, str]) -> tuple[list[str], list[int]]:
    """Candidate letters and where each last occurs, by the first rule of MMMU's that finds any."""
    bracketed = [c for c in choices if f"({c})" in padded]
    if bracketed:
        return bracketed, [padded.rfind(f"({c})") for c in bracketed]
    spaced = [c for c in choices if f" {c} " in padded]
    if spaced:
        return spaced, [padded.rfind(f" {c} ") for c in spaced]
    if len(padded.split()) > 5:  # a long answer: look for an option's text
        quoted = [c for c, text in choices.items() if text.lower() in padded.lower()]
        return quoted, [padded.lower().rfind(choices[c].lower()) for c in quoted]
    return [], []


def mmmu_choice(response: str, choices: Mapping[str, str], seed: str) -> tuple[str, bool]:
    """MMMU ``parse_multi_choice_response``: ``(letter, guessed)``.

    The response loses leading/trailing ``,.!?;:'`` and is padded with spaces; among the candidates the
    last one in the response wins. With none, the official script draws ``random.choice`` from one
    stream seeded 42 for the whole run, so a sample's guess depends on the order of the run; here it is
    drawn from a stream seeded by ``seed`` (the sample id), the same whatever the batch order.
    """
    for char in ",.!?;:'":
        response = response.strip(char)
    candidates, positions = _mmmu_candidates(f" {response} ", choices)
    if not candidates:
        return random.Random(seed).choice(sorted(choices)), True
    return candidates[positions.index(max(positions))], False
