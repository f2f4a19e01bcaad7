"""MLLM.from_pretrained builds on the meta device and reads the stored tensors straight in; save_pretrained
shards. Loaded logits equal the saved model's exactly, nothing is randomly initialised, buffers that are
not stored (rotary ``inv_freq``) are computed as at a normal build, tied weights stay tied, dtype/device
are honoured, and shards written as transformers writes them load the same.

Tiny random parts: a 2-block timm ViT (32 px, 4 image tokens), an MLP projector, and a 2-layer Llama
(tied embeddings) or Qwen2 (untied).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from mllm.config import ModelConfig, from_dict
from mllm.model import MLLM, ModelError
from train.data.collate import Collator

ARCH = {
    "llama": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=2, tie_word_embeddings=True, initializer_range=0.2),
    "qwen2": dict(hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, tie_word_embeddings=False, initializer_range=0.2),
}
CONV = [{"from": "human", "value": "<image>\nwhat colour is the circle?"}, {"from": "gpt", "value": "red"}]


def _cfg(family: str) -> ModelConfig:
    return from_dict(ModelConfig, {
        "encoder": {"name": "timm_vit", "image_size": 32, "patch_size": 16, "embed_dim": 32, "depth": 2,
                    "num_heads": 2, "layers": [-1, 0]},
        "projector": {"name": "mlp"},
        "llm": {"model_type": family, "arch": ARCH[family]},
    })


def _images() -> list[Image.Image]:
    a, b = Image.new("RGB", (32, 32), (255, 0, 0)), Image.new("RGB", (32, 32), (0, 0, 255))
    b.paste((255, 255, 0), (4, 0, 16, 12))
    return [a, b]


def _batch(model: MLLM) -> dict[str, torch.Tensor]:
    collate = Collator(model.tokenizer, "plain", "<image>", model.num_image_tokens, model.preprocess, 64)
    return collate([{"id": str(i), "image": im, "conversations": CONV} for i, im in enumerate(_images())])


def _logits(model: MLLM) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(**_batch(model)).logits


@pytest.fixture(scope="module", params=sorted(ARCH))
def model(request: pytest.FixtureRequest, word_tokenizer: Any) -> MLLM:
    torch.manual_seed(0)
    return MLLM(_cfg(request.param), word_tokenizer).eval()


@pytest.fixture(scope="module")
def saved(model: MLLM, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return model.save_pretrained(tmp_path_factory.mktemp("ckpt") / "model")


def test_loaded_logits_buffers_and_ties_equal_the_saved_model(model: MLLM, saved: Path) -> None:
    loaded = MLLM.from_pretrained(saved, device="cpu")
    torch.testing.assert_close(_logits(loaded), _logits(model), atol=0, rtol=0)
    buffers = dict(model.named_buffers())
    assert any("inv_freq" in name for name in buffers)  # a buffer that is not stored: recomputed at build
    for name, buf in loaded.named_buffers():
        torch.testing.assert_close(buf, buffers[name], atol=0, rtol=0)
    assert not any(p.is_meta for p in loaded.parameters())
    assert (loaded.llm.get_output_embeddings().weight is loaded.llm.get_input_embeddings().weight) == \
        model.llm.config.tie_word_embeddings
    assert loaded.generate(_images(), ["what colour is the circle?"] * 2, 6) == \
        model.generate(_images(), ["what colour is the circle?"] * 2, 6)


def test_nothing_but_the_encoder_is_initialised_while_loading(model: MLLM, saved: Path,
                                                              monkeypatch: pytest.MonkeyPatch,
                                                              word_tokenizer: Any) -> None:
    """Every random init ends in ``Tensor.normal_`` / ``uniform_`` (torch.nn.init, timm's trunc_normal_) or in the
    LLM's ``_init_weights`` (which raises here). Loading initialises no real tensor of the LLM or projector: at
    most the encoder's own library init runs (its torch inits are skipped), less than a normal build does."""
    from transformers import PreTrainedModel

    touched: list[tuple[int, ...]] = []

    def counted(original: Any) -> Any:
        def fn(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if not self.is_meta:
                touched.append(tuple(self.shape))
            return original(self, *args, **kwargs)
        return fn

    def no_init(*_a: Any, **_k: Any) -> None:
        raise AssertionError("_init_weights ran")

    monkeypatch.setattr(torch.Tensor, "normal_", counted(torch.Tensor.normal_))
    monkeypatch.setattr(torch.Tensor, "uniform_", counted(torch.Tensor.uniform_))
    monkeypatch.setattr(PreTrainedModel, "_init_weights", no_init)
    monkeypatch.setattr(type(model.llm), "_init_weights", no_init)
    with pytest.raises(AssertionError, match="_init_weights ran"):
        MLLM(_cfg(model.llm.config.model_type), word_tokenizer)  # the guard does catch a normal build
    assert set(touched) - {tuple(p.shape) for p in model.encoder.parameters()}  # LLM layers were
    touched.clear()
    loaded = MLLM.from_pretrained(saved, device="cpu")
    monkeypatch.undo()
    encoder_shapes = {tuple(p.shape) for p in model.encoder.parameters()}
    assert set(touched) <= encoder_shapes, set(touched) - encoder_shapes
    torch.testing.assert_close(_logits(loaded), _logits(model), atol=0, rtol=0)


def test_sharded_save_writes_transformers_layout_and_loads(model: MLLM, tmp_path: Path) -> None:
    target = model.save_pretrained(tmp_path / "ckpt", max_shard_size=20_000)
    shards = sorted(p.name for p in target.glob("*.safetensors"))
    n = len(shards)
    assert n >= 3 and shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert not (target / "model.safetensors").exists()
    index = json.loads((target / "model.safetensors.index.json").read_text())
    from safetensors import safe_open

    sizes, where = 0, {}
    for shard in shards:
        with safe_open(str(target / shard), "pt") as fh:
            for name in fh.keys():  # noqa: SIM118 - safe_open is not a mapping
                where[name] = shard
                t = fh.get_tensor(name)
                sizes += t.numel() * t.element_size()
    assert index["weight_map"] == where and index["metadata"]["total_size"] == sizes
    state = model.state_dict()
    tied = model.llm.config.tie_word_embeddings
    assert set(where) == set(state) - ({"llm.model.embed_tokens.weight"} if tied else set())  # stored once
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # written atomically: no temp folder left
    torch.testing.assert_close(_logits(MLLM.from_pretrained(target, device="cpu")), _logits(model), atol=0, rtol=0)
    single = model.save_pretrained(tmp_path / "ckpt")  # replaces the sharded folder whole
    assert sorted(p.name for p in single.glob("model*")) == ["model.safetensors"]


def test_dtype_bfloat16_and_the_checkpoint_default(model: MLLM, saved: Path, tmp_path: Path) -> None:
    bf16 = MLLM.from_pretrained(saved, device="cpu", dtype="bfloat16")
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    state = model.state_dict()
    for name, param in bf16.named_parameters():
        torch.testing.assert_close(param, state[name].to(torch.bfloat16), atol=0, rtol=0)
    assert bf16.llm.dtype == torch.bfloat16 and bf16.cfg.llm.dtype == "bfloat16"
    assert torch.isfinite(_logits(bf16).float()).all()
    bf16.save_pretrained(tmp_path / "bf16")
    again = MLLM.from_pretrained(tmp_path / "bf16", device="cpu")  # no dtype: the checkpoint's
    assert {p.dtype for p in again.parameters()} == {torch.bfloat16}
    torch.testing.assert_close(_logits(again), _logits(bf16), atol=0, rtol=0)
    f32 = MLLM.from_pretrained(saved, device="cpu")
    assert {p.dtype for p in f32.parameters()} == {torch.float32}


def test_a_single_file_written_by_safetensors_save_model_still_loads(model: MLLM, saved: Path,
                                                                     tmp_path: Path) -> None:
    import shutil

    from safetensors.torch import save_model

    old = tmp_path / "old"
    shutil.copytree(saved, old)
    save_model(model, str(old / "model.safetensors"))  # how checkpoints were written before sharding
    torch.testing.assert_close(_logits(MLLM.from_pretrained(old, device="cpu")), _logits(model), atol=0, rtol=0)


def test_bad_device_dtype_and_shard_size(model: MLLM, saved: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="dtype: expected a torch floating dtype name .* got 'float33'"):
        MLLM.from_pretrained(saved, dtype="float33")
    with pytest.raises(ModelError, match="dtype: .* got 'int8'"):
        MLLM.from_pretrained(saved, dtype="int8")
    with pytest.raises(ModelError, match="device: expected a torch device"):
        MLLM.from_pretrained(saved, device="gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ModelError, match="CUDA is not available"):
            MLLM.from_pretrained(saved, device="cuda")
    with pytest.raises(ModelError, match="max_shard_size"):
        model.save_pretrained(tmp_path / "x", max_shard_size="lots")
    assert not (tmp_path / "x").exists()


def test_a_missing_shard_is_named(model: MLLM, tmp_path: Path) -> None:
    target = model.save_pretrained(tmp_path / "ckpt", max_shard_size=20_000)
    next(target.glob("model-00002-of-*.safetensors")).unlink()
    with pytest.raises(ModelError, match="model-00002-of-.*does not exist"):
        MLLM.from_pretrained(target, device="cpu")


@pytest.mark.parametrize("shard_size", ["5GB", 20_000])
def test_a_stage_starts_from_a_sharded_or_single_file_checkpoint(model: MLLM, tmp_path: Path, word_tokenizer: Any,
                                                                 shard_size: int | str) -> None:
    from mllm.run import load_weights

    target = model.save_pretrained(tmp_path / "ckpt", max_shard_size=shard_size)
    torch.manual_seed(1)
    fresh = MLLM(_cfg(model.llm.config.model_type), word_tokenizer)
    assert not torch.equal(_logits(fresh), _logits(model))
    load_weights(fresh, target)  # train.init_from
    torch.testing.assert_close(_logits(fresh), _logits(model), atol=0, rtol=0)
