"""Injector plumbing in the MLLM: generic layer discovery, idle hooks outside a context, other LLM
families, trainable groups, save/load, and the errors for what the data path cannot feed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mllm.injection.base import InjectionError, decoder_layers, every_kth, inject, resolve_llm_layers
from mllm.model import MLLM, ModelError
from mllm.registry import INJECTORS

XATTN = {"name": "gated_xattn", "heads": 2, "dim_head": 8, "gate_init": 0.5, "every": 2}
DPN = {"name": "pyramid", "layers": [0, 1], "min_tokens": 2, "skip_below": 2}
DEHVF = {"name": "ffn_embed", "layers": [1, 3]}


CONFIGS = {c["name"]: c for c in (XATTN, DPN, DEHVF)}  # a small config per registered injector


@pytest.mark.parametrize("name", INJECTORS.names())
def test_registered_injectors(name: str) -> None:
    assert INJECTORS.get(name).needs <= {"tokens", "layers", "splice"}
    assert name in CONFIGS, f"{name}: add a small config to CONFIGS"


def test_layer_helpers() -> None:
    assert resolve_llm_layers([-1, 0, 2, 2], 4, "x") == [0, 2, 3]
    with pytest.raises(InjectionError, match="x: layer 4 is out of range for a 4-layer LLM"):
        resolve_llm_layers([4], 4, "x")
    with pytest.raises(InjectionError, match="x: choose at least one"):
        resolve_llm_layers([], 4, "x")
    assert every_kth(2, 5, "e") == [1, 3]
    with pytest.raises(InjectionError, match="e: expected 1 <= every <= 5, got 0"):
        every_kth(0, 5, "e")
    with pytest.raises(InjectionError, match="Linear: no decoder layer list found"):
        decoder_layers(nn.Linear(2, 2))


@pytest.mark.parametrize("family", ["mistral", "qwen3", "phi3", "gemma", "gemma2", "gemma3_text"])
def test_other_llm_families(kit: Any, word_tokenizer: Any, family: str) -> None:
    """Gated cross-attention and a pooling pyramid together; Gemma 2/3 interleave sliding-window layers."""
    model = kit.build(word_tokenizer, family, [XATTN, DPN], attn="eager" if family == "gemma2" else "sdpa")
    for router, k in zip(model.injectors[1].routers.values(), [2, 1], strict=True):
        router.forward = lambda h, k=k: F.one_hot(torch.full((h.shape[0],), k), 3).to(h.dtype)
    kit.assert_generate_matches_teacher_forcing(model, steps=4)
    assert model.injectors[1].last_visual_tokens == [[16], [4], [2]]
    kit.assert_batch_equals_one_by_one(model, steps=4)


def test_hooks_are_idle_outside_a_context(kit: Any, word_tokenizer: Any) -> None:
    model = kit.build(word_tokenizer, "llama", [XATTN, DPN])
    batch = kit.prompt_batch(model, kit.images(1)[0], "how many?", [7])
    embeds = model.embed(batch["input_ids"], batch["pixel_values"])
    with torch.no_grad():
        hooked = model.llm(inputs_embeds=embeds).logits
        with_context = model(**batch).logits
        for injector in model.injectors:
            injector.detach()
        plain = model.llm(inputs_embeds=embeds).logits
        detached = model(**batch).logits
    assert torch.equal(hooked, plain) and torch.equal(detached, plain)
    assert not torch.allclose(with_context, plain)


def test_context_errors(kit: Any, word_tokenizer: Any) -> None:
    model = kit.build(word_tokenizer, "llama", [XATTN], splice=False)
    with pytest.raises(InjectionError, match="injectors need a visual context"):
        with inject(model.injectors, None):
            pass
    batch = kit.prompt_batch(model, kit.images(1)[0], "how many?", [7])
    with pytest.raises(ModelError, match="need one image per row; this batch has text-only rows"):
        model(**{**batch, "pixel_values": None})
    with pytest.raises(InjectionError, match="runs 2 rows for 1 images; beam search"):
        model.generate_ids(kit.images(1), ["how many?"], max_new_tokens=2, num_beams=2)
    assert model.injectors[0].context is None  # closed even after the error
    with pytest.raises(ModelError, match="gradient checkpointing with model.injectors"):
        model.enable_gradient_checkpointing()
    with pytest.raises(ModelError, match="model.splice is false and no model.injectors read the image"):
        kit.build(word_tokenizer, "llama", [], splice=False)


def test_trainable_groups(kit: Any, word_tokenizer: Any) -> None:
    model = kit.build(word_tokenizer, "llama", [XATTN], splice=False)
    sizes = {g: sum(p.numel() for p in getattr(model, g).parameters()) for g in ("encoder", "projector", "llm", "injectors")}
    counts = model.set_trainable(["projector", "injectors"])
    assert counts == {"encoder": (0, sizes["encoder"]), "projector": (sizes["projector"],) * 2,
                      "llm": (0, sizes["llm"]), "injectors": (sizes["injectors"],) * 2}
    assert all(p.requires_grad for p in model.injectors.parameters())
    assert not any(p.requires_grad for p in model.llm.parameters())


@pytest.mark.parametrize("injectors, splice", [
    ([XATTN, DPN], True), ([DEHVF], False),
    ([{**XATTN, "resampler": {"latents": 3, "depth": 1, "heads": 2, "dim_head": 8}}], False),
    ([{**DEHVF, "top_k": 1}], False),
])
def test_save_load_round_trip(kit: Any, word_tokenizer: Any, tmp_path: Path, injectors: list[Any], splice: bool) -> None:
    model = kit.build(word_tokenizer, "qwen2", injectors, splice=splice, layers=[0, 1])
    batch = kit.prompt_batch(model, kit.images(1)[0], "how many?", [7])
    model.save_pretrained(tmp_path / "ckpt")
    loaded = MLLM.from_pretrained(tmp_path / "ckpt").eval()
    assert [type(i).__name__ for i in loaded.injectors] == [type(i).__name__ for i in model.injectors]
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, model(**batch).logits)
    assert loaded.generate(kit.images(2), kit.questions[:2], 4) == model.generate(kit.images(2), kit.questions[:2], 4)
