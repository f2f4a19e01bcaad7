"""Gated cross-attention: hand-computed block and Perceiver Resampler, exact identity at init, visual flow,
KV-cached generate."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from mllm.injection.base import InjectionSpec, VisualContext
from mllm.injection.gated_xattn import (
    GatedXAttnBlock,
    GatedXAttnConfig,
    GatedXAttnInjector,
    PerceiverResampler,
    ResamplerConfig,
)
from mllm.schema import ConfigError

FAMILIES = ["llama", "qwen2"]
XATTN = {"name": "gated_xattn", "heads": 2, "dim_head": 8, "ff_mult": 2}
SPEC = InjectionSpec(hidden_size=8, num_layers=6, num_visual_tokens=4, visual_grid=(2, 2), encoder_layers=(0,),
                     encoder_dim=8)


def test_block_hand_computed() -> None:
    block = GatedXAttnBlock(dim=2, heads=1, dim_head=2, ff_mult=1, gate_init=0.0)
    with torch.no_grad():
        for lin in (block.to_q, block.to_out):
            lin.weight.copy_(torch.eye(2))
        block.to_kv.weight.copy_(torch.cat([torch.eye(2), torch.eye(2)]))
        block.attn_gate.fill_(math.atanh(0.5))  # tanh(a_x) = 0.5; the FFW gate stays closed
    y = torch.tensor([[[1.0, -1.0]]])
    visual = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    # LN(y) = [1, -1] (up to eps); scores = [1, -1] / sqrt(2); softmax -> [w, 1 - w]; values = visual rows
    ln = 1.0 / math.sqrt(1.0 + 1e-5)
    w = 1.0 / (1.0 + math.exp(-2.0 * ln / math.sqrt(2.0)))
    expected = torch.tensor([[[1.0 + 0.5 * w, -1.0 + 0.5 * (1.0 - w)]]])
    torch.testing.assert_close(block(y, block.keys_values(visual)), expected)


def test_closed_gates_train_the_gates_first() -> None:
    block = GatedXAttnBlock(dim=4, heads=2, dim_head=2, ff_mult=2, gate_init=0.0)
    y, visual = torch.randn(2, 3, 4), torch.randn(2, 5, 4)
    out = block(y, block.keys_values(visual))
    assert torch.equal(out, y)
    out.square().sum().backward()
    assert block.attn_gate.grad.abs() > 0 and block.ff_gate.grad.abs() > 0
    assert block.to_q.weight.grad.abs().sum() == 0 and block.ff[1].weight.grad.abs().sum() == 0


def test_positions_are_added_to_every_token_before_the_blocks() -> None:
    injector = GatedXAttnInjector(GatedXAttnConfig(every=6, positions=True), SPEC)
    assert torch.equal(injector.positions, torch.zeros(4, 8))  # zero at init: the tokens as they are
    tokens = torch.arange(2 * 4 * 8, dtype=torch.float32).reshape(2, 4, 8)
    with torch.no_grad():
        injector.positions.copy_(torch.arange(4.0)[:, None].expand(4, 8) * 100.0)  # token m gets +100 m
    mask = torch.ones(2, 3)
    with injector.use(VisualContext(attention_mask=mask, query_mask=mask, tokens=tokens)):
        media = injector.media(injector.context, torch.float32)
    assert torch.equal(media[1, 2], tokens[1, 2] + 200.0) and torch.equal(media[0, 0], tokens[0, 0])
    assert GatedXAttnInjector(GatedXAttnConfig(every=6), SPEC).positions is None


@pytest.mark.parametrize("cfg, layers", [
    (GatedXAttnConfig(), [0, 1, 2, 3, 4, 5]),
    (GatedXAttnConfig(every=2), [1, 3, 5]),  # OpenFlamingo: (i + 1) % every == 0
    (GatedXAttnConfig(every=4), [3]),
    (GatedXAttnConfig(layers=[-1, 0, 0]), [0, 5]),
])
def test_layer_choice(cfg: GatedXAttnConfig, layers: list[int]) -> None:
    assert GatedXAttnInjector(cfg, SPEC).layer_ids == layers


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("splice", [False, True])
def test_logits_identical_to_plain_llm_at_init(kit: Any, word_tokenizer: Any, family: str, splice: bool) -> None:
    model = kit.build(word_tokenizer, family, [XATTN], splice=splice)
    batch = kit.prompt_batch(model, kit.images(1)[0], "how many?", [7, 8])
    with torch.no_grad():
        ours = model(**batch).logits
        plain = model.llm(inputs_embeds=model.embed(batch["input_ids"], batch["pixel_values"]),
                          attention_mask=batch["attention_mask"]).logits  # no visual context: hooks idle
    assert torch.equal(ours, plain)
    if not splice:
        other = {**batch, "pixel_values": model.preprocess(kit.images(2)[1])[None]}
        with torch.no_grad():
            assert torch.equal(model(**other).logits, ours)  # closed gates: the image has no effect yet


@pytest.mark.parametrize("family", FAMILIES)
def test_open_gates_carry_the_image_and_generate_uses_the_cache(kit: Any, word_tokenizer: Any, family: str) -> None:
    model = kit.build(word_tokenizer, family, [{**XATTN, "gate_init": 0.7, "every": 2}], splice=False)
    assert model.num_image_tokens == 0 and model.num_visual_tokens == 16
    a, b = (kit.prompt_batch(model, im, "how many?", [7]) for im in kit.images(2))
    with torch.no_grad():
        assert not torch.allclose(model(**a).logits, model(**b).logits)
    calls = []
    for block in model.injectors[0].blocks.values():
        original = block.keys_values
        block.keys_values = lambda v, _f=original: calls.append(1) or _f(v)
    model.generate_ids(kit.images(1), ["how many?"], max_new_tokens=5)
    assert len(calls) == 2  # the visual keys/values of each of the 2 blocks, once for all decoding steps
    kit.assert_generate_matches_teacher_forcing(model)
    kit.assert_batch_equals_one_by_one(model)


def _ln(v: list[float]) -> list[float]:
    """LayerNorm (unit weight, zero bias, eps 1e-5) of one vector."""
    mean = sum(v) / len(v)
    var = sum((x - mean) ** 2 for x in v) / len(v)
    return [(x - mean) / math.sqrt(var + 1e-5) for x in v]


def _matvec(m: list[list[float]], v: list[float]) -> list[float]:
    return [sum(a * b for a, b in zip(row, v, strict=True)) for row in m]


def test_resampler_hand_computed() -> None:
    resampler = PerceiverResampler(dim=3, cfg=ResamplerConfig(latents=1, depth=1, heads=1, dim_head=3, ff_mult=1))
    layer = resampler.layers[0]
    w_v = [[1.0, 0.0, 2.0], [0.0, 3.0, 1.0], [2.0, 1.0, 0.0]]
    w_2 = [[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 2.0]]
    with torch.no_grad():
        for lin in (layer.to_q, layer.to_out, layer.ff[1]):
            lin.weight.copy_(torch.eye(3))
        layer.ff[3].weight.copy_(torch.tensor(w_2))
        layer.to_kv.weight.copy_(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], *w_v]))  # W_k = I; W_v
        resampler.latents.copy_(torch.tensor([[0.0, 0.0, 3.0]]))
        resampler.time.copy_(torch.tensor([0.0, 0.0, 1.0]))
    media = [[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]]
    latent = [0.0, 0.0, 3.0]
    # keys/values read [LN(media + t) ; LN(latent)]; the query is LN(latent), the scale 1 / sqrt(3)
    inputs = [_ln([m[0], m[1], m[2] + 1.0]) for m in media] + [_ln(latent)]
    scores = [sum(a * b for a, b in zip(_ln(latent), k, strict=True)) / math.sqrt(3.0) for k in inputs]
    weights = [math.exp(s) / sum(math.exp(t) for t in scores) for s in scores]
    values = [_matvec(w_v, n) for n in inputs]
    z1 = [latent[c] + sum(w * v[c] for w, v in zip(weights, values, strict=True)) for c in range(3)]
    gelu = [x * 0.5 * (1.0 + math.erf(x / math.sqrt(2.0))) for x in _ln(z1)]
    z2 = [a + b for a, b in zip(z1, _matvec(w_2, gelu), strict=True)]
    torch.testing.assert_close(resampler(torch.tensor([media])), torch.tensor([[_ln(z2)]]))
    # the media count is free; the output is always R latents
    assert PerceiverResampler(8, ResamplerConfig(latents=3, depth=2, heads=2, dim_head=4))(
        torch.randn(2, 7, 8)).shape == (2, 3, 8)


@pytest.mark.parametrize("family", FAMILIES)
def test_resampled_latents_are_the_cross_attended_set(kit: Any, word_tokenizer: Any, family: str) -> None:
    resampler = {"latents": 5, "depth": 2, "heads": 2, "dim_head": 8, "ff_mult": 2}
    model = kit.build(word_tokenizer, family, [{**XATTN, "gate_init": 0.7, "every": 2, "resampler": resampler}],
                      splice=False)
    injector = model.injectors[0]
    assert injector.cfg.resampler == ResamplerConfig(**resampler)
    shapes, calls = [], []
    for block in injector.blocks.values():
        original = block.keys_values
        block.keys_values = lambda v, _f=original: shapes.append(tuple(v.shape)) or _f(v)
    injector.resampler.register_forward_hook(lambda *_: calls.append(1))
    a, b = (kit.prompt_batch(model, im, "how many?", [7]) for im in kit.images(2))
    width = model.llm.config.hidden_size
    with torch.no_grad():
        out = model(**a).logits
        assert shapes == [(1, 5, width)] * 2 and len(calls) == 1 and out.shape[1] == a["input_ids"].shape[1]
        assert not torch.allclose(out, model(**b).logits)  # the image reaches the logits through the latents
    shapes.clear()
    calls.clear()
    model.generate_ids(kit.images(1), ["how many?"], max_new_tokens=5)
    assert shapes == [(1, 5, width)] * 2 and len(calls) == 1  # once per context, reused while decoding
    kit.assert_generate_matches_teacher_forcing(model)
    model.train()
    model(**a).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in injector.resampler.parameters())


def test_resampler_config_errors(kit: Any, word_tokenizer: Any) -> None:
    with pytest.raises(ConfigError, match=r"injectors\[0\]\.resampler\.latents: expected a positive integer, got 0"):
        kit.build(word_tokenizer, "llama", [{**XATTN, "resampler": {"latents": 0}}], splice=False)
    with pytest.raises(ConfigError, match=r"injectors\[0\]\.resampler\.dept: unknown key.*did you mean 'depth'"):
        kit.build(word_tokenizer, "llama", [{**XATTN, "resampler": {"dept": 2}}], splice=False)
    assert GatedXAttnConfig().resampler is None  # off unless a recipe asks for it
