"""``mllm train`` on LLaVA JSON: image and text-only samples, a bad image skipped and counted,
length-grouped batches, the align stage (only the projector moves)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from accelerate.utils import set_seed
from PIL import Image
from safetensors.torch import load_file

from mllm import run
from mllm.config import ConfigError, load_config
from mllm.model import MLLM

TINY = [
    "model.encoder.image_size=32", "model.encoder.embed_dim=32", "model.encoder.depth=1", "model.encoder.num_heads=2",
    "model.llm.arch.hidden_size=32", "model.llm.arch.intermediate_size=64", "model.llm.arch.num_hidden_layers=1",
    "model.llm.arch.num_attention_heads=2", "model.llm.arch.num_key_value_heads=2", "model.max_length=96",
    "train.steps=3", "train.batch_size=4", "train.micro_batch_size=2", "train.warmup_steps=1", "train.log_every=1",
    "train.group_by_length=2", "train.stage=align", "model.aux_heads=[]",  # tiny's heads learn from ShapesWorld only
]


def _write_data(root: Path) -> Path:
    records = []
    for i, colour in enumerate(["red", "green", "blue"]):
        Image.new("RGB", (40, 40), colour).save(root / f"{colour}.png")
        records.append({"id": f"img-{i}", "image": f"{colour}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is the picture?"}, {"from": "gpt", "value": colour},
            {"from": "human", "value": "Is it dark?"}, {"from": "gpt", "value": "No"}]})
    records.append({"id": "text-0", "conversations": [
        {"from": "human", "value": "How many sides does a square have?"}, {"from": "gpt", "value": "4"}]})
    records.append({"id": "text-1", "conversations": [
        {"from": "human", "value": "Say yes."}, {"from": "gpt", "value": "yes"}]})
    (root / "broken.png").write_bytes(b"not an image")
    records.append({"id": "broken", "image": "broken.png", "conversations": records[0]["conversations"]})
    path = root / "llava.json"
    path.write_text(json.dumps(records))
    return path


def test_train_on_llava_json(tmp_path: Path) -> None:
    data = _write_data(tmp_path)
    out = tmp_path / "run"
    result = run.train("tiny", out, [*TINY, f"train_data.path={data}"], evaluate=False)
    assert [h["step"] for h in result["history"]] == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in result["history"])
    assert result["skipped_samples"] == 2  # 12 samples read = two passes over 6 records, one of them broken
    model = MLLM.from_pretrained(out / "model")
    assert model.tokenizer.unk_token_id not in model.tokenizer("How many sides does a square have?")["input_ids"]
    # align: only the projector trained; the rest equals the seeded initial weights
    trained = load_file(str(out / "model" / "model.safetensors"))
    cfg = load_config("tiny", [*TINY, f"train_data.path={data}"])
    set_seed(cfg.train.seed)  # as run.train does before building the model
    start = run.build_model(cfg, model.tokenizer).state_dict()
    moved = sorted({name.split(".")[0] for name in trained if not torch.equal(trained[name], start[name])})
    assert moved == ["projector"]


def test_instruct_stage_starts_from_the_align_stage(tmp_path: Path) -> None:
    """Stage 2 (LoRA on the LLM, projector at a negligible lr) loads stage 1's model: its projector
    stays at stage 1's values, not at the fresh init, and the saved LLM has the adapters merged in."""
    data = _write_data(tmp_path)
    common = [*TINY, f"train_data.path={data}"]
    run.train("tiny", tmp_path / "stage1", common, evaluate=False)
    stage2 = [*[o for o in common if not o.startswith("train.stage")], "train.stage=instruct",
              "train.lora.r=2", f"train.init_from={tmp_path / 'stage1' / 'model'}", "train.lr_groups.projector=1.0e-12"]
    run.train("tiny", tmp_path / "stage2", stage2, evaluate=False)
    one = load_file(str(tmp_path / "stage1" / "model" / "model.safetensors"))
    two = load_file(str(tmp_path / "stage2" / "model" / "model.safetensors"))
    assert one.keys() == two.keys()  # merged: no LoRA tensors left
    for name in one:
        if name.startswith(("projector.", "encoder.")):
            torch.testing.assert_close(two[name], one[name], atol=1e-8, rtol=0)
    assert any(not torch.equal(one[n], two[n]) for n in one if n.startswith("llm.model.layers."))
    bad = [*stage2[:-2], f"train.init_from={tmp_path}"]
    with pytest.raises(ConfigError, match=f"train.init_from: {tmp_path / 'model.safetensors'} not found"):
        run.train("tiny", tmp_path / "stage3", bad, evaluate=False)
