"""DPN pyramid: hand-computed pooling, routing and loss; identity experts reproduce the plain LLM;
the sequence really shrinks with renumbered positions; generate == teacher-forced argmax."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F

from mllm.injection.base import InjectionError, InjectionSpec, VisualContext
from mllm.injection.pyramid import PyramidConfig, PyramidInjector, cell_of, pool_grid
from mllm.loss import supervised_positions
from mllm.model import MLLM, ModelError

CASES = [("llama", "sdpa"), ("qwen2", "sdpa"), ("llama", "eager")]
DPN = {"name": "pyramid", "layers": [0, 1], "min_tokens": 2, "skip_below": 2}  # pool after layers 0 and 1 of 4
SPEC = InjectionSpec(hidden_size=8, num_layers=4, num_visual_tokens=16, visual_grid=(4, 4), encoder_layers=(0,),
                     encoder_dim=8)


def force(model: MLLM, experts: list[int]) -> None:
    """Route every row of pooling stage i to expert ``experts[i]`` with probability 1."""
    for router, k in zip(model.injectors[0].routers.values(), experts, strict=True):
        router.forward = lambda h, k=k: F.one_hot(torch.full((h.shape[0],), k), 3).to(h.dtype)


def test_pool_grid_hand_computed() -> None:
    tokens = torch.arange(8.0).reshape(8, 1)  # a 2 x 4 raster: [[0 1 2 3], [4 5 6 7]]
    assert pool_grid(tokens, (2, 4), (1, 2), "max").flatten().tolist() == [1.0, 3.0, 5.0, 7.0]
    assert pool_grid(tokens, (2, 4), (2, 2), "avg").flatten().tolist() == [2.5, 4.5]
    odd = torch.arange(9.0).reshape(9, 1)  # 3 x 3, kernel 2: edge cells are clipped (ceil mode)
    assert pool_grid(odd, (3, 3), (2, 2), "max").flatten().tolist() == [4.0, 5.0, 7.0, 8.0]
    assert pool_grid(odd, (3, 3), (2, 2), "avg").flatten().tolist() == [2.0, 3.5, 6.5, 8.0]
    assert cell_of(torch.arange(9), (3, 3), (2, 2)).tolist() == [0, 0, 1, 0, 0, 1, 2, 2, 3]
    assert cell_of(torch.arange(8), (2, 4), (1, 2)).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]


def _context(rows: int = 1) -> VisualContext:
    ones = torch.ones(rows, 20, dtype=torch.long)
    return VisualContext(attention_mask=ones, query_mask=ones.bool())


def test_routing_loss_hand_computed() -> None:
    injector = PyramidInjector(PyramidConfig(layers=[1]), SPEC).train()
    with injector.use(_context()):
        injector.state["decisions"] = [torch.tensor([0.2, 0.3, 0.5]), torch.tensor([0.6, 0.3, 0.1])]
        # k_max = 2 (c = 2, p = 0.5) and 0 (c = 0): mean score 0.5 -> 0.001 * max(0, 1.5 - 0.5)
        torch.testing.assert_close(injector.aux_loss(), torch.tensor(0.001))
        injector.eval()
        assert injector.aux_loss() is None  # the routing loss is a training loss
    assert injector.state == {}  # dropped with the context


def test_router_equation_and_choice() -> None:
    injector = PyramidInjector(PyramidConfig(layers=[1], min_tokens=8), SPEC)
    router = injector.routers["1"]
    h = torch.randn(3, 8)
    net = router.net
    expected = torch.softmax(0.1 * net[3](F.gelu(net[1](F.layer_norm(h, (8,), net[0].weight, net[0].bias)))), -1)
    torch.testing.assert_close(router(h), expected)
    assert injector.eval()._choose(torch.tensor([0.1, 0.2, 0.7]), (4, 4), 0) == 2  # inference: argmax, no floor
    injector.train()
    draws = {injector._choose(torch.tensor([0.05, 0.05, 0.9]), (4, 4), 0) for _ in range(200)}
    assert draws == {0, 1}  # expert 2 would leave 4 < min_tokens = 8 visual tokens: never drawn in training
    assert injector._choose(torch.tensor([0.2, 0.3, 0.5]), (2, 2), 0) == 0  # nothing reaches the floor: keep most


@pytest.mark.parametrize("family, attn", CASES)
def test_identity_experts_reproduce_the_plain_llm(kit: Any, word_tokenizer: Any, family: str, attn: str) -> None:
    """Experts (1,1) with p = 1 pool nothing, but every later layer still gets rebuilt masks, positions
    and rotary embeddings: they must equal the model's own (right-padded batch included)."""
    model = kit.build(word_tokenizer, family, [DPN], attn=attn)
    force(model, [0, 0])
    rows = [kit.prompt_batch(model, im, q, a) for im, q, a in zip(kit.images(2), kit.questions[:2], [[7, 8, 9], [7]], strict=True)]
    width = max(r["input_ids"].shape[1] for r in rows)
    batch = {
        "input_ids": torch.cat([F.pad(r["input_ids"], (0, width - r["input_ids"].shape[1])) for r in rows]),
        "attention_mask": torch.cat([F.pad(r["attention_mask"], (0, width - r["input_ids"].shape[1])) for r in rows]),
        "labels": torch.cat([F.pad(r["labels"], (0, width - r["input_ids"].shape[1]), value=-100) for r in rows]),
        "pixel_values": torch.cat([r["pixel_values"] for r in rows]),
    }
    with torch.no_grad():
        ours = model(**batch)
        plain = model.llm(inputs_embeds=model.embed(batch["input_ids"], batch["pixel_values"]),
                          attention_mask=batch["attention_mask"], labels=batch["labels"])
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(ours.logits[real], plain.logits[real], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.loss, plain.loss, rtol=1e-5, atol=1e-5)


