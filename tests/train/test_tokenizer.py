"""Word-level tokenizer: exact round trips of every ShapesWorld text, no unknowns, save/load identity."""

from __future__ import annotations

from functools import cache

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from train.data.shapesworld import ShapesWorld, ShapesWorldConfig
from train.data.tokenizer import build_tokenizer

WORLD = ShapesWorld(ShapesWorldConfig(seed=11, train_images=200, test_images=100))


@cache
def tokenizer() -> PreTrainedTokenizerFast:
    return build_tokenizer(WORLD.vocabulary_texts())


@cache
def texts() -> list[str]:
    out = []
    for split in ("train", "test"):
        data = WORLD.split(split)
        out += [turn["value"] for i in range(len(data)) for turn in data[i]["conversations"]]
    return out


def test_special_tokens() -> None:
    tok = tokenizer()
    assert isinstance(tok, PreTrainedTokenizerFast)
    assert (tok.pad_token, tok.bos_token, tok.eos_token, tok.unk_token) == ("<pad>", "<s>", "</s>", "<unk>")
    assert tok.convert_tokens_to_ids(["<pad>", "<s>", "</s>", "<unk>", "<image>"]) == [0, 1, 2, 3, 4]
    assert tok.extra_special_tokens == ["<image>"] and tok.padding_side == "right"
    assert tok("<image>\n<s>red</s>")["input_ids"] == [4, *tok.convert_tokens_to_ids(["\n"]), 1,
                                                        *tok.convert_tokens_to_ids(["red"]), 2]


def test_pieces_by_hand() -> None:
    tok = tokenizer()
    assert tok.tokenize("What colour is the circle?") == ["What", "▁colour", "▁is", "▁the", "▁circle", "?"]
    assert tok.tokenize("[123, 45, 678, 900]") == [
        "[", "1", "2", "3", ",", "▁", "4", "5", ",", "▁", "6", "7", "8", ",", "▁", "9", "0", "0", "]"
    ]
    assert tok.tokenize("Is there an orange cross?") == ["Is", "▁there", "▁an", "▁orange", "▁cross", "?"]
    assert tok("What colour is the zebra?")["input_ids"][-2] == tok.unk_token_id


def test_every_generated_text_round_trips_without_unknowns() -> None:
    tok = tokenizer()
    for text in texts():
        ids = tok(text)["input_ids"]
        assert tok.unk_token_id not in ids, text
        expected = text.replace("<image>", "")
        assert tok.decode(ids, skip_special_tokens=True) == expected
        assert tok.decode(ids) == text


def test_answers_round_trip_after_a_space() -> None:
    """A template may place the answer after a space; every answer word has a '▁' form as well."""
    tok = tokenizer()
    for text in {t for t in texts() if "?" not in t}:
        ids = tok(" " + text)["input_ids"]
        assert tok.unk_token_id not in ids and tok.decode(ids) == " " + text


def test_vocabulary_does_not_depend_on_text_order() -> None:
    words = WORLD.vocabulary_texts()
    assert build_tokenizer(reversed(words)).get_vocab() == tokenizer().get_vocab()


def test_save_and_load_give_identical_ids(tmp_path) -> None:
    tok = tokenizer()
    tok.save_pretrained(tmp_path)
    for loaded in (AutoTokenizer.from_pretrained(tmp_path), PreTrainedTokenizerFast.from_pretrained(tmp_path)):
        batch = texts()[:16]
        assert loaded(batch, padding=True)["input_ids"] == tok(batch, padding=True)["input_ids"]
        assert loaded.get_vocab() == tok.get_vocab()
        assert loaded.convert_tokens_to_ids("<image>") == 4 and loaded.padding_side == "right"
        assert loaded.decode(tok("[7, 80, 900, 1000]")["input_ids"]) == "[7, 80, 900, 1000]"


def test_right_padding() -> None:
    tok = tokenizer()
    out = tok(["How many objects are there?", "3"], padding=True)
    assert out["input_ids"][1][0] == tok.convert_tokens_to_ids("3")
    assert len(out["input_ids"][0]) == 6  # How ▁many ▁objects ▁are ▁there ?
    assert out["input_ids"][1][1:] == [0] * 5 and out["attention_mask"][1] == [1] + [0] * 5


@cache
def whole_tokenizer() -> PreTrainedTokenizerFast:
    return build_tokenizer(WORLD.vocabulary_texts(), numbers="whole")


def test_whole_numbers_make_a_box_four_coordinate_tokens() -> None:
    tok = whole_tokenizer()
    assert tok.tokenize("[123, 45, 678, 1000]") == ["[", "123", ",", "▁45", ",", "▁678", ",", "▁1000", "]"]
    assert tok.tokenize("How many circles are there? 3") == ["How", "▁many", "▁circles", "▁are", "▁there", "?", "▁3"]
    # every coordinate a box can hold, first after "[" and after ", "
    assert all(len(tok.tokenize(f"[{n}, {n}, 0, 0]")) == 9 for n in range(1001))
    assert tok.unk_token_id not in tok("[0, 1000, 7, 999]")["input_ids"]
    # words are the same pieces as in digit mode; only the numbers differ
    digit_vocab, whole_vocab = set(tokenizer().get_vocab()), set(tok.get_vocab())
    assert digit_vocab <= whole_vocab
    assert {p.lstrip("▁") for p in whole_vocab - digit_vocab} == {str(n) for n in range(1001)}  # "▁7" too


def test_whole_numbers_round_trip_every_generated_text() -> None:
    tok = whole_tokenizer()
    for text in texts():
        ids = tok(text)["input_ids"]
        assert tok.unk_token_id not in ids, text
        assert tok.decode(ids) == text


def test_bad_input() -> None:
    with pytest.raises(TypeError, match="strings"):
        build_tokenizer(["red", 3])
    with pytest.raises(ValueError, match="no word"):
        build_tokenizer(["<image>", ""])
    with pytest.raises(ValueError, match="numbers: expected one of"):
        build_tokenizer(["red"], numbers="bytes")
