"""xattn_report: gates and norms against the decoder layer's own input, seen before and after the injector."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from mllm.injection.base import get_hidden
from mllm.injection.diagnose import position_probe, xattn_report


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