def test_sequence_shrinks_with_pooled_values_and_renumbered_positions(kit: Any, word_tokenizer: Any) -> None:
    model = kit.build(word_tokenizer, "llama", [DPN])
    force(model, [2, 1])  # 4x4 -(2,2)-> 2x2 -(1,2)-> 2x1
    layers = model.llm.get_decoder().layers
    seen: dict[str, Any] = {"lengths": []}
    layers[0].register_forward_hook(lambda _m, _a, out: seen.update(raw=out), prepend=True)  # before pooling
    for layer in layers:  # registered after the injector's hooks: they see what the layer gets
        layer.register_forward_pre_hook(lambda _m, a, kw: seen["lengths"].append(a[0].shape[1]), with_kwargs=True)
    layers[1].register_forward_pre_hook(lambda _m, a, kw: seen.update(h1=a[0], pos1=kw["position_ids"]),
                                        with_kwargs=True)
    batch = kit.prompt_batch(model, kit.images(1)[0], "how many?", [7, 8])
    length = batch["input_ids"].shape[1]
    with torch.no_grad():
        out = model(**batch)
    assert seen["lengths"] == [length, length - 12, length - 14, length - 14]
    assert out.logits.shape[1] == length  # gathered back after the last layer: labels line up
    assert model.injectors[0].last_visual_tokens == [[16], [4], [2]]
    assert model.injectors[0].tokens_per_layer() == [16.0, 4.0, 2.0, 2.0]
    start = int((batch["input_ids"][0] == model.image_token_id).nonzero()[0])
    raw = seen["raw"][0]
    pooled = F.max_pool2d(raw[start: start + 16].T.reshape(1, -1, 4, 4), 2).flatten(2)[0].T
    torch.testing.assert_close(seen["h1"][0], torch.cat([raw[:start], pooled, raw[start + 16:]]))
    assert seen["pos1"].tolist() == [list(range(length - 12))]  # text after the image moved down by 12


@pytest.mark.parametrize("family, attn", CASES)
def test_generate_equals_teacher_forced_argmax(kit: Any, word_tokenizer: Any, family: str, attn: str) -> None:
    model = kit.build(word_tokenizer, family, [DPN], attn=attn)
    kit.assert_generate_matches_teacher_forcing(model)  # the random routers' own argmax choice
    force(model, [2, 1])
    kit.assert_generate_matches_teacher_forcing(model)
    assert model.injectors[0].last_visual_tokens == [[16], [4], [2]]


def test_left_padded_batch_with_per_row_routing(kit: Any, word_tokenizer: Any) -> None:
    model = kit.build(word_tokenizer, "llama", [DPN])
    for router in model.injectors[0].routers.values():  # a row's expert depends on its own router token
        router.forward = lambda h: F.one_hot(h[:, :3].argmax(-1), 3).to(h.dtype)
    kit.assert_batch_equals_one_by_one(model)
    injector = model.injectors[0]
    injector.reset_stats()
    model.generate_ids(kit.images(3), kit.questions, max_new_tokens=2)
    per_row = injector.last_visual_tokens
    assert len(set(zip(*per_row, strict=True))) > 1  # rows routed differently
    means = [sum(stage) / 3 for stage in per_row]
    assert injector.tokens_per_layer() == [means[0], means[1], means[2], means[2]]  # mean over the rows


def test_training_adds_the_routing_loss_and_trains_the_routers(kit: Any, word_tokenizer: Any) -> None:
    model = kit.build(word_tokenizer, "llama", [{**DPN, "min_tokens": 4}]).train()
    injector = model.injectors[0]
    aux, decisions = [], []
    injector.aux_loss = lambda f=injector.aux_loss: decisions.extend(injector.state["decisions"]) or aux.append(f()) or aux[-1]
    batch = kit.prompt_batch(model, kit.images(1)[0], "how many?", [7, 8])
    out = model(**batch)
    counts = injector.last_visual_tokens
    assert all(n >= 4 for n in counts[1] + counts[2])  # training draws respect min_tokens
    keep = supervised_positions(batch["labels"])  # training mode: logits at the supervised positions only
    ce = F.cross_entropy(out.logits[0], batch["labels"][0, keep + 1], ignore_index=-100)
    probs = torch.stack(decisions).detach()  # one decision per pooling stage
    assert probs.shape == (2, 3)
    score = (probs.argmax(-1) * probs.max(-1).values).mean()
    torch.testing.assert_close(aux[0].detach(), 0.001 * torch.clamp(1.5 - score, min=0))
    torch.testing.assert_close(out.loss.detach(), ce.detach() + aux[0].detach())
    out.loss.backward()
    for router in model.injectors[0].routers.values():
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in router.parameters())


