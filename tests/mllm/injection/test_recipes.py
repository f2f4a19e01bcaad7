"""The shipped injection recipes load, build, train one step's loss and generate (at their real size)."""

from __future__ import annotations

import pytest
import torch

from mllm.config import load_config
from mllm.run import build_model, build_tokenizer_for, make_collator
from train.data.shapesworld import ShapesWorld


@pytest.mark.parametrize("recipe, splice, injector", [
    ("xattn", False, "GatedXAttnInjector"), ("dehvf", False, "FFNEmbedInjector"), ("dpn", True, "PyramidInjector"),
])
def test_recipe_builds_trains_and_generates(recipe: str, splice: bool, injector: str) -> None:
    cfg = load_config(recipe, ["data.train_images=4"])
    model = build_model(cfg, build_tokenizer_for(cfg))
    assert [type(i).__name__ for i in model.injectors] == [injector]
    assert model.num_image_tokens == (16 if splice else 0)
    counts = model.set_trainable(cfg.train.groups())
    assert counts["injectors"][0] == counts["injectors"][1] > 0  # the injector trains
    split = ShapesWorld(cfg.data).split("train")
    batch = make_collator(model, cfg)([split[0], split[1]])
    model.train()
    loss = model(**batch).loss
    assert torch.isfinite(loss)
    loss.backward()
    model.eval()
    sample = split[0]
    answers = model.generate([sample["image"]], [sample["items"][0]["question"]], max_new_tokens=3)
    assert len(answers) == 1 and isinstance(answers[0], str)
