"""The shipped fusion recipes: they validate, mirror tiny.yaml outside the encoder (projector included), and
their fused encoders build and run on a ShapesWorld image with tiny.yaml's 16 visual tokens."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from encoders.base import VisionEncoder
from encoders.fused import FusedEncoder
from mllm.config import EncoderPart, load_config, to_dict
from train.data.shapesworld import ShapesWorld

RECIPES = {"comm": 256, "ftz": 128, "dbfusion": 512, "convgate": 128}  # recipe: fused width
# dbfusion's four near-copy sets: the layers reading them train at tiny's lr / 4 (dbfusion.yaml), kept in step with tiny
LR_GROUPS = {"dbfusion": ({"projector.layers.0", "aux_heads.0"}, 0.25)}


@pytest.mark.parametrize("name", list(RECIPES))
def test_recipe_builds_and_runs(name: str, build_encoder: Callable[[EncoderPart], VisionEncoder]) -> None:
    cfg, tiny = load_config(name), load_config("tiny")
    prefixes, scale = LR_GROUPS.get(name, (set(), 1.0))
    assert cfg.train.lr_groups == {prefix: tiny.train.lr * scale for prefix in prefixes}
    cfg.train.lr_groups = tiny.train.lr_groups
    for key in ("data", "train", "eval"):
        assert to_dict(getattr(cfg, key)) == to_dict(getattr(tiny, key)), key
    assert to_dict(cfg.model.llm) == to_dict(tiny.model.llm)
    assert to_dict(cfg.model.projector) == to_dict(tiny.model.projector)  # the ablation changes the fusion only
    for key in ("tokenizer_numbers", "loss_reduction"):
        assert getattr(cfg.model, key) == getattr(tiny.model, key), key
    encoder = build_encoder(cfg.model.encoder)
    assert isinstance(encoder, FusedEncoder)
    assert (encoder.num_patches, encoder.grid_size, encoder.embed_dim) == (16, (4, 4), RECIPES[name])
    image = ShapesWorld(cfg.data).split("test")[0]["image"]
    with torch.no_grad():
        out = encoder(encoder.preprocess(image)[None])
    assert out[0].shape == (1, 16, RECIPES[name]) and torch.isfinite(out[0]).all()
    assert all(p.requires_grad for p in encoder.parameters())  # towers train from scratch, as in tiny.yaml
