"""Sinusoidal number-token initialisation: hand-computed rows, the token scan, and the model wiring."""

from __future__ import annotations

import math

import pytest
import torch

from mllm.config import load_config
from mllm.numbers import init_number_embeddings, number_token_values, sincos_rows
from mllm.run import build_model, build_tokenizer_for
from train.data.tokenizer import build_tokenizer


def test_sincos_rows_by_hand() -> None:
    # dim 5 -> m = 2 periods: T_0 = 2, T_1 = 2 * 1000 = 2000; the odd last column stays 0
    rows = sincos_rows(torch.tensor([0, 1, 500]), 5, std=0.5)
    s = 0.5 * math.sqrt(2)
    expected = [
        [0.0, s, 0.0, s, 0.0],
        [s * math.sin(math.pi), s * math.cos(math.pi), s * math.sin(math.pi / 1000), s * math.cos(math.pi / 1000), 0.0],
        [s * math.sin(500 * math.pi), s * math.cos(500 * math.pi), s * math.sin(math.pi / 2), s * math.cos(math.pi / 2), 0.0],
    ]
    torch.testing.assert_close(rows, torch.tensor(expected), atol=1e-6, rtol=0)
    many = sincos_rows(torch.arange(1001), 128, std=0.02)
    assert many.pow(2).mean().sqrt().item() == pytest.approx(0.02, rel=0.02)  # each element's RMS is the init std
    cos = torch.nn.functional.cosine_similarity
    assert cos(many[300], many[301], dim=0) > cos(many[300], many[340], dim=0) > cos(many[300], many[700], dim=0)


def test_number_tokens_are_found_with_and_without_the_word_prefix() -> None:
    tok = build_tokenizer(["a box [12, 5]", "x2 is not a number", "7"], numbers="whole")
    values = {tok.convert_ids_to_tokens(i): v for i, v in number_token_values(tok).items()}
    assert values == {"12": 12, "▁5": 5, "7": 7}


def test_init_overwrites_only_number_rows() -> None:
    tok = build_tokenizer(["[12, 5] and 5"], numbers="whole")
    torch.manual_seed(0)
    emb = torch.nn.Embedding(len(tok), 8)
    before = emb.weight.detach().clone()
    assert init_number_embeddings(emb, tok, std=0.02) == 2
    ids = number_token_values(tok)
    for i in range(len(tok)):
        if i in ids:
            expected = sincos_rows(torch.tensor([ids[i]]), 8, 0.02)[0] + 0.1 * before[i]
            torch.testing.assert_close(emb.weight[i], expected)
        else:
            assert torch.equal(emb.weight[i], before[i])


def test_model_applies_it_to_a_random_llm_only(tmp_path) -> None:  # noqa: ANN001
    cfg = load_config("tiny", ["model.number_init=sincos", "model.llm.arch.num_hidden_layers=1", "model.encoder.depth=1"])
    tok = build_tokenizer_for(cfg)
    model = build_model(cfg, tok)
    table, ids = model.llm.get_input_embeddings().weight, number_token_values(tok)
    i318 = tok.convert_tokens_to_ids("▁318")
    row = sincos_rows(torch.tensor([318]), table.shape[1], model.llm.config.initializer_range)[0]
    assert torch.nn.functional.cosine_similarity(table[i318], row, dim=0) > 0.99  # E[318] + a tenth of noise
    assert ids[i318] == 318 and len(ids) == 2 * 1001  # 0..1000, with and without the word prefix
    model.save_pretrained(tmp_path / "m")
    loaded = type(model).from_pretrained(tmp_path / "m")  # a load keeps the trained rows, no re-init
    assert torch.equal(loaded.llm.get_input_embeddings().weight, table)
