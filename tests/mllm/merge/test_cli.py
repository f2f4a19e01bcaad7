"""`mllm merge` and `mllm probe` through the CLI entry point, on tiny models."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mllm import run
from mllm.cli import main
from mllm.config import load_config, save_config


def test_mllm_merge_cli_writes_a_loadable_average(llamas: dict[str, Path], ckpt, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    cfg = ckpt.write_yaml(tmp_path / "merge.yaml", {
        "merge_method": "linear",
        "models": [{"model": str(llamas["a"]), "parameters": {"weight": 0.5}},
                   {"model": str(llamas["b"]), "parameters": {"weight": 0.5}}],
        "dtype": "float32",
    })
    assert main(["merge", str(cfg), "--out", str(tmp_path / "out")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), local_files_only=True).state_dict()
    a, b = ckpt.state_of(llamas["a"]), ckpt.state_of(llamas["b"])
    name = "model.layers.0.mlp.up_proj.weight"
    assert torch.allclose(merged[name], 0.5 * a[name] + 0.5 * b[name], atol=1e-6)
    # an existing output is refused, not overwritten
    assert main(["merge", str(cfg), "--out", str(tmp_path / "out")]) == 2


def test_mllm_probe_cli_on_a_shapesworld_checkpoint(tmp_path: Path) -> None:
    cfg = load_config("tiny", ["model.llm.arch.num_hidden_layers=2", "model.llm.arch.hidden_size=32",
                               "model.llm.arch.intermediate_size=64", "data.val_images=6"])
    save_config(cfg, tmp_path)  # the run config next to the checkpoint carries the data settings
    run.build_model(cfg, run.build_tokenizer_for(cfg)).save_pretrained(tmp_path / "model")
    assert main(["probe", str(tmp_path / "model"), "--limit", "6", "--batch-size", "4", "--out", str(tmp_path / "p")]) == 0
    doc = json.loads((tmp_path / "p" / "probe.json").read_text())
    assert doc["num_samples"] == 6 and len(doc["visual_share"]) == 2
    assert all(0.0 < s < 1.0 for s in doc["visual_share"])
    assert (tmp_path / "p" / "probe.png").stat().st_size > 0
    assert main(["probe", str(tmp_path / "missing"), "--out", str(tmp_path / "q")]) == 2
