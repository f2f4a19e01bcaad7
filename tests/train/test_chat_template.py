"""The ``chat`` template: rendered by the tokenizer's own (Qwen2 ChatML) jinja template, labels built
turn by turn — checked token by token on a 3-turn sample."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from PIL import Image

from train.data.collate import Collator
from train.templates import (
    IGNORE_INDEX,
    ChatTemplate,
    PlainTemplate,
    TemplateError,
    encode_conversation,
    encode_prompt,
    get_template,
)

# Qwen2-Instruct's ChatML template (default system prompt when none is given).
QWEN2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<image>", "<|im_start|>", "<|im_end|>"]
WORDS = "system You are a helpful assistant . user what colour is the circle ? red how many square 2 left yes".split()
CONV = [
    {"from": "human", "value": "<image>\nwhat colour is the circle?"}, {"from": "gpt", "value": "red"},
    {"from": "human", "value": "how many square?"}, {"from": "gpt", "value": "2"},
    {"from": "human", "value": "is the circle left?"}, {"from": "gpt", "value": "yes"},
]


def _tokenizer(chat_template: str | None = QWEN2_TEMPLATE) -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens(SPECIALS)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="<|im_end|>", unk_token="<unk>",
        extra_special_tokens=["<image>", "<|im_start|>"],
    )
    tok.chat_template = chat_template
    return tok


@pytest.fixture(scope="module")
def chatml() -> Any:
    return _tokenizer()


def _golden(tok: Any) -> tuple[list[int], list[int]]:
    """(ids, labels) written out token by token: ``+`` marks a supervised token."""
    header = "<|im_start|> system You are a helpful assistant . <|im_end|>"
    turns = [
        ("<|im_start|> user <image> <image> <image> what colour is the circle ? <|im_end|> <|im_start|> assistant",
         "red <|im_end|>"),
        ("<|im_start|> user how many square ? <|im_end|> <|im_start|> assistant", "2 <|im_end|>"),
        ("<|im_start|> user is the circle left ? <|im_end|> <|im_start|> assistant", "yes <|im_end|>"),
    ]
    pieces = [(t, False) for t in header.split()]
    for prompt, answer in turns:
        pieces += [(t, False) for t in prompt.split()] + [(t, True) for t in answer.split()]
    ids = tok.convert_tokens_to_ids([t for t, _ in pieces])
    return ids, [i if sup else IGNORE_INDEX for i, (_, sup) in zip(ids, pieces, strict=True)]


def test_three_turn_labels_token_by_token(chatml: Any) -> None:
    ids, labels = encode_conversation(chatml, CONV, "chat", "<image>", 3)
    golden_ids, golden_labels = _golden(chatml)
    assert chatml.unk_token_id not in ids
    assert ids == golden_ids
    assert labels == golden_labels
    # The ids are exactly the tokenizer's own rendering of the whole conversation, image expanded.
    text = chatml.apply_chat_template(
        [{"role": "user" if t["from"] == "human" else "assistant", "content": t["value"]} for t in CONV],
        tokenize=False,
    )
    whole = chatml(text.replace("<image>", "<image>" * 3), add_special_tokens=False)["input_ids"]
    assert ids == whole


def test_prompt_is_the_first_turn_up_to_the_assistant_header(chatml: Any) -> None:
    ids, _ = _golden(chatml)
    prompt = encode_prompt(chatml, "what colour is the circle?", "chat", "<image>", 3)
    assert prompt == ids[:len(prompt)]
    assert chatml.convert_ids_to_tokens(prompt[-2:]) == ["<|im_start|>", "assistant"]


def test_collated_chat_batch_supervises_the_assistant_turns_only(chatml: Any) -> None:
    collate = Collator(chatml, "chat", "<image>", 3, lambda im: torch.zeros(3, 2, 2), 128)
    batch = collate([{"id": "a", "image": Image.new("RGB", (4, 4)), "conversations": CONV}])
    supervised = [t for t in batch["labels"][0].tolist() if t != IGNORE_INDEX]
    assert chatml.convert_ids_to_tokens(supervised) == ["red", "<|im_end|>", "2", "<|im_end|>", "yes", "<|im_end|>"]


def test_template_selection_and_errors(chatml: Any) -> None:
    plain_tok = _tokenizer(chat_template=None)
    assert isinstance(get_template("auto", chatml), ChatTemplate)
    assert isinstance(get_template("auto", plain_tok), PlainTemplate)
    with pytest.raises(TemplateError, match="template 'chat': the tokenizer has no chat_template"):
        get_template("chat", plain_tok)
    with pytest.raises(TemplateError, match="template 'chat' is built from a tokenizer; none was given"):
        get_template("chat")
    # A template that drops history when a turn is added cannot be labelled turn by turn.
    last_only = _tokenizer(
        "{% for message in messages[-1:] %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] }}"
        "{{ '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    with pytest.raises(TemplateError, match="turn 0 does not extend the text rendered before it"):
        encode_conversation(last_only, CONV, "chat", "<image>", 3)
