"""DEHVF FFN memory: hand-computed selection and memory read, the hooked FFN against its equation,
no visual token in the sequence, KV-cached generate."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from mllm.injection.base import InjectionSpec
from mllm.injection.ffn_embed import FFNEmbedConfig, FFNEmbedInjector, memory_read, select_weights
from mllm.model import MLLM, ModelError

FAMILIES = ["llama", "qwen2"]
DEHVF = {"name": "ffn_embed", "layers": [1, 3]}


def test_select_weights_hand_computed() -> None:
    logits = torch.tensor([[1.0, 2.0, 3.0]])
    e = [math.exp(v) for v in (1.0, 2.0, 3.0)]
    torch.testing.assert_close(select_weights(logits, 1.0, 0), torch.tensor([[v / sum(e) for v in e]]))
    # top-2 of [1, 2, 3] at tau = 2: softmax over [2/2, 3/2] only
    a, b = math.exp(1.0), math.exp(1.5)
    torch.testing.assert_close(select_weights(logits, 2.0, 2), torch.tensor([[0.0, a / (a + b), b / (a + b)]]))


def test_memory_read_hand_computed() -> None:
    x = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    keys = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])
    values = torch.tensor([[[1.0, 1.0], [2.0, -1.0]]])
    silu = [v / (1.0 + math.exp(-v)) for v in (1.0, 2.0)]
    # token 0: scores [1, 0] -> SiLU [silu(1), 0]; token 1: scores [0, 2] -> [0, silu(2)]
    expected = torch.tensor([[[silu[0], silu[0]], [2.0 * silu[1], -silu[1]]]])
    torch.testing.assert_close(memory_read(x, keys, values), expected)


@pytest.fixture(params=FAMILIES)
def model(request: pytest.FixtureRequest, kit: Any, word_tokenizer: Any) -> MLLM:
    return kit.build(word_tokenizer, request.param, [DEHVF], splice=False, layers=[0, 1])


def test_llm_sees_only_text_tokens(model: MLLM, kit: Any) -> None:
    assert model.num_image_tokens == 0 and model.num_visual_tokens == 16
    assert model.projector.in_dim == 32  # one encoder layer's width: the fuser's output is projected
    batch = kit.prompt_batch(model, kit.images(1)[0], "how many?", [7])
    assert (batch["input_ids"] != model.image_token_id).all()
    lengths = []
    model.llm.get_decoder().layers[0].register_forward_pre_hook(lambda _m, args: lengths.append(args[0].shape[1]))
    with torch.no_grad():
        out = model(**batch)
    assert lengths == [batch["input_ids"].shape[1]] and out.logits.shape[1] == batch["input_ids"].shape[1]
    other = {**batch, "pixel_values": model.preprocess(kit.images(2)[1])[None]}
    with torch.no_grad():
        assert not torch.allclose(model(**other).logits, out.logits)  # the image reaches the logits


@pytest.mark.parametrize("order", ["fuse_then_project", "project_then_fuse"])
def test_hooked_ffn_equals_the_equation(model: MLLM, kit: Any, order: str) -> None:
    injector = model.injectors[0]
    injector.cfg.order = order
    with torch.no_grad():
        injector.select["3"].weight.normal_()  # a non-uniform, prompt-dependent selection in layer 3
    batch = kit.prompt_batch(model, kit.images(1)[0], "what colour is the circle?", [9, 2])
    mlp = model.llm.get_decoder().layers[3].mlp
    seen = {}
    mlp.register_forward_hook(lambda _m, args, out: seen.update(x=args[0], out=out))  # after the injector's hook
    with torch.no_grad():
        model(**batch)
        x = seen["x"]
        prompt = (batch["labels"] == -100)[0]  # query = mean of x over the prompt tokens
        q = x[0, prompt].mean(0, keepdim=True)
        beta = torch.softmax(injector.select["3"](q), dim=-1)
        feats = model.encoder_features(batch["pixel_values"])
        if order == "fuse_then_project":
            z = 0.01 * model.projector(beta[0, 0] * feats[0] + beta[0, 1] * feats[1])
        else:
            z = 0.01 * (beta[0, 0] * model.projector(feats[0]) + beta[0, 1] * model.projector(feats[1]))
        read = F.silu(x @ (z + injector.pos_k).transpose(1, 2)) @ (z + injector.pos_v)
        torch.testing.assert_close(seen["out"], mlp.forward(x) + 0.1 * read)
    assert not torch.allclose(beta, torch.full_like(beta, 0.5))


def test_generate_matches_teacher_forcing_and_reuses_the_memory(model: MLLM, kit: Any, word_tokenizer: Any) -> None:
    calls = []
    model.projector.register_forward_hook(lambda *_: calls.append(1))
    model.generate_ids(kit.images(1), ["how many?"], max_new_tokens=5)
    assert len(calls) == 2  # Z_l of the 2 memory layers, once for all decoding steps
    shared = kit.build(word_tokenizer, "llama", [{"name": "ffn_embed", "order": "project_then_fuse"}], splice=False,
                       layers=[0, 1])
    calls.clear()
    shared.projector.register_forward_hook(lambda *_: calls.append(1))
    shared.generate_ids(kit.images(1), ["how many?"], max_new_tokens=5)
    assert len(calls) == 2  # one projection per tapped encoder layer, shared by all 4 memory layers
    kit.assert_generate_matches_teacher_forcing(model)
    kit.assert_batch_equals_one_by_one(model)


def test_memory_trains(model: MLLM, kit: Any) -> None:
    model.train()
    model.zero_grad()
    model(**kit.prompt_batch(model, kit.images(1)[0], "how many?", [7, 2])).loss.backward()
    injector = model.injectors[0]
    for param in (injector.pos_k, injector.pos_v, injector.select["1"].weight, *model.projector.parameters()):
        assert param.grad is not None and param.grad.abs().sum() > 0
    model.eval()


def test_configuration_errors(kit: Any, word_tokenizer: Any) -> None:
    with pytest.raises(ModelError, match=r"model.injectors\[0\] \(ffn_embed\).*model.splice is true"):
        kit.build(word_tokenizer, "llama", [DEHVF], splice=True)
    with pytest.raises(ModelError, match="top_k: 3 exceeds the 2 tapped encoder layers"):
        kit.build(word_tokenizer, "llama", [{**DEHVF, "top_k": 3}], splice=False, layers=[0, 1])
    with pytest.raises(ModelError, match="layer 4 is out of range for a 4-layer LLM"):
        kit.build(word_tokenizer, "llama", [{**DEHVF, "layers": [4]}], splice=False)


def test_top_k_breaks_ties_by_layer_order_and_keeps_a_gradient() -> None:
    logits = torch.zeros(1, 3, requires_grad=True)
    beta = select_weights(logits, 1.0, 2)
    torch.testing.assert_close(beta, torch.tensor([[0.5, 0.5, 0.0]]))  # equal logits: the first two layers
    (beta * torch.tensor([1.0, 0.0, 0.0])).sum().backward()
    # d beta_0 / d logit_j = p_0 (delta_0j - p_j) / (p_0 + p_1) with p = 1/3 each, the kept sum held constant
    torch.testing.assert_close(logits.grad, torch.tensor([[1 / 3, -1 / 6, -1 / 6]]))
    top1 = torch.tensor([[0.0, 1.0]], requires_grad=True)
    beta = select_weights(top1, 1.0, 1)
    assert beta.tolist() == [[0.0, 1.0]]
    beta[0, 1].backward()
    p = 1.0 / (1.0 + math.exp(-1.0))  # softmax weight of the chosen layer: d/dlogits = [-p(1-p), p(1-p)] / p
    torch.testing.assert_close(top1.grad, torch.tensor([[-(1.0 - p), 1.0 - p]]))


def test_top_k_selects_exactly_k_nearest_in_depth_at_the_first_step() -> None:
    spec = InjectionSpec(hidden_size=8, num_layers=4, num_visual_tokens=4, visual_grid=(2, 2),
                         encoder_layers=(0, 1, 2, 3), encoder_dim=8)
    injector = FFNEmbedInjector(FFNEmbedConfig(top_k=2), spec)
    query = torch.randn(3, 8)
    beta = {i: select_weights(injector.select[str(i)](query), 1.0, 2) for i in range(4)}
    # LLM layer l at relative depth l/3 against encoder layers at m/3: layer 1 is as far from 0 as from 2,
    # the tie goes to 0 (listed first); layer 2 likewise keeps 1 before 3
    assert {i: b.gt(0).nonzero()[:, 1].view(3, 2).tolist() for i, b in beta.items()} == {
        0: [[0, 1]] * 3, 1: [[0, 1]] * 3, 2: [[1, 2]] * 3, 3: [[2, 3]] * 3}
    near = 1.0 / (1.0 + math.exp(-1.0 / 3.0))  # logits 0 and -1/3 for the nearest and the next layer
    torch.testing.assert_close(beta[0][0], torch.tensor([near, 1.0 - near, 0.0, 0.0]))
    torch.testing.assert_close(beta[1][0], torch.tensor([1.0 - near, near, 0.0, 0.0]))
    soft = FFNEmbedInjector(FFNEmbedConfig(top_k=0), spec)
    assert all(lin.bias.abs().sum() == 0 for lin in soft.select.values())  # soft selection starts uniform


def test_top_k_selector_trains(kit: Any, word_tokenizer: Any) -> None:
    model = kit.build(word_tokenizer, "llama", [{**DEHVF, "top_k": 1}], splice=False, layers=[0, 1]).train()
    model(**kit.prompt_batch(model, kit.images(1)[0], "how many?", [7, 2])).loss.backward()
    for lin in model.injectors[0].select.values():
        assert lin.weight.grad.abs().sum() > 0 and lin.bias.grad.abs().sum() > 0
