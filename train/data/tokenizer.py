"""A word-level tokenizer for a closed vocabulary (ShapesWorld), trained locally with ``tokenizers``.

Pre-tokenization keeps every character of the text in the tokens, so decoding is an exact inverse:
newlines are their own token; a space becomes a "▁" prefix of the next piece (Metaspace, never
prepended at the start); punctuation is isolated. "What colour is it?" -> ``What ▁colour ▁is ▁it ?``.
Numbers are either split into digits ("[12, 5]" -> ``[ 1 2 , ▁ 5 ]``, for text skills such as
digit-wise arithmetic) or kept whole ("[12, 5]" -> ``[ 12 , ▁5 ]``): a box ``[x1, y1, x2, y2]`` then
costs four coordinate tokens, one per quantised coordinate, as in Pix2Seq (Chen et al., 2022,
"Pix2seq: A Language Modeling Framework for Object Detection") and Florence-2's location tokens,
instead of twelve digits that outweigh a one-token VQA answer in the token-mean loss.
Case is kept. The vocabulary is every piece of the given texts, sorted after the special tokens, so
ids do not depend on text order. No post-processor: BOS/EOS are placed by the prompt template.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import TYPE_CHECKING

from tokenizers import Tokenizer, decoders, models
from tokenizers import pre_tokenizers as pre

if TYPE_CHECKING:  # imported where used: the config reads NUMBER_MODES without loading transformers
    from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, UNK, IMAGE = "<pad>", "<s>", "</s>", "<unk>", "<image>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK, IMAGE)
SPACE = "▁"
_SPECIAL_RE = re.compile("|".join(re.escape(t) for t in SPECIAL_TOKENS))


NUMBER_MODES = ("digits", "whole")


def _pre_tokenizer(numbers: str) -> pre.PreTokenizer:
    steps = [
        pre.Split("\n", behavior="isolated"),
        pre.Metaspace(replacement=SPACE, prepend_scheme="never", split=True),
        pre.Punctuation(behavior="isolated"),
    ]
    if numbers == "digits":
        steps.append(pre.Digits(individual_digits=True))
    return pre.Sequence(steps)


def build_tokenizer(texts: Iterable[str], numbers: str = "digits") -> PreTrainedTokenizerFast:
    """A WordLevel tokenizer whose vocabulary is exactly the pieces of ``texts`` plus the special tokens.

    Ids: ``<pad>`` 0, ``<s>`` 1, ``</s>`` 2, ``<unk>`` 3, ``<image>`` 4, then the pieces in sorted order.
    Special tokens written inside ``texts`` are matched whole and never enter the word vocabulary.
    ``numbers``: ``digits`` (one token per digit) or ``whole`` (one token per number, "▁"-prefixed
    after a space); with ``whole`` the texts must spell every number the model will meet.
    """
    from transformers import PreTrainedTokenizerFast

    if numbers not in NUMBER_MODES:
        raise ValueError(f"numbers: expected one of {list(NUMBER_MODES)}, got {numbers!r}")
    pre_tokenizer = _pre_tokenizer(numbers)
    pieces: set[str] = set()
    for text in texts:
        if not isinstance(text, str):
            raise TypeError(f"build_tokenizer: texts must be strings, got {type(text).__name__}")
        for part in _SPECIAL_RE.split(text):
            pieces.update(piece for piece, _ in pre_tokenizer.pre_tokenize_str(part))
    if not pieces:
        raise ValueError("build_tokenizer: texts hold no word to build a vocabulary from")
    vocab = {tok: i for i, tok in enumerate([*SPECIAL_TOKENS, *sorted(pieces - set(SPECIAL_TOKENS))])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizer
    backend.decoder = decoders.Metaspace(replacement=SPACE, prepend_scheme="never", split=True)
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token=PAD, bos_token=BOS, eos_token=EOS, unk_token=UNK,
        extra_special_tokens=[IMAGE], padding_side="right", clean_up_tokenization_spaces=False,
    )
