"""Reasoning chains in model outputs: the answer is what follows the ``<think> … </think>`` chain.

Reasoning LLMs trained in the DeepSeek-R1 style (DeepSeek-AI, 2025, arXiv 2501.12948, §2.2.3 and
Table 1: the reasoning process enclosed in ``<think> </think>`` before the answer) write a chain
first, and so does an MLLM that merges one in (FRANK: Wei & Chen, 2025, arXiv 2505.16151). Every task scores the answer, never the chain: the runner (``eval/runner.py``)
applies :func:`split_reasoning` to each output before the task's ``parse``, so present and future
tasks need no code of their own for it.

The cases, decided by where the last closing tag lies:

* no tag at all: no chain; the text is the answer, untouched (a task parses what it always parsed);
* ``<think> chain </think> answer``: the answer is the text after the last ``</think>``, stripped;
  several closing tags (a model that reopens its chain) still leave the answer after the last one;
* ``chain </think> answer`` without the opening tag: R1-distilled chat templates end the generation
  prompt with ``<think>\\n``, so the output starts inside the chain; read as the case above;
* an unterminated chain (an opening tag with no closing tag after it): the generation budget ran out
  mid-thought and no answer was given. The answer is the text before that opening tag (usually empty),
  so the task scores a missing answer as its official scorer scores an empty one, and the metrics count
  these outputs (:func:`chain_counts`): raise ``max_new_tokens`` when the count is not zero. Scoring the
  chain itself instead would credit words the model was still weighing.

The tags must survive decoding: R1-style tokenizers mark ``<think>`` / ``</think>`` as added tokens
that are not special, so ``skip_special_tokens=True`` keeps them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Literal

OPEN = "<think>"
CLOSE = "</think>"
NONE, CLOSED, UNTERMINATED = "none", "closed", "unterminated"
Status = Literal["none", "closed", "unterminated"]
# What the protocol records of this rule: predictions scored under another rule do not mix with these.
EXTRACTION = f"answer after the last {CLOSE}; an unterminated {OPEN} chain gives the text before it (v1)"


def split_reasoning(text: str) -> tuple[str, str, Status]:
    """``(chain, answer, status)`` of one output: the chain's text without its tags, the answer (stripped;
    untouched when there is no chain), and ``"none"``, ``"closed"`` or ``"unterminated"``."""
    end = text.rfind(CLOSE)
    before, after = (text[:end], text[end + len(CLOSE):]) if end >= 0 else ("", text)
    start = after.find(OPEN)
    if start >= 0:  # a chain opened after the last closed one (or the only one) and never closed
        chain = _untag(before + after[start:])
        return chain, after[:start].strip(), UNTERMINATED
    if end < 0:
        return "", text, NONE
    return _untag(before), after.strip(), CLOSED


def _untag(chain: str) -> str:
    """The chain's text without its tags: the pieces between tags, stripped, one per line."""
    pieces = (piece.strip() for piece in chain.replace(OPEN, CLOSE).split(CLOSE))
    return "\n".join(piece for piece in pieces if piece)


def chain_counts(records: Iterable[Mapping[str, Any]]) -> dict[str, int]:
    """``{"n_chain": outputs with a chain (closed or not), "n_unterminated": chains cut by the budget}``."""
    statuses = [r["chain"] for r in records]
    return {"n_chain": sum(s != NONE for s in statuses), "n_unterminated": statuses.count(UNTERMINATED)}
