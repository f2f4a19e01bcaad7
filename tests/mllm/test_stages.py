"""Stages and scale switches on a tiny MLLM: text-only rows, freeze plans (align / instruct / LoRA),
LoRA save -> load, gradient checkpointing, attention choice and FSDP wrap units."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from mllm import run
from mllm.config import ConfigError, ModelConfig, RunConfig, from_dict
from mllm.model import MLLM, ModelError
from train.data.collate import Collator

MODEL = {
    "encoder": {"name": "timm_vit", "image_size": 32, "patch_size": 16, "embed_dim": 32, "depth": 2,
                "num_heads": 2, "layers": [-1]},
    "projector": {"name": "mlp"},
    "llm": {"model_type": "llama", "arch": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                 num_attention_heads=2, num_key_value_heads=2,
                                                 tie_word_embeddings=True, initializer_range=0.2)},
}
IMAGE_CONV = [{"from": "human", "value": "<image>\nwhat colour is the circle?"}, {"from": "gpt", "value": "red"}]
TEXT_CONV = [{"from": "human", "value": "how many square?"}, {"from": "gpt", "value": "2"}]


def _model(word_tokenizer: Any) -> MLLM:
    torch.manual_seed(0)
    return MLLM(from_dict(ModelConfig, MODEL), word_tokenizer)


def _samples() -> list[dict[str, Any]]:
    return [
        {"id": "img-a", "image": Image.new("RGB", (32, 32), (255, 0, 0)), "conversations": IMAGE_CONV},
        {"id": "text", "image": None, "conversations": TEXT_CONV},
        {"id": "img-b", "image": Image.new("RGB", (32, 32), (0, 0, 255)), "conversations": IMAGE_CONV},
    ]


def _collate(model: MLLM, samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    return Collator(model.tokenizer, "plain", "<image>", model.num_image_tokens, model.preprocess, 64)(samples)


def test_text_only_rows_end_to_end(word_tokenizer: Any) -> None:
    model = _model(word_tokenizer).eval()
    samples = _samples()
    mixed = _collate(model, samples)
    assert mixed["has_image"].tolist() == [True, False, True] and mixed["pixel_values"].shape[0] == 2
    with torch.no_grad():
        logits = model(**mixed).logits
        for row, sample in enumerate(samples):  # each row as in a batch of its own
            alone = _collate(model, [sample])
            width = alone["input_ids"].shape[1]
            torch.testing.assert_close(logits[row, :width], model(**alone).logits[0], atol=1e-5, rtol=1e-5)
    assert "pixel_values" not in _collate(model, [samples[1]])


def test_text_only_batch_keeps_every_trainable_part_in_the_graph(word_tokenizer: Any) -> None:
    """Under DDP every rank must produce the same gradients: a text-only batch still reaches the
    encoder and projector (with weight zero), and its loss is the text loss alone."""
    model = _model(word_tokenizer).train()
    model(**_collate(model, [_samples()[0]])).loss.backward()
    reached = {n for n, p in model.named_parameters() if p.grad is not None and not n.startswith("llm.")}
    assert any(n.startswith("encoder.") for n in reached) and any(n.startswith("projector.") for n in reached)
    model.zero_grad(set_to_none=True)
    batch = _collate(model, [_samples()[1]])
    loss = model(**batch).loss
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None and not n.startswith("llm.")}
    assert set(grads) == reached  # the same parameters as an image batch, with zero gradient
    assert all(float(g.abs().sum()) == 0.0 for g in grads.values())
    with torch.no_grad():
        plain = model.llm(inputs_embeds=model.llm.get_input_embeddings()(batch["input_ids"]),
                          attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    torch.testing.assert_close(loss.detach(), plain)


def test_image_row_flags_are_checked(word_tokenizer: Any) -> None:
    model = _model(word_tokenizer).eval()
    batch = _collate(model, _samples())
    with pytest.raises(ModelError, match="got 1 images for 2 rows flagged has_image"):
        model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"][:1], has_image=batch["has_image"])
    flags = torch.tensor([True, True, True])
    with pytest.raises(ModelError, match="got 2 images for 3 rows flagged has_image"):
        model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], has_image=flags)
    flags = torch.tensor([True, True, False])
    with pytest.raises(ModelError, match=r"row 1 of input_ids holds 0 image tokens; expected 4"):
        model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], has_image=flags)


def _run_cfg(**train: Any) -> RunConfig:
    return from_dict(RunConfig, {"model": MODEL, "train": train})


def _trainable(model: MLLM) -> dict[str, int]:
    return {g: sum(p.numel() for p in getattr(model, g).parameters() if p.requires_grad)
            for g in ("encoder", "projector", "llm")}


def test_freeze_plans(word_tokenizer: Any, caplog: pytest.LogCaptureFixture) -> None:
    model = _model(word_tokenizer)
    sizes = {g: sum(p.numel() for p in getattr(model, g).parameters()) for g in ("encoder", "projector", "llm")}
    assert run.freeze(model, _run_cfg(stage="align")) == {
        "encoder": (0, sizes["encoder"]), "projector": (sizes["projector"],) * 2, "llm": (0, sizes["llm"])}
    run.freeze(model, _run_cfg(stage="instruct"))
    assert _trainable(model) == {"encoder": 0, "projector": sizes["projector"], "llm": sizes["llm"]}
    run.freeze(model, _run_cfg(stage="align", unfreeze_encoder=True))
    assert _trainable(model) == {"encoder": sizes["encoder"], "projector": sizes["projector"], "llm": 0}
    with caplog.at_level("INFO", logger="mllm"):
        counts = run.freeze(model, _run_cfg(stage="instruct", lora={"r": 2, "target_modules": ["q_proj", "v_proj"]}))
    # LoRA: A (r x 32) and B (32 x r) on q_proj and v_proj of 2 layers; the base LLM frozen.
    lora_params = 2 * 2 * (2 * 32 + 32 * 2)
    assert counts["llm"] == (lora_params, sizes["llm"] + lora_params)
    names = [n for n, p in model.llm.named_parameters() if p.requires_grad]
    assert len(names) == 8 and all("lora_" in n for n in names)
    assert f"llm        partial   {sizes['llm'] + lora_params:>12,} {lora_params:>12,}" in caplog.text


def test_align_trains_llm_side_injectors(word_tokenizer: Any) -> None:
    cfg = _run_cfg(stage="align")
    cfg.model = from_dict(ModelConfig, {**MODEL, "splice": False, "injectors": [
        {"name": "gated_xattn", "every": 1, "heads": 2, "dim_head": 8, "ff_mult": 1}]})
    model = MLLM(cfg.model, word_tokenizer)
    counts = run.freeze(model, cfg)
    assert counts["injectors"][0] == counts["injectors"][1] > 0
    assert counts["projector"][0] > 0 and counts["llm"][0] == counts["encoder"][0] == 0


@pytest.mark.parametrize(
    "train, message",
    [({"stage": "pretrain"}, "stage: expected one of align, instruct"),
     ({"stage": "align", "trainable": ["llm"]}, "set stage or trainable, not both"),
     ({"stage": "align", "lora": {"r": 4}}, "lora: the LLM does not train in this plan"),
     ({"unfreeze_encoder": True}, "unfreeze_encoder applies to a stage"),
     ({"lora": {"r": 0}}, "lora: r and alpha must be positive")],
)
def test_contradictory_plans_fail_at_config_time(train: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _run_cfg(**train)


def test_lora_save_load_gives_identical_logits(word_tokenizer: Any, tmp_path: Path) -> None:
    model = _model(word_tokenizer)
    model.add_lora(r=4, alpha=8, dropout=0.0, target_modules="all-linear")
    with torch.no_grad():  # B starts at zero: move it so the adapters change the function
        for name, param in model.llm.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    model.eval()
    batch = _collate(model, _samples())
    with torch.no_grad():
        with_adapters = model(**batch).logits
        model.llm.disable_adapter_layers()
        base = model(**batch).logits
        model.llm.enable_adapter_layers()
    assert (with_adapters - base).abs().max() > 1e-2
    model.save_pretrained(tmp_path / "ckpt")
    assert not model.has_lora  # merged into the weights on save
    loaded = MLLM.from_pretrained(tmp_path / "ckpt").eval()
    assert not loaded.has_lora
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, atol=0, rtol=0)
        torch.testing.assert_close(loaded(**batch).logits, with_adapters, atol=1e-5, rtol=1e-5)


def test_gradient_checkpointing_keeps_loss_and_gradients(word_tokenizer: Any) -> None:
    plain, checkpointed = _model(word_tokenizer).train(), _model(word_tokenizer).train()
    assert checkpointed.enable_gradient_checkpointing() == ["llm", "encoder.model"]
    assert checkpointed.llm.is_activation_checkpointing and checkpointed.encoder.model.grad_checkpointing
    batch = _collate(plain, _samples())
    losses = []
    for model in (plain, checkpointed):
        loss = model(**batch).loss
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[0], losses[1])
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, msg=name)


def test_attention_auto_and_fsdp_units(word_tokenizer: Any, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("INFO", logger="mllm"):
        model = _model(word_tokenizer)
    assert model.llm.config._attn_implementation == "sdpa"  # no CUDA / flash-attn here
    assert "LLM attention: sdpa (model.llm.attn_implementation=auto" in caplog.text
    assert model._no_split_modules == ["LlamaDecoderLayer", "Block"]
