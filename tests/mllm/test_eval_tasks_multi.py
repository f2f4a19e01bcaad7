"""``mllm eval --tasks a,b,c``: one model load, one folder per task identical to a ``--task`` run, a summary;
``--max-new-tokens`` reaching ``generate`` (eval and chat) and the protocol; per-task flag errors; and
``train.eval_tasks``: the listed tasks evaluated during training, logged and summarised."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

import mllm.hf_native
from common.errors import UserError
from mllm import cli, run
from mllm.config import ConfigError, load_config, save_config

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
                       "n_chain": 0, "n_unterminated": 0, "skipped": 0, "dir": task}
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


def test_skip_bad_skips_a_corrupt_image_in_each_mode(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data, images = _pope(tmp_path / "pope", corrupt_second=True)
    argv = ["eval", str(checkpoint), *RUN[:2], "--batch-size", "1", "--device", "cpu"]
    strict = tmp_path / "strict"
    assert cli.main([*argv, "--task", "pope", "--data", data, "--images", images, "--out", str(strict)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert re.search(r"val2014/b\.jpg: cannot read the image of sample .random-2.", err[-1])  # the last line
    assert [r["id"] for r in map(json.loads, (strict / "predictions.jsonl").read_text().splitlines())] == ["random-1"]

    out = tmp_path / "out"
    assert cli.main([*argv, "--tasks", "arithmetic,pope", "--opt", "arithmetic.test_size=3", "--data", f"pope={data}",
                     "--images", f"pope={images}", "--skip-bad", "--out", str(out)]) == 0
    summary = _json(out / "results.json")["tasks"]
    assert (summary["pope"]["n"], summary["pope"]["skipped"], summary["arithmetic"]["skipped"]) == (1, 1, 0)
    (skipped,) = map(json.loads, (out / "pope" / "skipped.jsonl").read_text().splitlines())
    assert skipped["id"] == "random-2" and "b.jpg" in skipped["reason"]
    assert _json(out / "pope" / "protocol.json")["skip_bad"] is True
    assert not (out / "arithmetic" / "skipped.jsonl").exists()


# --- train.eval_tasks: any list of tasks evaluated during training ---------------------------------------
def _pope(root: Path, corrupt_second: bool = False) -> tuple[str, str]:
    """A two-question POPE file in the release format and its image folder (the second image not an image
    with ``corrupt_second``)."""
    (root / "val2014").mkdir(parents=True)
    Image.new("RGB", (16, 16), (0, 90, 0)).save(root / "val2014" / "a.jpg")
    (root / "val2014" / "b.jpg").write_bytes(b"not a jpeg")
    rows = [{"question_id": 1, "image": "a.jpg", "text": "Is there a dog in the image?", "label": "yes"},
            {"question_id": 2, "image": "b.jpg" if corrupt_second else "a.jpg", "text": "Is there a cat in the image?",
             "label": "no"}]
    (root / "coco_pope_random.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(root / "coco_pope_random.json"), str(root / "val2014")


TRAIN = [*SMALL, "train.steps=2", "train.batch_size=4", "train.micro_batch_size=4", "train.log_with=[]",
         "data.train_images=8", "eval.batch_size=2", "eval.limit=4"]


def test_training_evaluates_the_listed_tasks_logs_and_summarises_them(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from accelerate import Accelerator

    logged: list[tuple[int, dict[str, Any]]] = []
    real_log = Accelerator.log

    def log(self: Accelerator, values: dict[str, Any], step: int | None = None, **kw: Any) -> None:
        logged.append((step, dict(values)))
        real_log(self, values, step=step, **kw)

    monkeypatch.setattr(Accelerator, "log", log)
    data, images = _pope(tmp_path / "pope")
    tasks = (f"[{{task: arithmetic, limit: 2, options: {{test_size: 4}}}}, "
             f"{{task: pope, data: '{data}', images: '{images}', max_new_tokens: 2}}]")
    out = tmp_path / "run"
    run.train("tiny", out, [*TRAIN, "train.eval_every=1", f"train.eval_tasks={tasks}"], evaluate=False)

    history = _json(out / "train_summary.json")["history"]
    evals = [row for row in history if any(k.startswith("eval/") for k in row)]
    assert [row["step"] for row in evals] == [1, 2]  # every train.eval_every steps, then at the end
    for row in evals:
        folder = out / "eval_tasks" / f"step-{row['step']:07d}"
        arithmetic, pope = _json(folder / "arithmetic" / "metrics.json"), _json(folder / "pope" / "metrics.json")
        assert row["eval/arithmetic/accuracy"] == arithmetic["accuracy"] and row["eval/arithmetic/n"] == 2  # the limit
        assert row["eval/pope/f1"] == pope["f1"] and row["eval/pope/n_unterminated"] == 0 and row["eval/pope/n"] == 2
        assert "eval/vqa_accuracy" in row  # the run's own ShapesWorld val evaluation still runs beside them
        assert list(_json(folder / "results.json")["tasks"]) == ["arithmetic", "pope"]
        # each logged to the tracker as it is written to the summary
        assert {k: v for k, v in row.items() if k != "step"} in [values for step, values in logged if step == row["step"]]
    assert pope["protocol"]["generation_kwargs"] == {"max_new_tokens": 2}  # the entry's own budget
    assert arithmetic["protocol"]["generation_kwargs"] == {"max_new_tokens": 24}  # eval.max_new_tokens
    assert arithmetic["protocol"]["batch_size"] == 2


def test_training_eval_tasks_without_eval_every_run_once_at_the_end(tmp_path: Path) -> None:
    out = tmp_path / "run"
    run.train("tiny", out, [*TRAIN, "train.eval_tasks=[{task: arithmetic, limit: 3}]"], evaluate=False)
    evals = [row for row in _json(out / "train_summary.json")["history"] if "eval/arithmetic/accuracy" in row]
    assert [row["step"] for row in evals] == [2] and evals[0]["eval/arithmetic/n"] == 3
    assert "eval/vqa_accuracy" not in evals[0]  # no periodic ShapesWorld evaluation was asked for
    assert sorted(p.name for p in (out / "eval_tasks").iterdir()) == ["step-0000002"]


@pytest.mark.parametrize(("entries", "message"), [
    ("[{task: nope}]", "train.eval_tasks[0].task: unknown eval task 'nope'"),
    ("[{task: arithmetic}, {task: pope}]", "train.eval_tasks[1].data: task 'pope' needs the benchmark file"),
    ("[{task: arithmetic, data: q.json}]", "train.eval_tasks[0].data/images: task 'arithmetic' generates its samples; "
                                           "set them with train.eval_tasks[0].options"),
    ("[{task: arithmetic, options: {test_problems: 3}}]", "unknown key"),
])
def test_training_eval_task_errors_name_the_entry(entries: str, message: str) -> None:
    from mllm.evaluation import training_tasks

    with pytest.raises(UserError, match=re.escape(message)):
        training_tasks(load_config("tiny", [*TRAIN, f"train.eval_tasks={entries}"]))


@pytest.mark.parametrize(("entries", "message"), [
    ("[{task: arithmetic}, {task: arithmetic}]", "train.eval_tasks: task 'arithmetic' listed twice"),
    ("[{task: arithmetic, limit: 0}]", "train.eval_tasks[0].limit: expected >= 1 or null, got 0"),
    ("[{task: arithmetic, limt: 3}]", "train.eval_tasks[0].limt: unknown key"),
])
def test_eval_tasks_config_is_checked_when_loaded(entries: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config("tiny", [*TRAIN, f"train.eval_tasks={entries}"])
