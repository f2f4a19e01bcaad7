"""Visual-attention probe (FRANK prior) and FRANK on this package's own MLLM checkpoints."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from mllm.config import ModelConfig, from_dict
from mllm.merge import run_merge
from mllm.merge.methods.frank import fit_decay
from mllm.merge.probe import ProbeError, layer_shares, run_probe, visual_attention_share
from mllm.model import MLLM
from train.data.collate import Collator

LAYERS = 3


def test_layer_shares_by_hand() -> None:
    # tokens: [bos, img, img, "what", pad]; queries = "what" only (after the image, attended, text)
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    image = torch.tensor([[False, True, True, False, False]])
    probs = torch.zeros(1, 2, 5, 5)
    probs[0, 0, 3, :4] = torch.tensor([0.1, 0.3, 0.2, 0.4])  # head 0: vis 0.5, txt 0.5 -> 0.5
    probs[0, 1, 3, :4] = torch.tensor([0.4, 0.05, 0.05, 0.5])  # head 1: vis 0.1, txt 0.9 -> 0.1
    probs[0, :, 0, 0] = 1.0  # bos attends to itself: not a query (before the image)
    other = torch.zeros(1, 2, 5, 5)
    other[0, :, 3, :4] = torch.tensor([0.0, 0.6, 0.2, 0.2])  # 0.8 on the image in both heads
    out = layer_shares([probs, other], mask, image)
    assert out.shape == (2, 1)
    assert out[:, 0].tolist() == pytest.approx([0.3, 0.8])
    with pytest.raises(ProbeError, match="row 0 has no image token followed by text"):
        layer_shares([probs], mask, torch.zeros_like(image))


def _cfg() -> ModelConfig:
    return from_dict(ModelConfig, {
        "encoder": {"name": "timm_vit", "image_size": 32, "patch_size": 16, "embed_dim": 32, "depth": 2,
                    "num_heads": 2, "layers": [-1]},
        "projector": {"name": "mlp"},
        "llm": {"model_type": "llama", "arch": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS,
                                                    num_attention_heads=2, num_key_value_heads=2,
                                                    tie_word_embeddings=False, initializer_range=0.2)},
    })


def _batches(model: MLLM, n: int = 2) -> list[dict[str, torch.Tensor]]:
    collate = Collator(model.tokenizer, "plain", "<image>", model.num_image_tokens, model.preprocess, 64)
    samples = [{"id": str(i), "image": Image.new("RGB", (32, 32), (40 * i, 200, 90)),
                "conversations": [{"from": "human", "value": "<image>\nwhat colour is the circle?"},
                                  {"from": "gpt", "value": "red"}]} for i in range(2 * n)]
    return [collate(samples[i:i + 2]) for i in range(0, 2 * n, 2)]


@pytest.fixture(scope="module")
def mllm(word_tokenizer: Any) -> MLLM:
    torch.manual_seed(0)
    return MLLM(_cfg(), word_tokenizer).eval()


def test_probe_matches_a_loop_over_heads_and_queries(tmp_path: Path, mllm: MLLM) -> None:
    batches = _batches(mllm)
    doc = run_probe(mllm, batches, tmp_path, source="tiny")
    assert mllm.llm.config._attn_implementation == "sdpa"  # switched back after probing
    assert json.loads((tmp_path / "probe.json").read_text())["visual_share"] == doc["visual_share"]
    assert (tmp_path / "probe.png").stat().st_size > 0 and doc["num_samples"] == 4
    assert len(doc["visual_share"]) == LAYERS
    assert doc["fit"]["alpha"] == pytest.approx(fit_decay(doc["visual_share"])[0])
    with torch.no_grad():  # the same quantity, written as loops
        mllm.llm.set_attn_implementation("eager")
        expected = torch.zeros(LAYERS)
        for batch in batches:
            ids, mask = batch["input_ids"], batch["attention_mask"]
            atts = mllm(**{k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")},
                        output_attentions=True).attentions
            for b in range(ids.shape[0]):
                img = [t for t in range(ids.shape[1]) if ids[b, t] == mllm.image_token_id]
                txt = [t for t in range(ids.shape[1]) if mask[b, t] and t not in img]
                queries = [t for t in txt if t > img[0]]
                for layer, att in enumerate(atts):
                    vals = [float(att[b, h, q, img].sum() / (att[b, h, q, img].sum() + att[b, h, q, txt].sum()))
                            for h in range(att.shape[1]) for q in queries]
                    expected[layer] += sum(vals) / len(vals)
        mllm.llm.set_attn_implementation("sdpa")
    assert doc["visual_share"] == pytest.approx((expected / 4).tolist(), rel=1e-5)
    assert all(0.0 < a < 1.0 for a in doc["visual_share"])


def test_probe_needs_spliced_tokens(mllm: MLLM, monkeypatch) -> None:
    monkeypatch.setattr(mllm, "num_image_tokens", 0)
    with pytest.raises(ProbeError, match="splice"):
        visual_attention_share(mllm, [])


def test_probe_needs_attention_probabilities(mllm: MLLM, monkeypatch) -> None:
    from mllm.merge import probe

    monkeypatch.setattr(probe, "eager_attention", lambda llm: contextlib.nullcontext())  # sdpa returns none
    with pytest.raises(ProbeError, match=r"LlamaAttention of layer 0 gave attention probabilities none, "
                                         r"expected \[2, heads, \d+, \d+\] under eager"):
        visual_attention_share(mllm, _batches(mllm, 1))


def test_frank_on_mllm_checkpoints_with_the_probe_prior(tmp_path: Path, mllm: MLLM, ckpt) -> None:
    from transformers import LlamaForCausalLM

    base = LlamaForCausalLM(mllm.llm.config)
    base_state = {k: v.detach().clone() for k, v in base.state_dict().items()}
    base.save_pretrained(tmp_path / "base")
    reasoner = LlamaForCausalLM(mllm.llm.config)
    reasoner.load_state_dict(ckpt.perturbed(base_state, 4, scale=0.05))
    reasoner.save_pretrained(tmp_path / "reasoner")
    with torch.no_grad():
        mllm.llm.load_state_dict(ckpt.perturbed(base_state, 5, scale=0.02))
    mllm.save_pretrained(tmp_path / "mllm")
    run_probe(mllm, _batches(mllm), tmp_path / "probe")
    cfg = ckpt.write_yaml(tmp_path / "frank.yaml", {
        "merge_method": "frank", "base_model": str(tmp_path / "base"),
        "models": [{"model": str(tmp_path / "mllm")}, {"model": str(tmp_path / "reasoner")}],
        "parameters": {"prior": str(tmp_path / "probe" / "probe.json"), "prior_norm": "max"}, "name_map": "mllm",
    })
    out = run_merge(cfg, tmp_path / "merged")
    merged = MLLM.from_pretrained(out).eval()  # config YAML, llm/config.json and tokenizer/ came along
    m_state, v_state = merged.state_dict(), mllm.state_dict()
    doc = json.loads((out / "frank_coefficients.json").read_text())
    assert doc["equation"] == "Eq. 15" and len(doc["layers"]) == LAYERS
    for name, t in v_state.items():
        if not name.startswith("llm.model.layers."):  # encoder, projector, embeddings, norm, lm_head
            assert torch.equal(m_state[name], t), name
    lam = doc["layers"][1]["lambda_V"]
    key = "model.layers.1.mlp.up_proj.weight"
    want = base_state[key] + lam * (v_state["llm." + key] - base_state[key]) + (1 - lam) * (
        reasoner.state_dict()[key] - base_state[key])
    assert torch.allclose(m_state["llm." + key], want, atol=1e-6)
    image = Image.new("RGB", (32, 32), (200, 30, 30))
    assert isinstance(merged.generate([image], ["what colour is the circle?"], max_new_tokens=3)[0], str)
