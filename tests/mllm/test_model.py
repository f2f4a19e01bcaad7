"""MLLM: splice positions, loss over the label mask, greedy decoding, batching, save/load, errors.

Tiny random parts: a 2-block timm ViT (32 px, patch 16 -> 4 image tokens, two tapped layers
concatenated), an MLP projector, and a 2-layer Llama (tied embeddings) or Qwen2 (GQA, untied).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from eval.runner import Dist, EvalConfig, read_records, run_task, schedule
from eval.tasks.shapesworld import ShapesWorldTask
from mllm.config import ModelConfig, from_dict
from mllm.loss import supervised_positions
from mllm.model import MLLM, ModelError
from train.data.collate import Collator
from train.data.shapesworld import ShapesWorldConfig
from train.templates import IGNORE_INDEX, encode_prompt

ARCH = {
    "llama": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=2, tie_word_embeddings=True, initializer_range=0.2),
    "qwen2": dict(hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, tie_word_embeddings=False, initializer_range=0.2),
}
QUESTIONS = ["what colour is the circle?", "how many?", "is there a red square left of the blue triangle?"]
CONV = [
    {"from": "human", "value": "<image>\nwhat colour is the circle?"}, {"from": "gpt", "value": "red"},
    {"from": "human", "value": "how many square?"}, {"from": "gpt", "value": "2"},
]


def _cfg(family: str, **encoder: Any) -> ModelConfig:
    return from_dict(ModelConfig, {
        "encoder": {"name": "timm_vit", "image_size": 32, "patch_size": 16, "embed_dim": 32, "depth": 2,
                    "num_heads": 2, "layers": [-1, 0], **encoder},
        "projector": {"name": "mlp"},
        "llm": {"model_type": family, "arch": ARCH[family]},
    })


def _images(n: int) -> list[Image.Image]:
    colours = [(255, 0, 0), (0, 0, 255), (0, 200, 0), (90, 90, 90)]
    out = []
    for i in range(n):
        im = Image.new("RGB", (32, 32), colours[i % 4])
        im.paste((255, 255, 0), (4 * i, 0, 4 * i + 12, 12))
        out.append(im)
    return out


@pytest.fixture(scope="module", params=sorted(ARCH))
def model(request: pytest.FixtureRequest, word_tokenizer: Any) -> MLLM:
    torch.manual_seed(0)
    return MLLM(_cfg(request.param), word_tokenizer).eval()


def _batch(model: MLLM) -> dict[str, torch.Tensor]:
    collate = Collator(model.tokenizer, "plain", "<image>", model.num_image_tokens, model.preprocess, 64)
    samples = [{"id": "a", "image": _images(1)[0], "conversations": CONV[:2]},
               {"id": "b", "image": _images(2)[1], "conversations": CONV}]
    return collate(samples)


def test_build_sizes(model: MLLM) -> None:
    assert model.num_image_tokens == 4  # (32 / 16)^2 patches, projector keeps the count
    assert model.projector.in_dim == 2 * 32  # two tapped layers concatenated on channels
    assert model.projector.out_dim == model.llm.config.hidden_size
    assert model.llm.get_input_embeddings().num_embeddings == len(model.tokenizer)


def test_visual_tokens_land_exactly_on_image_positions(model: MLLM) -> None:
    batch = _batch(model)
    ids, pixels = batch["input_ids"], batch["pixel_values"]
    with torch.no_grad():
        embeds = model.embed(ids, pixels)
        feats = model.encoder(pixels)
        visual = model.projector(torch.cat([feats[1], feats[0]], dim=-1))  # layers [-1, 0] -> [1, 0]
        table = model.llm.get_input_embeddings().weight
    image_id = model.image_token_id
    for row in range(ids.shape[0]):
        positions = (ids[row] == image_id).nonzero().flatten().tolist()
        assert positions == [3, 4, 5, 6]  # after "<s> USER :"
        torch.testing.assert_close(embeds[row, positions], visual[row])
        text = [p for p in range(ids.shape[1]) if p not in positions]
        torch.testing.assert_close(embeds[row, text], table[ids[row, text]])
    assert not torch.allclose(visual[0], visual[1])  # different images -> different tokens


def test_loss_is_shifted_cross_entropy_over_the_label_mask(model: MLLM) -> None:
    batch = _batch(model)
    labels = batch["labels"]
    # row a supervises "red </s>" only; the image positions never carry a label
    assert (labels[0] != IGNORE_INDEX).sum() == 2
    assert (labels[batch["input_ids"] == model.image_token_id] == IGNORE_INDEX).all()
    with torch.no_grad():
        out = model(**batch)
    logits = out.logits[:, :-1].reshape(-1, out.logits.shape[-1])
    expected = F.cross_entropy(logits, labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(out.loss, expected)


def test_sample_reduction_weighs_every_conversation_alike(model: MLLM) -> None:
    batch = _batch(model)  # row a: 2 labels ("red </s>"), row b: 4 labels (two answers)
    model.cfg.loss_reduction = "sample"
    try:
        with torch.no_grad():
            out = model(**batch)
    finally:
        model.cfg.loss_reduction = "token"
    labels = batch["labels"][:, 1:]
    per_row = [F.cross_entropy(out.logits[i, :-1], labels[i], ignore_index=IGNORE_INDEX) for i in range(2)]
    torch.testing.assert_close(out.loss, (per_row[0] + per_row[1]) / 2)


@pytest.mark.parametrize("reduction", ["token", "sample"])
def test_training_forward_computes_logits_only_where_supervised(model: MLLM, reduction: str) -> None:
    batch = _batch(model)
    keep = supervised_positions(batch["labels"])
    model.cfg.loss_reduction, was_training = reduction, model.training
    try:
        with torch.no_grad():
            full = model.eval()(**batch)
            trimmed = model.train()(**batch)  # no dropout or batch norm in this model: the modes agree
    finally:
        model.cfg.loss_reduction = "token"
        model.train(was_training)
    assert 0 < len(keep) < batch["input_ids"].shape[1] - 1  # prompt and image positions are skipped
    assert trimmed.logits.shape == (2, len(keep), full.logits.shape[-1])
    torch.testing.assert_close(trimmed.logits, full.logits[:, keep])
    torch.testing.assert_close(trimmed.loss, full.loss)


def test_loss_backpropagates_to_every_group(model: MLLM) -> None:
    model.zero_grad()
    model(**_batch(model)).loss.backward()
    for group in ("encoder", "projector", "llm"):
        grads = [p.grad for p in getattr(model, group).parameters() if p.grad is not None]
        assert grads and any(g.abs().sum() > 0 for g in grads), group
    model.zero_grad(set_to_none=True)


def _teacher_forced_greedy(model: MLLM, image: Image.Image, prompt: str, steps: int) -> list[int]:
    """Greedy decoding by re-running the full, uncached forward on the growing sequence."""
    ids = encode_prompt(model.tokenizer, prompt, "plain", "<image>", model.num_image_tokens)
    with torch.no_grad():
        embeds = model.embed(torch.tensor([ids]), model.preprocess(image)[None])
        table = model.llm.get_input_embeddings()
        new: list[int] = []
        for _ in range(steps):
            logits = model.llm(inputs_embeds=embeds, use_cache=False).logits[0, -1]
            token = int(logits.argmax())
            new.append(token)
            if token == model.tokenizer.eos_token_id:
                break
            embeds = torch.cat([embeds, table(torch.tensor([[token]]))], dim=1)
    return new


def _strip_pad(row: torch.Tensor, pad: int) -> list[int]:
    out = row.tolist()
    while out and out[-1] == pad:
        out.pop()
    return out


def test_greedy_generate_equals_stepwise_argmax(model: MLLM) -> None:
    image = _images(1)[0]
    for prompt in QUESTIONS[:2]:
        got = model.generate_ids([image], [prompt], max_new_tokens=8)[0]
        expected = _teacher_forced_greedy(model, image, prompt, 8)
        assert _strip_pad(got, model.tokenizer.pad_token_id) == expected
        assert len(expected) >= 2  # the comparison covers cached steps, not only the first token


def test_left_padded_batch_equals_one_by_one(model: MLLM) -> None:
    images = _images(3)
    batched_ids = model.generate_ids(images, QUESTIONS, max_new_tokens=8)
    pad = model.tokenizer.pad_token_id
    for i, (image, prompt) in enumerate(zip(images, QUESTIONS, strict=True)):
        single = model.generate_ids([image], [prompt], max_new_tokens=8)[0]
        assert _strip_pad(batched_ids[i], pad) == _strip_pad(single, pad)
    texts = model.generate(images, QUESTIONS, max_new_tokens=8)
    decoded = model.tokenizer.batch_decode(batched_ids, skip_special_tokens=True)
    assert texts == [t.strip() for t in decoded] and all(isinstance(t, str) for t in texts)


def test_eval_runner_batches_give_the_one_by_one_answers(model: MLLM, tmp_path: Path) -> None:
    """The runner regroups samples (by type, longest prompt first); every answer is still the one-by-one
    answer, and the predictions file lists them in dataset order."""
    items = [("count", "how many?"), ("colour", QUESTIONS[0]), ("count", "how many square?"),
             ("colour", "what colour is the blue square?"), ("relpos", QUESTIONS[2])]
    scenes = [{"id": f"s{i}", "image": image, "items": [{"type": t, "question": q, "answer": "2"}]}
              for i, (image, (t, q)) in enumerate(zip(_images(len(items)), items, strict=True))]
    task = ShapesWorldTask(ShapesWorldConfig(), data=scenes)
    samples = list(enumerate(task.samples()))
    assert [[i for i, _, _ in b] for b in schedule(task, samples, 2)] == [[2, 0], [3, 1], [4]]
    run_task(model, task, EvalConfig(batch_size=2, max_new_tokens=6), tmp_path, dist=Dist(), progress=False)
    records = read_records(tmp_path / "predictions.jsonl")
    one_by_one = [model.generate([s.load_image()], [task.build_prompt(s)], max_new_tokens=6)[0] for _, s in samples]
    assert [r["index"] for r in records] == list(range(len(items)))
    assert [r["prediction"] for r in records] == one_by_one
    assert len(set(one_by_one)) > 1  # a random model that answered everything alike would prove little


def test_wrong_image_token_count(model: MLLM) -> None:
    batch = _batch(model)
    ids = batch["input_ids"].clone()
    ids[1, 3] = model.tokenizer.pad_token_id  # drop one of row b's image tokens
    with pytest.raises(ModelError, match="row 1 of input_ids holds 3 image tokens; expected 4"):
        model(ids, batch["attention_mask"], batch["pixel_values"])
    ids[0, 8] = model.image_token_id  # 8 image tokens in all, but 5 in row 0 and 3 in row 1
    with pytest.raises(ModelError, match="row 0 of input_ids holds 5 image tokens; expected 4"):
        model(ids, batch["attention_mask"], batch["pixel_values"])
    with pytest.raises(ModelError, match="one image per row: got 2 images for 1 rows"):
        model.embed(batch["input_ids"][:1], batch["pixel_values"])


def test_save_load_identical_logits(model: MLLM, tmp_path: Path) -> None:
    batch = _batch(model)
    target = tmp_path / "ckpt"
    model.save_pretrained(target)
    model.save_pretrained(target)  # overwriting a complete checkpoint also goes through a rename
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temp or old folders left
    loaded = MLLM.from_pretrained(target).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, atol=0, rtol=0)
    if model.llm.config.tie_word_embeddings:
        assert loaded.llm.get_output_embeddings().weight is loaded.llm.get_input_embeddings().weight
    assert loaded.generate(_images(1), QUESTIONS[:1], 6) == model.generate(_images(1), QUESTIONS[:1], 6)


def test_failed_save_leaves_the_old_checkpoint(model: MLLM, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "ckpt"
    model.save_pretrained(target)
    before = (target / "model.safetensors").read_bytes()

    def boom(*_a: Any, **_k: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(model.tokenizer, "save_pretrained", boom)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert (target / "model.safetensors").read_bytes() == before


def test_load_errors_name_the_path(model: MLLM, tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=f"{tmp_path / 'nope'}: checkpoint folder not found"):
        MLLM.from_pretrained(tmp_path / "nope")
    model.save_pretrained(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "model.safetensors").unlink()
    with pytest.raises(ModelError, match=f"{tmp_path / 'ckpt' / 'model.safetensors'}: missing"):
        MLLM.from_pretrained(tmp_path / "ckpt")


def test_set_trainable(model: MLLM, caplog: pytest.LogCaptureFixture) -> None:
    sizes = {g: sum(p.numel() for p in getattr(model, g).parameters()) for g in ("encoder", "projector", "llm")}
    with caplog.at_level("INFO", logger="mllm"):
        counts = model.set_trainable(["projector"])
    assert counts == {"encoder": (0, sizes["encoder"]), "projector": (sizes["projector"],) * 2,
                      "llm": (0, sizes["llm"])}
    assert all(p.requires_grad for p in model.projector.parameters())
    assert not any(p.requires_grad for p in [*model.encoder.parameters(), *model.llm.parameters()])
    assert "projector  trainable" in caplog.text and f"({sizes['projector']:,} trainable)" in caplog.text
    model.set_trainable(["encoder", "projector", "llm"])
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(ModelError, match="unknown group 'vision'"):
        model.set_trainable(["vision"])


def test_frozen_encoder_conflict(word_tokenizer: Any) -> None:
    model = MLLM(_cfg("llama", frozen=True), word_tokenizer)
    assert not any(p.requires_grad for p in model.encoder.parameters())
    with pytest.raises(ModelError, match="model.encoder.frozen is true"):
        model.set_trainable(["encoder", "llm"])


def test_llm_from_a_local_folder_is_resized_to_the_tokenizer(word_tokenizer: Any, tmp_path: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    small = LlamaForCausalLM(LlamaConfig(vocab_size=len(word_tokenizer) - 1, **ARCH["llama"]))
    small.save_pretrained(tmp_path / "llm")
    cfg = _cfg("llama")
    cfg.llm.path = str(tmp_path / "llm")
    model = MLLM(cfg, word_tokenizer)
    table = model.llm.get_input_embeddings().weight
    assert table.shape[0] == len(word_tokenizer)
    torch.testing.assert_close(table[:-1], small.get_input_embeddings().weight)


def test_llm_config_errors(word_tokenizer: Any, tmp_path: Path) -> None:
    cfg = _cfg("llama")
    cfg.llm.path = str(tmp_path / "missing")
    with pytest.raises(ModelError, match=f"model.llm.path: {tmp_path / 'missing'} is not a folder"):
        MLLM(cfg, word_tokenizer)
    cfg = _cfg("llama")
    cfg.llm.model_type = "no_such_lm"
    with pytest.raises(ModelError, match="model.llm: cannot build a 'no_such_lm' config"):
        MLLM(cfg, word_tokenizer)
    cfg = _cfg("llama")
    cfg.llm.dtype = "float33"
    with pytest.raises(ModelError, match="model.llm.dtype"):
        MLLM(cfg, word_tokenizer)


def test_an_encoder_no_group_trains_keeps_its_batch_norm_statistics(word_tokenizer: Any) -> None:
    torch.manual_seed(0)
    model = MLLM(_cfg("llama", stem="conv"), word_tokenizer)
    bn = model.encoder.model.patch_embed.proj[1]
    for groups, drifts in ((["projector", "llm"], False), (["encoder", "projector", "llm"], True)):
        model.set_trainable(groups)
        model.train()
        before = bn.running_mean.clone()
        model(**_batch(model))
        assert model.encoder.training is drifts
        assert (not torch.equal(bn.running_mean, before)) is drifts, groups


def test_flops_count_the_encoder_per_patch_and_the_llm_per_token(model: MLLM) -> None:
    """6 (N_text T + N_vision I P), each part's parameters counted here from its own modules."""
    batch = _batch(model)
    vision = sum(p.numel() for m in (model.encoder, model.projector) for p in m.parameters())
    llm = sum(p.numel() for p in model.llm.parameters())  # tied embeddings once, no injector in this model
    assert model.param_counts() == (llm, vision)
    tokens = int(batch["attention_mask"].sum())
    assert tokens < batch["input_ids"].numel()  # padding present: the caller counts attended tokens only
    assert model.flops_counter()(batch, tokens) == 6.0 * (llm * tokens + vision * 2 * 4)  # 2 images of (32/16)^2 patches
    text_only = {"input_ids": batch["input_ids"][:1], "attention_mask": batch["attention_mask"][:1]}
    assert model.flops_counter()(text_only, 7) == 6.0 * llm * 7
