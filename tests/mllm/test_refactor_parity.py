"""The model is a composition: moving code must not move results.

A shrunken ``tiny`` (object heads on) and a shrunken fused recipe (FtZ, object heads on every tower)
train four steps on a fixed seed with one thread; their logged losses must equal the values recorded
with the code as it stood before the auxiliary objectives became registered heads (commit c276171).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mllm import run

SMALL = [
    "model.encoder.image_size=32", "model.encoder.embed_dim=32", "model.encoder.depth=1", "model.encoder.num_heads=2",
    "model.encoder.stem_width=8",
    "model.llm.arch.hidden_size=32", "model.llm.arch.intermediate_size=64", "model.llm.arch.num_hidden_layers=1",
    "model.llm.arch.num_attention_heads=2", "model.llm.arch.num_key_value_heads=2", "model.max_length=96",
    "data.image_size=32", "data.grid=2", "data.max_objects=3", "data.train_images=64", "data.val_images=1",
    "data.test_images=1", "train.steps=4", "train.batch_size=8", "train.micro_batch_size=8", "train.warmup_steps=1",
    "train.log_every=1",
]
FUSED = """
base: tiny
model:
  encoder:
    name: fused
    towers:
      - {name: timm_vit, model_name: vit_tiny_patch16_224, image_size: 32, patch_size: 16, embed_dim: 32, depth: 1,
         num_heads: 2, layers: [-1]}
      - {name: timm_vit, model_name: vit_tiny_patch16_224, image_size: 32, patch_size: 16, embed_dim: 16, depth: 1,
         num_heads: 2, layers: [-1]}
    fusion: {name: ftz, anchor: 0, heads: 2, gate: true, ffn: false}
  aux_heads: [{name: object_heads, weight: 1.0, towers: true}]
"""
RECORDED = {
    "tiny": [14.905644416809082, 14.679009437561035, 14.350767135620117, 14.321739196777344],
    "fused": [29.183456420898438, 26.44770622253418, 25.034610748291016, 24.65864372253418],
}


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("recipe", sorted(RECORDED))
def test_losses_equal_the_values_recorded_before_the_refactor(recipe: str, tmp_path: Path) -> None:
    if recipe == "tiny":
        result = run.train("tiny", tmp_path / "run", SMALL, evaluate=False)
    else:
        (tmp_path / "fused.yaml").write_text(FUSED)
        overrides = [s for s in SMALL if not s.startswith("model.encoder.")]
        result = run.train(str(tmp_path / "fused.yaml"), tmp_path / "run", overrides, evaluate=False)
    losses = [row["loss"] for row in result["history"]]
    assert losses == pytest.approx(RECORDED[recipe], abs=1e-4)
