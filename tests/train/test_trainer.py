"""Trainer pieces: schedule, deterministic step-indexed data order, accumulation, resume, NaN guard."""

from __future__ import annotations

import gc
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from train.trainer import StepBatchSampler, TrainConfig, Trainer, TrainingError, lr_lambda


def test_lr_schedule_hand_values() -> None:
    cfg = TrainConfig(steps=110, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_lambda(0, cfg) == pytest.approx(0.1)
    assert lr_lambda(9, cfg) == pytest.approx(1.0)
    assert lr_lambda(10, cfg) == pytest.approx(1.0)
    # half-way through the cosine: 0.1 + 0.9 * 0.5 * (1 + cos(pi/2)) = 0.55
    assert lr_lambda(60, cfg) == pytest.approx(0.55)
    assert lr_lambda(110, cfg) == pytest.approx(0.1)


def test_accumulation_must_divide() -> None:
    assert TrainConfig(batch_size=64, micro_batch_size=16).accumulation(2) == 2
    with pytest.raises(TrainingError, match="not a multiple"):
        TrainConfig(batch_size=64, micro_batch_size=24).accumulation(1)


def test_sampler_is_a_function_of_step_and_shards_cover_the_batch() -> None:
    cfg = TrainConfig(steps=6, batch_size=8, micro_batch_size=2, seed=3)
    full = list(StepBatchSampler(10, cfg, 0, 0, 1))
    resumed = list(StepBatchSampler(10, cfg, 4, 0, 1))
    per_step = 8 // 2
    assert resumed == full[4 * per_step:]
    # two processes: their micro-batches of one step together are that step's global batch
    r0 = list(StepBatchSampler(10, cfg, 0, 0, 2))
    r1 = list(StepBatchSampler(10, cfg, 0, 1, 2))
    step0 = sorted(sum(r0[:2], []) + sum(r1[:2], []))
    assert step0 == sorted(sum(full[:per_step], []))
    # every epoch is a permutation of the data set
    flat = sum(full, [])
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))


class _Regress(nn.Module):
    """y = w x + b on a fixed data set; forward(**batch) returns an object with .loss."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 1)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(loss=nn.functional.mse_loss(self.lin(x), y))


def _data(n: int = 64) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, generator=g)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5]]) + 0.3
    return [{"x": x[i], "y": y[i]} for i in range(n)]


def _collate(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


class _Crash(RuntimeError):
    pass


def _crashing_collate(after: int):
    """A collate that dies on call ``after + 1``: a process killed between two steps."""
    calls = 0

    def collate(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        nonlocal calls
        calls += 1
        if calls > after:
            raise _Crash
        return _collate(items)

    return collate


def _fit(out: Path, steps: int, resume: str | None = None, save_every: int = 0, collate=_collate) -> list[dict]:
    torch.manual_seed(0)
    cfg = TrainConfig(steps=steps, batch_size=8, micro_batch_size=4, lr=0.2, warmup_steps=2,
                      log_every=1, save_every=save_every, keep_last=1)
    trainer = Trainer(_Regress(), _data(), collate, cfg, out)
    return [h for h in trainer.fit(resume=resume) if "loss" in h]


def test_loss_falls_and_resume_matches_uninterrupted_run(tmp_path: Path) -> None:
    full = _fit(tmp_path / "a", steps=40)
    losses = [h["loss"] for h in full]
    assert sum(losses[-5:]) < 0.05 * sum(losses[:5])
    with pytest.raises(_Crash):  # dies fetching step 23's data: 2 micro-batches per step
        _fit(tmp_path / "b", steps=40, save_every=10, collate=_crashing_collate(after=44))
    ckpts = sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir())
    assert ckpts == ["step-0000020"]  # keep_last=1 rotated step-10 away, never the newest
    resumed = _fit(tmp_path / "b", steps=40, resume="auto")
    tail = [h["loss"] for h in resumed if h["step"] > 20]
    assert tail == pytest.approx(losses[20:], rel=1e-6)


def test_nan_loss_is_a_clear_error(tmp_path: Path) -> None:
    data = _data()
    data[0]["y"] = torch.tensor([math.nan])
    cfg = TrainConfig(steps=3, batch_size=64, micro_batch_size=64, warmup_steps=1)
    with pytest.raises(TrainingError, match="non-finite loss nan at step 0"):
        Trainer(_Regress(), data, _collate, cfg, tmp_path).fit()


def test_resume_from_a_folder_that_is_not_a_checkpoint(tmp_path: Path) -> None:
    cfg = TrainConfig(steps=2, batch_size=8, micro_batch_size=8)
    with pytest.raises(TrainingError, match="not a complete checkpoint"):
        Trainer(_Regress(), _data(), _collate, cfg, tmp_path).fit(resume=str(tmp_path))


def test_tensorboard_tracker_writes_event_files_under_the_run_dir(tmp_path: Path) -> None:
    assert TrainConfig().log_with == ["tensorboard"]
    _fit(tmp_path / "run", steps=2)
    assert list((tmp_path / "run" / "logs").rglob("events.out.tfevents.*"))


def test_unknown_or_missing_tracker_is_refused_before_training() -> None:
    from accelerate.tracking import get_available_trackers
    from accelerate.utils import LoggerType

    known = [n for n in LoggerType.list() if n != "all"]
    with pytest.raises(TrainingError) as err:
        TrainConfig(log_with=["tensorbored"])
    assert str(err.value) == f"train.log_with: unknown tracker 'tensorbored'; expected some of: {', '.join(known)}"
    installed = {LoggerType(t).value for t in get_available_trackers()}
    missing = next((n for n in known if n not in installed), None)
    if missing is not None:
        with pytest.raises(TrainingError, match=rf"^train.log_with: tracker '{missing}' is not installed"):
            TrainConfig(log_with=[missing])
    TrainConfig(log_with=[])  # no tracker at all is fine


def _last_line(text: str) -> str:
    """The last non-empty line a terminal shows (progress bars redraw with carriage returns)."""
    return [line for line in text.replace("\r", "\n").splitlines() if line.strip()][-1]


def test_an_error_in_the_loop_is_the_last_line_printed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def collate(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        raise TrainingError("data.json: record 3: bad")

    cfg = TrainConfig(steps=3, batch_size=8, micro_batch_size=8, log_with=[])
    trainer = Trainer(_Regress(), _data(), collate, cfg, tmp_path)
    try:
        trainer.fit()
    except TrainingError as err:  # what the command line does with a user error
        print(f"mllm train: error: {err}", file=sys.stderr)
    del trainer
    gc.collect()  # an unclosed bar would redraw here, after the error
    assert _last_line(capsys.readouterr().err) == "mllm train: error: data.json: record 3: bad"
