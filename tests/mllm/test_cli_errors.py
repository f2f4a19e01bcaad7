"""Every user error on the command line is one line, the last one, with exit status 2; a bug is not.

Flags are checked before anything is loaded, a mistyped key is blamed on the ``--set`` that wrote it,
and a run that fails before training leaves nothing in ``--out`` that looks like a started run.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from mllm import cli, run
from mllm.registry import EVAL_TASKS


def _last_line(text: str) -> str:
    return [line for line in text.splitlines() if line.strip()][-1]


def test_unknown_eval_task_is_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["eval", str(tmp_path), "--task", "vqa2", "--out", str(tmp_path / "e")])
    assert exit_.value.code == 2
    assert _last_line(capsys.readouterr().err) == (
        "mllm eval: error: argument --task: unknown eval task 'vqa2'; did you mean 'vqav2'? "
        f"(expected one of: {', '.join(EVAL_TASKS.names())})"
    )


@pytest.mark.parametrize("argv", [
    ["eval", "NOPE", "--out", "o", "--batch-size", "-1"],
    ["probe", "NOPE", "--out", "o", "--batch-size", "-1"],
])
def test_flags_are_checked_before_the_model_is_loaded(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert exit_.value.code == 2  # the checkpoint NOPE does not exist: the flag is refused first
    assert _last_line(capsys.readouterr().err) == (
        f"mllm {argv[0]}: error: argument --batch-size: expected a positive integer, got '-1'"
    )


def test_mistyped_set_key_is_blamed_on_the_set_and_leaves_no_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    assert cli.main(["train", "tiny", "--out", str(out), "--set", "train.stpes=1"]) == 2
    assert _last_line(capsys.readouterr().err).startswith(
        "mllm train: error: --set train.stpes=1: train.stpes: unknown key for TrainConfig; did you mean 'steps'? "
        "(expected one of: steps, batch_size,"
    )
    assert not out.exists()


def test_unknown_task_in_train_eval_tasks_is_refused_before_any_build(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    assert cli.main(["train", "tiny", "--out", str(out), "--set", "train.eval_tasks=[{task: popee}]"]) == 2
    assert _last_line(capsys.readouterr().err).startswith(
        "mllm train: error: --set train.eval_tasks=[{task: popee}]: train.eval_tasks[0].task: unknown eval task "
        "'popee'; did you mean 'pope'? (expected one of: "
    )
    assert not out.exists()


def test_a_run_failing_before_training_leaves_no_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")  # what is already there stays
    code = cli.main(["train", "tiny", "--out", str(out), "--set", f"model.tokenizer={tmp_path / 'no_tokenizer'}"])
    assert code == 2
    assert _last_line(capsys.readouterr().err) == (
        f"mllm train: error: model.tokenizer: {tmp_path / 'no_tokenizer'} is not a folder"
    )
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_missing_checkpoint_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["eval", str(tmp_path / "ckpt"), "--out", str(tmp_path / "e")]) == 2
    assert _last_line(capsys.readouterr().err) == (
        f"mllm eval: error: {tmp_path / 'ckpt'}: not a model folder (no mllm_config.yaml, ours, nor a transformers "
        "config.json); pass RUN/model"
    )


def test_a_bug_keeps_its_traceback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise ValueError("a bug, not bad input")

    monkeypatch.setattr(run, "train", broken)
    with pytest.raises(ValueError, match="a bug, not bad input"):
        cli.main(["train", "tiny", "--out", str(tmp_path / "run")])
