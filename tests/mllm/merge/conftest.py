"""Tiny random Llama-family checkpoints on disk (save_pretrained, safetensors) for the merge tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

NUM_LAYERS = 4


def llama_config(vocab: int = 48):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=NUM_LAYERS,
                       num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False)


def mistral_config(vocab: int = 48):
    from transformers import MistralConfig

    return MistralConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=NUM_LAYERS,
                         num_attention_heads=4, num_key_value_heads=2, sliding_window=16, tie_word_embeddings=False)


def perturbed(state: dict[str, torch.Tensor], seed: int, scale: float = 0.05) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=g) for k, v in state.items()}


def save_llama(path: Path, state: dict[str, torch.Tensor] | None = None, vocab: int = 48, seed: int = 0,
               dtype: torch.dtype = torch.float32, **save_kw) -> Path:
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(llama_config(vocab))
    if state is not None:
        model.load_state_dict(state)
    model.to(dtype).save_pretrained(path, **save_kw)
    return path


def save_mistral(path: Path, state: dict[str, torch.Tensor] | None = None, seed: int = 0) -> Path:
    from transformers import MistralForCausalLM

    torch.manual_seed(seed)
    model = MistralForCausalLM(mistral_config())
    if state is not None:
        model.load_state_dict(state)
    model.save_pretrained(path)
    return path


def state_of(path: Path) -> dict[str, torch.Tensor]:
    from mllm.merge.tensors import ModelReader

    r = ModelReader(path)
    return {n: r.get(n) for n in r.names()}


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture(scope="session")
def llamas(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """base, two fine-tunes a and b of it (base + small noise), and c = an exact copy of base."""
    root = tmp_path_factory.mktemp("llamas")
    base = save_llama(root / "base", seed=0)
    state = state_of(base)
    return {
        "base": base,
        "a": save_llama(root / "a", perturbed(state, 1)),
        "b": save_llama(root / "b", perturbed(state, 2)),
        "c": save_llama(root / "c", state),
    }


@pytest.fixture(scope="session")
def mistrals(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny fp32 Mistral checkpoints (sliding_window set): base, fine-tunes a and b (base + small noise),
    and ``sparse`` (base + noise on a random 30 % of the entries, the rest unchanged, for RAM and SCE)."""
    root = tmp_path_factory.mktemp("mistrals")
    base = save_mistral(root / "base", seed=0)
    state = state_of(base)
    g = torch.Generator().manual_seed(7)
    sparse = {k: v + 0.05 * torch.randn(v.shape, generator=g) * (torch.rand(v.shape, generator=g) < 0.3)
              for k, v in state.items()}
    return {
        "base": base,
        "a": save_mistral(root / "a", perturbed(state, 1)),
        "b": save_mistral(root / "b", perturbed(state, 2)),
        "sparse": save_mistral(root / "sparse", sparse),
    }


@pytest.fixture(scope="session")
def bf16_llamas(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """bf16 base and fine-tunes a, b = base + noise a tenth of the weights' scale (as bench_merge.py builds
    them): each delta is a difference of two bf16 numbers, so many deltas tie in magnitude."""
    root = tmp_path_factory.mktemp("bf16_llamas")
    base = save_llama(root / "base", seed=0, dtype=torch.bfloat16)
    state = state_of(base)
    return {"base": base, **{k: save_llama(root / k, perturbed(state, seed, scale=0.002), dtype=torch.bfloat16)
                             for k, seed in (("a", 1), ("b", 2))}}


@pytest.fixture(scope="session")
def ckpt():
    """The helpers above, for test modules (importlib mode cannot import conftest by name)."""
    from types import SimpleNamespace

    return SimpleNamespace(save_llama=save_llama, state_of=state_of, write_yaml=write_yaml, perturbed=perturbed,
                           llama_config=llama_config, num_layers=NUM_LAYERS)
