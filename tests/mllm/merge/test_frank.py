"""FRANK: closed-form coefficients by hand, the attention prior, and a full MLLM merge on disk."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from mllm.merge import MergeError, run_merge
from mllm.merge.methods.base import TensorInfo
from mllm.merge.methods.frank import Frank, FrankParams, coefficients, fit_decay, prior_weights

T = torch.tensor


def _layer_pass(params: FrankParams, num_layers: int = 2) -> dict:
    """Pass 1 + finalize over a toy model: layer 0 has two tensors, layer 1 one; base is 0."""
    blocks = {  # name -> (tau_V, tau_R)
        "model.layers.0.a": (T([1.0, 2.0]), T([2.0, 0.0])),
        "model.layers.0.b": (T([2.0]), T([0.0])),  # layer 0: ||tau_V||^2 = 1+4+4 = 9, ||tau_R||^2 = 4
        "model.layers.1.a": (T([0.0, 1.0]), T([3.0, 0.0])),  # layer 1: 1 and 9
    }
    sums: dict = {}
    for name, (v, r) in blocks.items():
        info = TensorInfo(name, int(name.split(".")[2]), num_layers)
        for k, x in Frank.collect({"V": v, "R": r}, torch.zeros_like(v), params, info).items():
            sums.setdefault(info.group, {}).setdefault(k, 0.0)
            sums[info.group][k] += x
    return Frank.finalize(sums, params, num_layers)


def test_eq13_coefficients_are_per_layer_squared_norm_shares() -> None:
    stats = _layer_pass(FrankParams())
    assert stats["lambda"][0] == pytest.approx((9 / 13, 4 / 13))
    assert stats["lambda"][1] == pytest.approx((1 / 10, 9 / 10))
    info = TensorInfo("model.layers.0.a", 0, 2, stats=stats)
    base = T([1.0, 1.0])
    out = Frank.merge({"V": base + T([1.0, 2.0]), "R": base + T([2.0, 0.0])}, base, FrankParams(), info)
    assert torch.allclose(out, base + 9 / 13 * T([1.0, 2.0]) + 4 / 13 * T([2.0, 0.0]))


def test_eq15_with_fixed_decay_prior_sum_and_max_normalisation() -> None:
    alpha = math.log(2.0)  # e^{-alpha (l-1)} = 1, 1/2 -> sum-normalised 2/3, 1/3
    assert prior_weights(alpha, 2, "sum") == pytest.approx([2 / 3, 1 / 3])
    assert prior_weights(alpha, 2, "max") == pytest.approx([1.0, 0.5])
    # a share rising with depth (alpha < 0): max-normalised weights peak at 1 on the last layer, never above
    assert prior_weights(-alpha, 3, "max") == pytest.approx([0.25, 0.5, 1.0])
    stats = _layer_pass(FrankParams(alpha=alpha))
    # layer 0: w_V = 2/3: (2/3 * 9) / (2/3 * 9 + 1/3 * 4) = 6 / (6 + 4/3)
    assert stats["lambda"][0][0] == pytest.approx(6 / (6 + 4 / 3))
    # layer 1: w_V = 1/3: (1/3 * 1) / (1/3 + 2/3 * 9)
    assert stats["lambda"][1][0] == pytest.approx((1 / 3) / (1 / 3 + 6))
    stats = _layer_pass(FrankParams(alpha=alpha, prior_norm="max"))
    assert stats["lambda"][0] == pytest.approx((1.0, 0.0))  # w_R = 0 at the first layer
    assert stats["lambda"][1][0] == pytest.approx(0.5 * 1 / (0.5 * 1 + 0.5 * 9))


def test_zero_task_vectors_fall_back_to_the_prior() -> None:
    assert coefficients(0.0, 0.0, 0.3, 0.7) == pytest.approx((0.3, 0.7))


def test_fit_decay_recovers_an_exact_exponential() -> None:
    share = [2.0 * math.exp(-0.3 * layer) for layer in range(1, 9)]
    alpha, c = fit_decay(share)
    assert alpha == pytest.approx(0.3) and c == pytest.approx(2.0)
    with pytest.raises(ValueError, match="> 0"):
        fit_decay([0.5, 0.0])


# --- end to end: a tiny LLaVA (V), a reasoning Llama (R) and their base -------------------------
@pytest.fixture(scope="module")
def frank_models(tmp_path_factory: pytest.TempPathFactory, ckpt) -> dict[str, Path]:
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    root = tmp_path_factory.mktemp("frank")
    base = ckpt.save_llama(root / "base", seed=0)
    base_state = ckpt.state_of(base)
    reasoner = ckpt.save_llama(root / "reasoner", ckpt.perturbed(base_state, 7, scale=0.1))
    text = ckpt.llama_config(vocab=56)  # the MLLM's vocabulary has extra (image) tokens
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                       num_attention_heads=2, image_size=16, patch_size=8),
        text_config=text, image_token_index=55,
    )
    torch.manual_seed(3)
    mllm = LlavaForConditionalGeneration(cfg)
    with torch.no_grad():  # the MLLM's LLM = base + its own task vector, growing with depth
        for name, p in mllm.model.language_model.named_parameters():
            b = base_state[f"model.{name}"]
            scale = 0.03 * (1 + int(name.split(".")[1])) if name.startswith("layers.") else 0.03
            if p.shape == b.shape:  # the embedding has 8 more (image) rows: it stays random
                p.copy_(b + scale * torch.randn_like(b))
    mllm.save_pretrained(root / "mllm")
    return {"base": base, "reasoner": reasoner, "mllm": root / "mllm"}


def _frank_yaml(ckpt, path: Path, models: dict[str, Path], **params) -> Path:
    return ckpt.write_yaml(path, {
        "merge_method": "frank", "base_model": str(models["base"]),
        "models": [{"model": str(models["mllm"])}, {"model": str(models["reasoner"])}],
        "parameters": params, "name_map": "llava",
    })


def test_frank_merges_llm_blocks_and_keeps_the_vision_side(tmp_path: Path, ckpt, frank_models) -> None:
    from transformers import LlavaForConditionalGeneration

    probe = tmp_path / "probe.json"
    probe.write_text(json.dumps({"visual_share": [0.6, 0.4, 0.25, 0.2]}))
    out = run_merge(_frank_yaml(ckpt, tmp_path / "f.yaml", frank_models, prior=str(probe)), tmp_path / "out")
    merged, v = ckpt.state_of(out), ckpt.state_of(frank_models["mllm"])
    base, r = ckpt.state_of(frank_models["base"]), ckpt.state_of(frank_models["reasoner"])
    assert sorted(merged) == sorted(v)
    alpha, _ = fit_decay([0.6, 0.4, 0.25, 0.2])
    w = prior_weights(alpha, 4, "sum")
    doc = json.loads((out / "frank_coefficients.json").read_text())
    assert doc["equation"] == "Eq. 15" and (out / "frank_coefficients.png").stat().st_size > 0
    for layer in range(4):  # closed form by hand from the on-disk tensors
        prefix = f"model.layers.{layer}."
        names = [n for n in base if n.startswith(prefix)]
        nv = sum(float(((v["language_model." + n] - base[n]) ** 2).sum()) for n in names)
        nr = sum(float(((r[n] - base[n]) ** 2).sum()) for n in names)
        lam_v = w[layer] * nv / (w[layer] * nv + (1 - w[layer]) * nr)
        assert doc["layers"][layer]["lambda_V"] == pytest.approx(lam_v, rel=1e-5)
        for n in names:
            want = base[n] + lam_v * (v["language_model." + n] - base[n]) + (1 - lam_v) * (r[n] - base[n])
            assert torch.allclose(merged["language_model." + n], want, atol=1e-6)
    for n in v:  # vision tower, projector, embeddings, final norm, lm_head: the MLLM's
        if ".layers." not in n or n.startswith("vision_tower"):
            assert torch.equal(merged[n], v[n]), n
    model = LlavaForConditionalGeneration.from_pretrained(out)
    ids = torch.tensor([[1, 55, 55, 55, 55, 3]])
    logits = model(input_ids=ids, pixel_values=torch.randn(1, 3, 16, 16)).logits
    assert torch.isfinite(logits).all()


def test_frank_outside_reasoner_refuses_mismatched_vocab(tmp_path: Path, ckpt, frank_models) -> None:
    with pytest.raises(MergeError, match="vocab sizes differ"):
        run_merge(_frank_yaml(ckpt, tmp_path / "f.yaml", frank_models, outside="reasoner"), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_frank_without_name_map_names_the_missing_block(tmp_path: Path, ckpt, frank_models) -> None:
    path = _frank_yaml(ckpt, tmp_path / "f.yaml", frank_models)
    path.write_text(path.read_text().replace("name_map: llava", "name_map: {}"))
    with pytest.raises(MergeError, match="no decoder layers"):
        run_merge(path, tmp_path / "out")


def test_frank_prior_with_wrong_layer_count(tmp_path: Path, ckpt, frank_models) -> None:
    probe = tmp_path / "probe.json"
    probe.write_text(json.dumps({"visual_share": [0.5, 0.3]}))
    with pytest.raises(MergeError, match="2 layers, the model has 4"):
        run_merge(_frank_yaml(ckpt, tmp_path / "f.yaml", frank_models, prior=str(probe)), tmp_path / "out")


def test_frank_block_wise_statistics_match_whole_tensors(tmp_path: Path, ckpt, frank_models, monkeypatch) -> None:
    from mllm.merge import engine

    path = _frank_yaml(ckpt, tmp_path / "f.yaml", frank_models, alpha=0.2)
    whole = run_merge(path, tmp_path / "whole")
    monkeypatch.setattr(engine, "BLOCK_ELEMS", 100)  # 32 x 16 MLP weights -> blocks of 6 rows
    blocked = run_merge(path, tmp_path / "blocked")
    a, b = (json.loads((p / "frank_coefficients.json").read_text())["layers"] for p in (whole, blocked))
    assert [r["lambda_V"] for r in a] == pytest.approx([r["lambda_V"] for r in b], rel=1e-9)
    sa, sb = ckpt.state_of(whole), ckpt.state_of(blocked)
    assert all(torch.allclose(sa[n], sb[n], atol=1e-7) for n in sa)


def test_frank_outside_frank_merges_each_outer_tensor_with_eq13(tmp_path: Path, ckpt, llamas) -> None:
    """``outside: frank``: embeddings, final norm and lm_head each get Eq. 13 over their own ||tau||^2 (no
    prior, whatever the blocks use), by hand from the checkpoints (V = llama a, R = llama b, same vocab)."""
    path = ckpt.write_yaml(tmp_path / "f.yaml", {
        "merge_method": "frank", "base_model": str(llamas["base"]),
        "models": [{"model": str(llamas["a"])}, {"model": str(llamas["b"])}],
        "parameters": {"prior": "linear", "outside": "frank"},
    })
    out = run_merge(path, tmp_path / "out")
    merged, base = ckpt.state_of(out), ckpt.state_of(llamas["base"])
    v, r = ckpt.state_of(llamas["a"]), ckpt.state_of(llamas["b"])
    other = json.loads((out / "frank_coefficients.json").read_text())["other_tensors"]
    outer = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
    assert sorted(other) == sorted(outer)
    for n in outer:
        nv, nr = float(((v[n] - base[n]) ** 2).sum()), float(((r[n] - base[n]) ** 2).sum())
        lam_v = nv / (nv + nr)
        assert other[n]["w_V"] == 0.5 and other[n]["lambda_V"] == pytest.approx(lam_v, rel=1e-6)
        assert torch.allclose(merged[n], base[n] + lam_v * (v[n] - base[n]) + (1 - lam_v) * (r[n] - base[n]),
                              atol=1e-6), n
    # the blocks still follow the linear prior: block 1 is all V, the last all R
    n = "model.layers.0.mlp.down_proj.weight"
    assert torch.allclose(merged[n], v[n], atol=1e-6)
    n = "model.layers.3.mlp.down_proj.weight"
    assert torch.allclose(merged[n], r[n], atol=1e-6)
