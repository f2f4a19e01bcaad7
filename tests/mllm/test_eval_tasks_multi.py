"""``mllm eval --tasks a,b,c``: one model load, one folder per task identical to a ``--task`` run, a summary;
``--max-new-tokens`` reaching ``generate`` (eval and chat) and the protocol; per-task flag errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

import mllm.hf_native
from mllm import cli, run
from mllm.config import load_config, save_config

SMALL = [
    "model.encoder.image_size=32", "model.encoder.embed_dim=32", "model.encoder.depth=1", "model.encoder.num_heads=2",
    "model.llm.arch.hidden_size=32", "model.llm.arch.intermediate_size=64", "model.llm.arch.num_hidden_layers=1",
    "model.llm.arch.num_attention_heads=2", "model.llm.arch.num_key_value_heads=2", "model.tokenizer_numbers=digits",
    "data.image_size=32", "data.grid=2", "data.max_objects=3", "data.test_images=2",
]
TASKS = ["shapesworld", "arithmetic", "compositional"]
OPTS = {"arithmetic": ["test_size=3"], "compositional": ["max_operand=1"]}
RUN = ["--max-new-tokens", "3", "--batch-size", "2", "--device", "cpu"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained tiny model of ours, saved with its run config (the generated tasks read its scenes)."""
    out = tmp_path_factory.mktemp("run")
    cfg = load_config("tiny", SMALL)
    run.build_model(cfg, run.build_tokenizer_for(cfg)).save_pretrained(out / "model")
    save_config(cfg, out)
    return out / "model"


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Counts model loads and records the keyword arguments of every ``generate`` call."""
    seen: dict[str, Any] = {"loads": 0, "kwargs": []}
    real = mllm.hf_native.load_generator

    def load(*args: Any, **kw: Any) -> Any:
        seen["loads"] += 1
        model = real(*args, **kw)
        generate = model.generate

        def recording(images: list, prompts: list[str], **gen_kw: Any) -> list[str]:
            seen["kwargs"].append(gen_kw)
            return generate(images, prompts, **gen_kw)

        model.generate = recording
        return model

    monkeypatch.setattr(mllm.hf_native, "load_generator", load)
    return seen


def _json(path: Path) -> Any:
    return json.loads(path.read_text())


def test_several_tasks_load_once_and_match_separate_runs(checkpoint: Path, tmp_path: Path, spy: dict[str, Any]) -> None:
    opts = [f"--opt={task}.{o}" for task, items in OPTS.items() for o in items]
    together = tmp_path / "together"
    assert cli.main(["eval", str(checkpoint), "--tasks", ",".join(TASKS), *opts, *RUN, "--out", str(together)]) == 0
    assert spy["loads"] == 1
    calls = len(spy["kwargs"])
    assert calls == 6 + 2 + 1  # ceil(n / 2) batches: shapesworld 2 scenes (12 questions), arithmetic 3, compositional 2
    assert all(kw == {"max_new_tokens": 3} for kw in spy["kwargs"])

    summary = _json(together / "results.json")
    assert list(summary["tasks"]) == TASKS
    for task in TASKS:
        alone = tmp_path / f"alone-{task}"
        argv = ["eval", str(checkpoint), "--task", task, *[f"--opt={o}" for o in OPTS.get(task, [])], *RUN]
        assert cli.main([*argv, "--out", str(alone)]) == 0
        assert (together / task / "predictions.jsonl").read_bytes() == (alone / "predictions.jsonl").read_bytes()
        assert _json(together / task / "protocol.json") == _json(alone / "protocol.json")
        metrics = _json(alone / "metrics.json")
        row = summary["tasks"][task]
        assert row == {"metric": metrics["main_metric"], "value": metrics[metrics["main_metric"]], "n": metrics["n"],
                       "n_chain": 0, "n_unterminated": 0, "dir": task}
        assert f"| {task} | {row['metric']} |" in (together / "results.md").read_text()
    assert [summary["tasks"][t]["metric"] for t in TASKS] == ["vqa_accuracy", "accuracy", "accuracy"]
    assert [summary["tasks"][t]["n"] for t in TASKS] == [12, 3, 2]
    assert spy["loads"] == 1 + len(TASKS)

    # Resuming the finished set generates nothing and rewrites the same summary.
    del spy["kwargs"][:]
    assert cli.main(["eval", str(checkpoint), "--tasks", ",".join(TASKS), *opts, *RUN, "--out", str(together),
                     "--resume"]) == 0
    assert spy["kwargs"] == [] and _json(together / "results.json") == summary


def test_max_new_tokens_reaches_generate_and_the_protocol(checkpoint: Path, tmp_path: Path, spy: dict[str, Any],
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "ar"
    assert cli.main(["eval", str(checkpoint), "--task", "arithmetic", "--opt", "test_size=2", "--max-new-tokens", "5",
                     "--device", "cpu", "--out", str(out)]) == 0
    assert spy["kwargs"] == [{"max_new_tokens": 5}]
    assert _json(out / "protocol.json")["generation_kwargs"] == {"max_new_tokens": 5}
    assert _json(out / "metrics.json")["protocol"]["generation_kwargs"] == {"max_new_tokens": 5}
    image = tmp_path / "a.png"
    Image.new("RGB", (32, 32), (200, 0, 0)).save(image)
    capsys.readouterr()
    assert cli.main(["chat", str(checkpoint), "--image", str(image), "what colour?", "--max-new-tokens", "2",
                     "--device", "cpu"]) == 0
    assert spy["kwargs"][-1] == {"max_new_tokens": 2}


@pytest.mark.parametrize(("extra", "message"), [
    (["--data", "pope=q.json"], "--data pope=q.json: with --tasks, expected TASK=PATH with TASK one of "
                                "shapesworld, arithmetic"),
    (["--data", "q.json"], "--data q.json: with --tasks, expected TASK=PATH"),
    (["--images", "arithmetic=imgs", "--images", "arithmetic=other"], "--images arithmetic=other: task 'arithmetic' "
                                                                       "was given a path already"),
    (["--opt", "test_size=3"], "--opt test_size=3: with --tasks, expected TASK.KEY=VALUE"),
    (["--opt", "arithmetic.test_problems=3"], "unknown key"),
    (["--data", "arithmetic=q.json"], "--data/--images: task 'arithmetic' generates its samples"),
])
def test_per_task_flags_are_checked_before_the_model_loads(
    checkpoint: Path, tmp_path: Path, spy: dict[str, Any], capsys: pytest.CaptureFixture[str], extra: list[str],
    message: str,
) -> None:
    out = tmp_path / "out"
    assert cli.main(["eval", str(checkpoint), "--tasks", "shapesworld,arithmetic", *extra, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert spy["loads"] == 0 and not out.exists()


def test_file_tasks_need_their_data_and_one_task_takes_one_file(
    checkpoint: Path, tmp_path: Path, spy: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    out = str(tmp_path / "out")
    assert cli.main(["eval", str(checkpoint), "--tasks", "arithmetic,pope", "--out", out]) == 2
    assert "--data: task 'pope' needs the benchmark file" in capsys.readouterr().err
    assert cli.main(["eval", str(checkpoint), "--task", "pope", "--data", "a.json", "--data", "b.json",
                     "--out", out]) == 2
    assert "--data: given 2 times; one task reads one" in capsys.readouterr().err
    assert spy["loads"] == 0
    for argv in (["--task", "arithmetic", "--tasks", "arithmetic"], ["--tasks", "arithmetic,arithmetic"],
                 ["--tasks", "arithmetic,nope"]):
        with pytest.raises(SystemExit) as exit_:  # argparse: usage and exit 2, before anything runs
            cli.main(["eval", str(checkpoint), *argv, "--out", out])
        assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "not allowed with argument" in err and "distinct task names" in err and "unknown eval task 'nope'" in err
