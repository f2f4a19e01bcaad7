"""A fused encoder (two towers + a fusion) inside the MLLM: builds from a recipe, trains a step,
and survives save -> load with identical logits, with its towers' weight files gone."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mllm import run
from mllm.config import ConfigError, load_config
from mllm.model import MLLM
from train.data.shapesworld import ShapesWorld

SMALL = [
    "model.llm.arch.num_hidden_layers=1", "model.llm.arch.hidden_size=32", "model.llm.arch.intermediate_size=64",
    "model.llm.arch.num_attention_heads=2", "model.llm.arch.num_key_value_heads=2",
]


@pytest.mark.parametrize("recipe", ["comm", "convgate"])
def test_fused_recipe_model_round_trip(recipe: str, tmp_path: Path) -> None:
    cfg = load_config(recipe, SMALL)
    model = MLLM(cfg.model, run.build_tokenizer_for(cfg))
    collate = run.make_collator(model, cfg)
    batch = collate([ShapesWorld(cfg.data).split("train")[i] for i in range(2)])
    loss = model(**batch).loss
    loss.backward()
    grads = [p.grad for p in model.encoder.parameters() if p.requires_grad]
    assert torch.isfinite(loss) and any(g is not None and g.abs().sum() > 0 for g in grads)
    model.eval()
    with torch.no_grad():
        before = model(**batch).logits
    model.save_pretrained(tmp_path / "ckpt")
    again = MLLM.from_pretrained(tmp_path / "ckpt").eval()
    with torch.no_grad():
        assert torch.equal(again(**batch).logits, before)


def test_fused_tower_errors_are_caught_at_load() -> None:
    with pytest.raises(ConfigError, match=r"model.encoder.towers\[1\].name: unknown encoder 'nope'"):
        load_config("comm", ["model.encoder.towers=[{name: timm_vit}, {name: nope}]"])
    with pytest.raises(ConfigError, match=r"model.encoder.fusion.name: unknown encoder fusion 'mix'"):
        load_config("comm", ["model.encoder.fusion={name: mix}"])
