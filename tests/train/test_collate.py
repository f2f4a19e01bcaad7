"""Templates and collator: exact ids and label masks token by token, padding, truncation checks.

Ids come from the ``word_tokenizer`` fixture (tests/conftest.py): <pad>=0 <s>=1 </s>=2 <unk>=3
<image>=4, then USER=5 ASSISTANT=6 :=7 what=8 colour=9 is=11 the=12 how=17 many=18 red=23
circle=26 square=27 ?=31 ,=33 [=34 ]=35 and the digits 0..9 = 36..45.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pytest
import torch
from PIL import Image

from train.data.collate import CollateError, Collator
from train.templates import (
    IGNORE_INDEX,
    TEMPLATES,
    Segment,
    Template,
    TemplateError,
    encode_conversation,
    encode_prompt,
    encode_segments,
)

X = IGNORE_INDEX
CONV = [
    {"from": "human", "value": "<image>\nwhat colour is the circle?"},
    {"from": "gpt", "value": "red"},
    {"from": "human", "value": "how many square?"},
    {"from": "gpt", "value": "[12, 3]"},
]
# <s> USER : <image>x3 what colour is the circle ? ASSISTANT : | red </s>
GOLDEN_IDS = [1, 5, 7, 4, 4, 4, 8, 9, 11, 12, 26, 31, 6, 7, 23, 2,
              # USER : how many square ? ASSISTANT : | [ 1 2 , 3 ] </s>
              5, 7, 17, 18, 27, 31, 6, 7, 34, 37, 38, 33, 39, 35, 2]
GOLDEN_LABELS = [X] * 14 + [23, 2] + [X] * 8 + [34, 37, 38, 33, 39, 35, 2]


def _sample(sid: str, conv: Sequence[Mapping[str, Any]] = CONV, width: int = 8) -> dict[str, Any]:
    return {"id": sid, "image": Image.new("RGB", (width, width)), "conversations": list(conv)}


def _preprocess(image: Image.Image) -> torch.Tensor:
    return torch.full((3, 2, 2), float(image.size[0]))


def _collator(tok: Any, max_length: int = 64) -> Collator:
    return Collator(tok, "plain", "<image>", 3, _preprocess, max_length)


def test_golden_two_turn_conversation(word_tokenizer: Any) -> None:
    ids, labels = encode_conversation(word_tokenizer, CONV, "plain", "<image>", 3)
    assert ids == GOLDEN_IDS
    assert labels == GOLDEN_LABELS


def test_prompt_is_the_first_turn_up_to_the_assistant_header(word_tokenizer: Any) -> None:
    with_marker = encode_prompt(word_tokenizer, "<image>\nwhat colour is the circle?", "plain", "<image>", 3)
    without = encode_prompt(word_tokenizer, "what colour is the circle?", "plain", "<image>", 3)
    assert with_marker == without == GOLDEN_IDS[:14]


def test_template_errors(word_tokenizer: Any) -> None:
    with pytest.raises(TemplateError, match="unknown name 'chatml'; expected one of: plain"):
        encode_conversation(word_tokenizer, CONV, "chatml", "<image>", 3)
    with pytest.raises(TemplateError, match="expected 'human' then 'gpt'"):
        encode_conversation(word_tokenizer, [CONV[1], CONV[0]], "plain", "<image>", 3)
    with pytest.raises(TemplateError, match="alternating"):
        encode_conversation(word_tokenizer, CONV[:3], "plain", "<image>", 3)
    with pytest.raises(TemplateError, match="'<img>' is not a token"):
        encode_conversation(word_tokenizer, CONV, "plain", "<img>", 3)
    assert set(TEMPLATES) == {"plain"}


def test_segment_boundary_that_splits_a_token_is_an_error(word_tokenizer: Any) -> None:
    class Split(Template):
        name = "split"

        def render(self, conversations: Sequence[Mapping[str, Any]]) -> list[Segment]:
            return [Segment(special="bos"), Segment("what col"), Segment("our", target=True)]

    ok = encode_segments(word_tokenizer, [Segment("what "), Segment("colour", target=True)], "<image>", 3)
    assert ok == ([8, 9], [X, 9])
    with pytest.raises(TemplateError, match="piece by piece differs"):
        encode_conversation(word_tokenizer, CONV, Split(), "<image>", 3)


def test_collated_batch_is_right_padded(word_tokenizer: Any) -> None:
    short = [CONV[0], {"from": "gpt", "value": "red"}]
    batch = _collator(word_tokenizer)([_sample("a", short, width=8), _sample("b", width=6)])
    assert set(batch) == {"input_ids", "attention_mask", "labels", "pixel_values"}
    n = len(GOLDEN_IDS)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (2, n)
    assert batch["input_ids"][0].tolist() == GOLDEN_IDS[:16] + [0] * (n - 16)
    assert batch["labels"][0].tolist() == GOLDEN_LABELS[:16] + [X] * (n - 16)
    assert batch["attention_mask"][0].tolist() == [1] * 16 + [0] * (n - 16)
    assert batch["input_ids"][1].tolist() == GOLDEN_IDS and batch["labels"][1].tolist() == GOLDEN_LABELS
    assert batch["attention_mask"][1].tolist() == [1] * n
    assert batch["pixel_values"].shape == (2, 3, 2, 2)
    assert batch["pixel_values"][:, 0, 0, 0].tolist() == [8.0, 6.0]
    assert batch["input_ids"].dtype == batch["labels"].dtype == torch.long


def test_truncation_keeps_a_valid_prefix(word_tokenizer: Any) -> None:
    batch = _collator(word_tokenizer, max_length=15)([_sample("a")])
    assert batch["input_ids"][0].tolist() == GOLDEN_IDS[:15]
    assert batch["labels"][0].tolist() == GOLDEN_LABELS[:15]  # only "red" left supervised


@pytest.mark.parametrize(
    "max_length, message",
    [(5, "sample s-7: truncating 31 tokens to max_length=5 would cut its image tokens"),
     (14, "sample s-7: no answer token left to supervise within max_length=14")],
)
def test_bad_truncation_names_the_sample(word_tokenizer: Any, max_length: int, message: str) -> None:
    with pytest.raises(CollateError, match=message):
        _collator(word_tokenizer, max_length)([_sample("s-7")])


@pytest.mark.parametrize(
    "human, found", [("what colour is the circle?", 0), ("<image>\n<image> what colour?", 6)]
)
def test_image_marker_count_is_checked(word_tokenizer: Any, human: str, found: int) -> None:
    conv = [{"from": "human", "value": human}, CONV[1]]
    with pytest.raises(CollateError, match=f"sample bad: expected one <image> marker .* found {found}"):
        _collator(word_tokenizer)([_sample("bad", conv)])


def test_bad_samples_name_their_id(word_tokenizer: Any) -> None:
    with pytest.raises(CollateError, match="sample q: .*expected 'human' then 'gpt'"):
        _collator(word_tokenizer)([_sample("q", [CONV[1], CONV[0]])])
    with pytest.raises(CollateError, match="sample r: expected a PIL image"):
        _collator(word_tokenizer)([{"id": "r", "conversations": CONV}])
    with pytest.raises(CollateError, match="max_length: 3 leaves no room"):
        _collator(word_tokenizer, max_length=3)


def test_shapesworld_batch_with_the_project_tokenizer() -> None:
    """End to end on real samples: no unknown token, and the supervised ids of each row decode to
    exactly the gpt answers, in order, each closed by </s>."""
    from train.data.shapesworld import ShapesWorld, ShapesWorldConfig
    from train.data.tokenizer import build_tokenizer

    world = ShapesWorld(ShapesWorldConfig(train_images=8, val_images=1, test_images=1))
    tok = build_tokenizer([*world.vocabulary_texts(), *TEMPLATES["plain"].vocabulary_texts()])
    split = world.split("train")
    samples = [split[i] for i in range(len(split))]
    batch = Collator(tok, "plain", "<image>", 4, _preprocess, 256)(samples)
    assert tok.unk_token_id not in batch["input_ids"]
    for row, sample in enumerate(samples):
        supervised = [t for t in batch["labels"][row].tolist() if t != X]
        assert supervised[-1] == tok.eos_token_id
        answers = []
        for t in supervised:
            if not answers or answers[-1][-1:] == [tok.eos_token_id]:
                answers.append([])
            answers[-1].append(t)
        expected = [turn["value"] for turn in sample["conversations"] if turn["from"] == "gpt"]
        assert [tok.decode(a, skip_special_tokens=True).strip() for a in answers] == expected
