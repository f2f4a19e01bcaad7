"""``mllm eval`` on a saved checkpoint for the generated tasks: ShapesWorld, arithmetic, compositional."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from mllm import cli, run
from mllm.config import ConfigError

SMALL = [
    "model.encoder.image_size=32", "model.encoder.embed_dim=32", "model.encoder.depth=1", "model.encoder.num_heads=2",
    "model.llm.arch.hidden_size=32", "model.llm.arch.intermediate_size=64", "model.llm.arch.num_hidden_layers=1",
    "model.llm.arch.num_attention_heads=2", "model.llm.arch.num_key_value_heads=2", "model.tokenizer_numbers=digits",
    "data.image_size=32", "data.grid=2", "data.max_objects=3", "data.train_images=8", "data.test_images=3",
    "train.steps=1", "train.batch_size=4", "train.micro_batch_size=4",
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("run")
    run.train("tiny", out, SMALL, evaluate=False)
    return out / "model"


def _metrics(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


def test_shapesworld_reads_the_run_settings_and_takes_generator_options(checkpoint: Path, tmp_path: Path) -> None:
    assert cli.main(["eval", str(checkpoint), "--task", "shapesworld", "--out", str(tmp_path / "a")]) == 0
    metrics = _metrics(tmp_path / "a")
    assert metrics["protocol"]["dataset_revision"]["image_size"] == 32  # the run's generator, not the default 64
    assert metrics["n"] == sum(metrics["n_per_type"].values()) and metrics["n_per_type"]["grounding"] == 3
    assert cli.main(["eval", str(checkpoint), "--task", "shapesworld", "--opt", "test_images=1",
                     "--out", str(tmp_path / "b")]) == 0
    assert _metrics(tmp_path / "b")["n_per_type"]["grounding"] == 1


def test_arithmetic_and_compositional_are_registered(checkpoint: Path, tmp_path: Path) -> None:
    run.evaluate_checkpoint(checkpoint, "arithmetic", tmp_path / "ar", options=["test_size=4"], max_new_tokens=4)
    ar = _metrics(tmp_path / "ar")
    assert ar["n"] == 4 and ar["protocol"]["modality"] == "text"
    run.evaluate_checkpoint(checkpoint, "compositional", tmp_path / "co", options=["max_operand=2"], max_new_tokens=4)
    co = _metrics(tmp_path / "co")
    assert co["n"] == 3 and co["protocol"]["dataset_revision"]["data"]["image_size"] == 32  # the run's scenes


def test_generated_task_errors(checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--data/--images: task 'arithmetic' generates its samples"):
        run.evaluate_checkpoint(checkpoint, "arithmetic", tmp_path / "x", data="q.json")
    with pytest.raises(ConfigError, match="unknown key"):
        run.evaluate_checkpoint(checkpoint, "arithmetic", tmp_path / "y", options=["test_problems=4"])
    alone = tmp_path / "alone" / "model"
    shutil.copytree(checkpoint, alone)  # a checkpoint without its run config
    with pytest.raises(ConfigError, match="config.yaml: compositional needs the run config"):
        run.evaluate_checkpoint(alone, "compositional", tmp_path / "z")
    assert not (tmp_path / "x").exists() and not (tmp_path / "z").exists()  # nothing written before the errors
