"""The shipped accelerate configs: they parse, FSDP finds the model's wrap units, and a real 2-process
DDP run (gloo on CPU, launched with ddp.yaml) trains exactly like one process with accumulation."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from safetensors.torch import load_file

from mllm import run
from mllm.config import ModelConfig, from_dict
from mllm.model import MLLM

ACCELERATE = Path(run.__file__).parent / "recipes" / "accelerate"
REPO = Path(__file__).resolve().parents[2]
# The patch stem: tiny.yaml's conv stem has BatchNorm, whose running statistics are per process under
# DDP (each process normalises its own half batch), so they could not equal the one-process run's.
TINY = [
    "model.encoder.stem=patch", "model.encoder.stem_width=null", "model.encoder.image_size=32", "model.encoder.embed_dim=32", "model.encoder.depth=1", "model.encoder.num_heads=2",
    "model.llm.arch.hidden_size=32", "model.llm.arch.intermediate_size=64", "model.llm.arch.num_hidden_layers=1",
    "model.llm.arch.num_attention_heads=2", "model.llm.arch.num_key_value_heads=2", "model.max_length=96",
    "data.image_size=32", "data.grid=2", "data.max_objects=3", "data.train_images=24", "data.val_images=1",
    "data.test_images=1", "data.questions_per_image=2",
    "train.steps=4", "train.batch_size=4", "train.micro_batch_size=2", "train.warmup_steps=2", "train.log_every=1",
]


@pytest.mark.parametrize("name, kind", [("ddp", "MULTI_GPU"), ("fsdp", "FSDP"), ("deepspeed_zero2", "DEEPSPEED")])
def test_accelerate_configs_parse(name: str, kind: str) -> None:
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(ACCELERATE / f"{name}.yaml"))
    assert str(cfg.distributed_type).endswith(kind)
    assert cfg.mixed_precision == "no"  # precision is the run's train.mixed_precision
    if kind == "FSDP":
        assert cfg.fsdp_config["fsdp_version"] == 2 and "fsdp_transformer_layer_cls_to_wrap" not in cfg.fsdp_config
    if kind == "DEEPSPEED":
        assert cfg.deepspeed_config["zero_stage"] == 2
        assert "gradient_accumulation_steps" not in cfg.deepspeed_config  # the trainer derives it


def test_fsdp_auto_wrap_finds_the_model_units(word_tokenizer: Any) -> None:
    from accelerate.utils.dataclasses import get_module_class_from_name

    model = MLLM(from_dict(ModelConfig, {
        "encoder": {"name": "timm_vit", "image_size": 32, "patch_size": 16, "embed_dim": 32, "depth": 1, "num_heads": 2},
        "projector": {"name": "mlp"},
        "llm": {"model_type": "qwen2", "arch": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                                "num_attention_heads": 2, "num_key_value_heads": 1}},
    }), word_tokenizer)
    units = [get_module_class_from_name(model, name) for name in model._no_split_modules]
    assert [u.__name__ for u in units] == ["Qwen2DecoderLayer", "Block"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_two_process_ddp_matches_one_process(tmp_path: Path) -> None:
    """batch 4 = 2 micro-batches of 2: accumulated in one process, or one per process under DDP.
    Same weights after 4 steps (so the schedule steps once per step, not once per process) and the
    same logged losses (the mean over processes)."""
    run.train("tiny", tmp_path / "one", TINY, evaluate=False)
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ACCELERATE / "ddp.yaml"),
           "--num_processes", "2", "--main_process_port", str(_free_port()),
           "-m", "mllm.cli", "train", "tiny", "--out", str(tmp_path / "two"), "--no-eval",
           *[arg for item in TINY for arg in ("--set", item)]]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    losses = [[h["loss"] for h in json.loads((tmp_path / d / "train_summary.json").read_text())["history"]]
              for d in ("one", "two")]
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    one, two = (load_file(str(tmp_path / d / "model" / "model.safetensors")) for d in ("one", "two"))
    assert one.keys() == two.keys()
    for name in one:
        assert (one[name] - two[name]).abs().max() < 1e-6, name


def test_two_process_eval_matches_one_process(tmp_path: Path) -> None:
    """``mllm eval`` under ``accelerate launch``: two processes take strided shards, rank 0 gathers them;
    the predictions and metrics equal the one-process run's."""
    run.train("tiny", tmp_path / "run", [*TINY, "data.test_images=5"], evaluate=False)
    checkpoint = tmp_path / "run" / "model"
    one = run.evaluate_checkpoint(checkpoint, "shapesworld", tmp_path / "one", batch_size=3, max_new_tokens=6)
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ACCELERATE / "ddp.yaml"),
           "--num_processes", "2", "--main_process_port", str(_free_port()),
           "-m", "mllm.cli", "eval", str(checkpoint), "--task", "shapesworld", "--out", str(tmp_path / "two"),
           "--batch-size", "3", "--max-new-tokens", "6"]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    rows = [{r["id"]: r["prediction"] for r in map(json.loads, (tmp_path / d / "predictions.jsonl").read_text().splitlines())}
            for d in ("one", "two")]
    assert rows[1] == rows[0] and len(rows[0]) == one["n"]
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert (one["processes"], two["processes"]) == (1, 2)
    assert not list((tmp_path / "two").glob("predictions.rank*.jsonl"))  # the shards were merged into one file
    assert {k: two[k] for k in ("vqa_accuracy", "grounding_accuracy", "per_type", "n")} == \
           {k: one[k] for k in ("vqa_accuracy", "grounding_accuracy", "per_type", "n")}
