"""xattn_report: gates and norms against the decoder layer's own input, seen before and after the injector."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from mllm.injection.base import get_hidden
from mllm.injection.diagnose import ffn_report, position_probe, router_report, xattn_report


def test_report_matches_the_stream_seen_around_the_injector(kit: Any, word_tokenizer: Any) -> None:
    xattn = {"name": "gated_xattn", "heads": 2, "dim_head": 8, "ff_mult": 2, "every": 2}
    model = kit.build(word_tokenizer, "llama", [xattn], splice=False)
    injector = model.injectors[0]
    with torch.no_grad():
        injector.blocks["1"].attn_gate.fill_(math.atanh(0.5))  # layer 1: only the visual read, FFW gate closed
        injector.blocks["3"].ff_gate.fill_(math.atanh(0.25))  # layer 3: only the FFW, cross-attention closed
    batch = kit.prompt_batch(model, kit.images(1)[0], "how many?", [7])
    batch["attention_mask"][0, 0] = 0  # a padded token is left out of the averages
    real = batch["attention_mask"][0].bool()
    streams: dict[str, torch.Tensor] = {}
    layers = model.llm.get_decoder().layers
    for i in (1, 3):  # the decoder layer's input before the injector's pre-hook rewrites it, and after
        for key, prepend in ((f"in{i}", True), (f"out{i}", False)):
            layers[i].register_forward_pre_hook(lambda _m, args, kw, _k=key: streams.update({_k: get_hidden(args, kw)}),
                                                with_kwargs=True, prepend=prepend)
    report = xattn_report(model, batch)
    assert [(r.layer, r.attn_gate, r.ff_gate) for r in report] == [(1, 0.5, 0.0), (3, 0.0, 0.25)]
    for r in report:
        before, after = streams[f"in{r.layer}"][0, real], streams[f"out{r.layer}"][0, real]
        delta = (after - before).norm(dim=-1).mean().item()
        assert math.isclose(r.residual, before.norm(dim=-1).mean().item(), rel_tol=1e-5)
        assert math.isclose(r.block_delta, delta, rel_tol=1e-5) and r.block_delta > 0
    assert math.isclose(report[0].visual_read, report[0].block_delta, rel_tol=1e-5)  # FFW closed: all is the read
    assert report[1].visual_read == 0.0 and math.isclose(report[1].read_ratio, 0.0)
    assert math.isclose(report[0].read_ratio, report[0].visual_read / report[0].residual)


def test_position_probe_reads_positions_only_where_the_features_hold_them() -> None:
    gen = torch.Generator().manual_seed(0)
    content = torch.randn(40, 8, 6, generator=gen)  # per-token content, independent of the position
    place = torch.eye(8).expand(40, 8, 8)  # one-hot cell index
    assert position_probe(torch.cat([content, place], dim=-1)) == 1.0
    # every token of an image shares its features: nothing tells the 8 places apart, so the probe
    # can only guess one class for them all and scores exactly 1/8
    same = torch.randn(40, 1, 6, generator=gen).expand(40, 8, 6)
    assert position_probe(same) == 0.125
    with pytest.raises(ValueError, match="no train/test split"):
        position_probe(content[:1])


def test_ffn_report_splits_the_hooked_ffn_into_its_own_output_and_the_memory_read(kit: Any, word_tokenizer: Any) -> None:
    dehvf = {"name": "ffn_embed", "layers": [1, 3], "scale": 0.5, "visual_scale": 1.0}
    model = kit.build(word_tokenizer, "llama", [dehvf], splice=False, layers=[0, 1])
    batch = kit.prompt_batch(model, kit.images(1)[0], "how many?", [7])
    batch["attention_mask"][0, 0] = 0
    real = batch["attention_mask"][0].bool()
    raw: dict[int, torch.Tensor] = {}
    total: dict[int, torch.Tensor] = {}
    layers = model.llm.get_decoder().layers
    for i in (1, 3):  # prepended: the FFN's own output before the injector adds its read; appended: after
        layers[i].mlp.register_forward_hook(lambda _m, _a, out, _i=i: raw.__setitem__(_i, out), prepend=True)
        layers[i].mlp.register_forward_hook(lambda _m, _a, out, _i=i: total.__setitem__(_i, out))
    report = ffn_report(model, batch)
    assert [r.layer for r in report] == [1, 3]
    for r in report:
        assert r.selection == [0.5, 0.5]  # zero-initialised selector over 2 tapped layers: softmax of equal logits
        own = raw[r.layer][0, real].norm(dim=-1).mean().item()
        read = (total[r.layer] - raw[r.layer])[0, real].norm(dim=-1).mean().item()
        assert math.isclose(r.ffn_out, own, rel_tol=1e-4) and math.isclose(r.memory_read, read, rel_tol=1e-4)
        assert r.memory_read > 0 and math.isclose(r.read_ratio, read / own, rel_tol=1e-4)


def test_router_report_gives_each_stage_its_probabilities_choice_and_token_counts(kit: Any, word_tokenizer: Any) -> None:
    dpn = {"name": "pyramid", "layers": [0, 1], "min_tokens": 2, "skip_below": 8}
    model = kit.build(word_tokenizer, "llama", [dpn])
    injector = model.injectors[0]
    with torch.no_grad():
        injector.routers["0"].net[-1].weight.zero_()  # stage 0: equal logits, p = 1/3 each, argmax -> expert 0 (x1)
        injector.routers["1"].net[-1].weight.zero_()
        injector.routers["1"].net[-1].weight[2].fill_(50.0)  # stage 1 ...
        injector.routers["1"].net[1].weight.fill_(0.0)  # ... with a zero hidden layer: GELU(0) = 0, so equal logits too
    batch = kit.prompt_batch(model, kit.images(1)[0], "how many?", [7])
    report = router_report(model, batch)
    assert [s.layer for s in report] == [0, 1]
    for stage in report:
        assert all(math.isclose(p, 1 / 3, rel_tol=1e-5) for p in stage.probs[0])
        assert stage.chosen == [0] and math.isclose(stage.scale[0], 1 / 3, rel_tol=1e-5)
        assert stage.tokens_in == [16] and stage.tokens_out == [16]  # x1 keeps the 4x4 grid
    with torch.no_grad():  # stage 0 now prefers the x1/4 expert: 16 -> 4 tokens, and stage 1 (4 < 8) is skipped
        injector.routers["0"].net[0].bias.fill_(1.0)  # LN(h) + 1 sums to the width d: every hidden unit is d > 0
        injector.routers["0"].net[1].weight.fill_(1.0)
        injector.routers["0"].net[-1].weight[2].fill_(1.0)
    report = router_report(model, batch)
    assert report[0].chosen == [2] and report[0].tokens_out == [4] and report[0].scale[0] == max(report[0].probs[0])
    assert report[1].tokens_in == [4] and report[1].chosen == [None] and report[1].scale == [None]


def test_ffn_report_image_dependence_is_the_change_of_the_read_under_another_rows_image(
    kit: Any, word_tokenizer: Any
) -> None:
    model = kit.build(word_tokenizer, "llama", [{"name": "ffn_embed", "layers": [2]}], splice=False, layers=[1])
    first, second = (kit.prompt_batch(model, im, "how many?", [7]) for im in kit.images(2))
    batch = {k: torch.cat([first[k], second[k]]) for k in first}  # one prompt, two images
    total: list[torch.Tensor] = []
    raw: list[torch.Tensor] = []
    mlp = model.llm.get_decoder().layers[2].mlp
    mlp.register_forward_hook(lambda _m, _a, out: raw.append(out), prepend=True)
    mlp.register_forward_hook(lambda _m, _a, out: total.append(out))
    (report,) = ffn_report(model, batch, shift=1)
    read = total[0] - raw[0]  # rolling by one row swaps the two images: row 0 now reads row 1's and back
    expected = (read[0] - read[1]).norm(dim=-1).mean() / read.norm(dim=-1).mean()
    assert report.image_dependence is not None and math.isclose(report.image_dependence, float(expected), rel_tol=1e-4)
    assert report.image_dependence > 0
    same = {**batch, "pixel_values": first["pixel_values"].expand_as(batch["pixel_values"])}
    assert ffn_report(model, same, shift=1)[0].image_dependence == 0.0
    assert ffn_report(model, batch)[0].image_dependence is None
