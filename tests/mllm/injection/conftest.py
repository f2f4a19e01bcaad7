"""Tiny MLLMs with injectors: a 2-block timm ViT at 32 px with 8 px patches (4x4 = 16 visual tokens),
an MLP projector and a 4-layer Llama (tied) or Qwen2 (GQA, untied) LLM; helpers shared by the tests."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from PIL import Image

from mllm.config import ModelConfig, from_dict
from mllm.model import MLLM
from train.templates import IGNORE_INDEX, encode_prompt

ARCH = {
    "llama": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2,
                  num_key_value_heads=2, tie_word_embeddings=True, initializer_range=0.2),
    "qwen2": dict(hidden_size=48, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, tie_word_embeddings=False, initializer_range=0.2),
}
FAMILIES = sorted(ARCH)
SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=2,
             initializer_range=0.2)
ARCH.update({  # more decoder families, for the "any HF decoder-only LLM" tests
    "mistral": SMALL, "qwen3": SMALL, "phi3": SMALL, "gemma": {**SMALL, "head_dim": 16},
    "gemma2": {**SMALL, "head_dim": 16, "sliding_window": 6},  # sliding / full layers alternate
    "gemma3_text": {**SMALL, "head_dim": 16, "sliding_window": 6},  # + per-layer-type rotary bases
})
QUESTIONS = ["what colour is the circle?", "how many?", "is there a red square left of the blue triangle?"]


def model_config(family: str, injectors: list[dict[str, Any]], splice: bool = True, layers: list[int] | None = None,
                 projector: dict[str, Any] | None = None, attn: str = "sdpa") -> ModelConfig:
    return from_dict(ModelConfig, {
        "encoder": {"name": "timm_vit", "image_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2,
                    "num_heads": 2, "layers": layers or [-1]},
        "projector": projector or {"name": "mlp"},
        "llm": {"model_type": family, "arch": ARCH[family], "attn_implementation": attn},
        "splice": splice,
        "injectors": injectors,
    })


def build(word_tokenizer: Any, family: str, injectors: list[dict[str, Any]], **kw: Any) -> MLLM:
    torch.manual_seed(0)
    return MLLM(model_config(family, injectors, **kw), word_tokenizer).eval()


def images(n: int) -> list[Image.Image]:
    colours = [(255, 0, 0), (0, 0, 255), (0, 200, 0), (90, 90, 90)]
    out = []
    for i in range(n):
        im = Image.new("RGB", (32, 32), colours[i % 4])
        im.paste((255, 255, 0), (6 * i, 0, 6 * i + 12, 12))
        out.append(im)
    return out


def prompt_batch(model: MLLM, image: Image.Image, prompt: str, answer: list[int]) -> dict[str, torch.Tensor]:
    """One row: the generate prompt followed by ``answer`` ids, the answer supervised (labels)."""
    ids = encode_prompt(model.tokenizer, prompt, model.template, model.cfg.image_token, model.num_image_tokens)
    full = torch.tensor([ids + answer])
    labels = torch.tensor([[IGNORE_INDEX] * len(ids) + answer])
    return {"input_ids": full, "attention_mask": torch.ones_like(full), "labels": labels,
            "pixel_values": model.preprocess(image)[None]}


def teacher_forced_greedy(model: MLLM, image: Image.Image, prompt: str, steps: int) -> list[int]:
    """Greedy decoding by re-running the full, uncached MLLM forward on the growing sequence; the
    labels mark the generated tokens, so the injectors' query is the prompt, as in ``generate``."""
    new: list[int] = []
    with torch.no_grad():
        for _ in range(steps):
            batch = prompt_batch(model, image, prompt, new)
            if not new:
                batch["labels"] = None  # nothing generated yet: the whole sequence is the prompt
            token = int(model(**batch, use_cache=False).logits[0, -1].argmax())
            new.append(token)
            if token == model.tokenizer.eos_token_id:
                break
    return new


def strip_pad(row: torch.Tensor, pad: int) -> list[int]:
    out = row.tolist()
    while out and out[-1] == pad:
        out.pop()
    return out


def assert_generate_matches_teacher_forcing(model: MLLM, steps: int = 6) -> None:
    pad = model.tokenizer.pad_token_id
    for image, prompt in zip(images(2), QUESTIONS[:2], strict=True):
        got = model.generate_ids([image], [prompt], max_new_tokens=steps)[0].tolist()
        expected = teacher_forced_greedy(model, image, prompt, steps)
        assert got[: len(expected)] == expected and set(got[len(expected):]) <= {pad}  # pad after eos
        assert len(expected) >= 2  # cached decoding steps are compared, not only the first token


def assert_batch_equals_one_by_one(model: MLLM, steps: int = 6) -> None:
    pad = model.tokenizer.pad_token_id
    ims = images(3)
    batched = model.generate_ids(ims, QUESTIONS, max_new_tokens=steps)
    for i, (image, prompt) in enumerate(zip(ims, QUESTIONS, strict=True)):
        single = model.generate_ids([image], [prompt], max_new_tokens=steps)[0]
        assert strip_pad(batched[i], pad) == strip_pad(single, pad)  # only the batch's trailing pad differs


class Kit:
    """The helpers above, handed to tests as the ``kit`` fixture (test modules cannot import a conftest)."""

    families = FAMILIES
    questions = QUESTIONS
    build = staticmethod(build)
    images = staticmethod(images)
    prompt_batch = staticmethod(prompt_batch)
    teacher_forced_greedy = staticmethod(teacher_forced_greedy)
    assert_generate_matches_teacher_forcing = staticmethod(assert_generate_matches_teacher_forcing)
    assert_batch_equals_one_by_one = staticmethod(assert_batch_equals_one_by_one)


@pytest.fixture
def kit() -> type[Kit]:
    return Kit