def test_configuration_errors(kit: Any, word_tokenizer: Any) -> None:
    with pytest.raises(ModelError, match=r"model.injectors\[0\] \(pyramid\): works on spliced visual tokens"):
        kit.build(word_tokenizer, "llama", [DPN], splice=False)
    with pytest.raises(ModelError, match="pooling after the last layer"):
        kit.build(word_tokenizer, "llama", [{**DPN, "layers": [1, 3]}])
    with pytest.raises(ModelError, match="no \\(rows, cols\\) grid"):
        kit.build(word_tokenizer, "llama", [DPN], projector={"name": "pyramid", "levels": [1, 2]})
    model = kit.build(word_tokenizer, "llama", [DPN], projector={"name": "pool_adapter", "kernel": 2})
    assert model.injectors[0].grid == (2, 2) and model.num_image_tokens == 4


def _watch_first_stage(kit: Any, model: MLLM) -> tuple[dict[str, Any], dict[str, torch.Tensor], int]:
    """Hooks recording layer 0's output before pooling (``raw``), layer 1's input (``h1``) and the first router's
    probabilities (``p``); a one-image batch and where its visual tokens start."""
    seen: dict[str, Any] = {}
    layers = model.llm.get_decoder().layers
    layers[0].register_forward_hook(lambda _m, _a, out: seen.update(raw=out), prepend=True)
    layers[1].register_forward_pre_hook(lambda _m, a, kw: seen.update(h1=a[0]), with_kwargs=True)
    model.injectors[0].routers["0"].register_forward_hook(lambda _m, _a, out: seen.update(p=out))
    batch = kit.prompt_batch(model, kit.images(1)[0], "how many?", [7, 8])
    return seen, batch, int((batch["input_ids"][0] == model.image_token_id).nonzero()[0])


def test_pin_routes_every_row_and_keeps_the_routers_own_scale(kit: Any, word_tokenizer: Any) -> None:
    """A trained DPN at a fixed budget: stage s pools with expert pinned[s] in eval and training alike, scaled
    by the router's own probability of that expert (the magnitudes the deeper layers learnt)."""
    model = kit.build(word_tokenizer, "llama", [DPN])
    injector = model.injectors[0]
    seen, batch, start = _watch_first_stage(kit, model)
    injector.pin([2, 1])
    for mode in (model.eval, model.train):
        mode()
        with torch.no_grad():
            model(**batch)
        assert injector.last_visual_tokens == [[16], [4], [2]]
        raw = seen["raw"][0][start: start + 16]
        pooled = F.max_pool2d(raw.T.reshape(1, -1, 4, 4), 2).flatten(2)[0].T * seen["p"][0, 2]
        torch.testing.assert_close(seen["h1"][0][start: start + 4], pooled)
    model.eval()
    injector.pin(None)  # the routers choose again: their argmax
    with torch.no_grad():
        model(**batch)
    assert injector.last_visual_tokens[1] == [16 // [1, 2, 4][int(seen["p"][0].argmax())]]
    for bad in ([3, 0], [0]):
        with pytest.raises(InjectionError, match="pyramid.pin: expected 2 expert indices in 0..2"):
            injector.pin(bad)


def test_straight_through_gate_keeps_the_scale_and_dpns_router_gradient(kit: Any, word_tokenizer: Any) -> None:
    """gate straight_through: the pooled tokens enter layer 1 unscaled, and a loss linear in layer 1's input gives
    the router the gradient DPN's p_k factor gives it (d/dp of p * Pool and of (1 + p - sg p) * Pool: Pool)."""
    model = kit.build(word_tokenizer, "llama", [DPN])
    injector = model.injectors[0]
    injector.pin([2, 1])
    seen, batch, start = _watch_first_stage(kit, model)
    weight = torch.randn(1, batch["input_ids"].shape[1] - 12, model.llm.config.hidden_size,
                         generator=torch.Generator().manual_seed(0))
    grads, inputs = {}, {}
    for gate in ("prob", "straight_through"):
        injector.cfg.gate = gate
        model.zero_grad()
        model(**batch)
        (seen["h1"] * weight).sum().backward()
        grads[gate] = [p.grad.clone() for p in injector.routers["0"].parameters()]
        inputs[gate] = seen["h1"][0, start: start + 4].detach()
        raw = seen["raw"][0, start: start + 16].detach()
    pooled = F.max_pool2d(raw.T.reshape(1, -1, 4, 4), 2).flatten(2)[0].T
    torch.testing.assert_close(inputs["straight_through"], pooled)
    torch.testing.assert_close(inputs["prob"], pooled * seen["p"][0, 2].detach())
    for a, b in zip(grads["prob"], grads["straight_through"], strict=True):
        assert a.abs().sum() > 0
        torch.testing.assert_close(a, b)
