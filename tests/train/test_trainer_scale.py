"""Trainer additions: per-group learning rates, checkpoint rotation that survives a kill, torn-folder
cleanup, MFU, and resumable streamed data."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from train import trainer as trainer_mod
from train.throughput import mfu, peak_flops, token_flops
from train.trainer import TrainConfig, Trainer, TrainingError, param_groups, resolve_resume


class Toy(nn.Module):
    """Two named parts (enc, proj) and a frozen one (head); forward(**batch) -> .loss."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(3, 4)
        self.proj = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
        self.head = nn.Linear(4, 1)
        self.head.requires_grad_(False)

    def forward(self, x: torch.Tensor, y: torch.Tensor, attention_mask: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(loss=nn.functional.mse_loss(self.head(self.proj(self.enc(x))), y))


def _data(n: int = 32) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, generator=g)
    return [{"x": x[i], "y": x[i, :1] * 2, "attention_mask": torch.ones(5, dtype=torch.long)} for i in range(n)]


def _collate(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


def test_param_groups_by_longest_prefix() -> None:
    cfg = TrainConfig(lr=1e-3, weight_decay=0.1, lr_groups={"proj": 0.1, "proj.1": 0.5})
    groups = param_groups(Toy(), cfg)
    table = {g["name"]: (g["lr"], g["weight_decay"], sum(p.numel() for p in g["params"])) for g in groups}
    assert table == {
        "default": (1e-3, 0.1, 12), "default/no_decay": (1e-3, 0.0, 4),  # enc weight / enc bias
        "proj": (0.1, 0.1, 16), "proj/no_decay": (0.1, 0.0, 4),  # proj.0 weight / proj.0 bias
        "proj.1/no_decay": (0.5, 0.0, 8),  # LayerNorm weight + bias; head is frozen: absent
    }
    with pytest.raises(TrainingError, match="train.lr_groups.head: no trainable parameter's name starts with 'head'"):
        param_groups(Toy(), TrainConfig(lr_groups={"head": 0.1}))


def test_group_lrs_follow_one_schedule(tmp_path: Path) -> None:
    cfg = TrainConfig(steps=4, batch_size=8, micro_batch_size=4, lr=1e-2, warmup_steps=2, log_every=1,
                      lr_groups={"proj": 1e-3})
    history = [h for h in Trainer(Toy(), _data(), _collate, cfg, tmp_path).fit() if "loss" in h]
    for row in history:
        assert row["lr/default"] == row["lr"] and row["lr/proj"] == pytest.approx(row["lr"] / 10)
    # lr logged after step s is m(s): warmup m(1) = 2/2, then cosine over 2 steps: 1, 0.1 + 0.9 * 0.5, 0.1
    assert [h["lr"] for h in history] == pytest.approx([1e-2, 1e-2, 1e-2 * 0.55, 1e-3])


def test_mfu_figures() -> None:
    assert token_flops(1_000_000, 1000) == 6e9
    assert mfu(6e9, 1e12) == pytest.approx(6e-3)
    assert mfu(10.0, None) is None
    assert peak_flops(torch.device("cpu")) is None
    assert peak_flops(torch.device("cpu"), override_tflops=100.0) == 1e14


def test_mfu_is_logged_with_a_known_peak(tmp_path: Path) -> None:
    cfg = TrainConfig(steps=2, batch_size=8, micro_batch_size=8, log_every=1, warmup_steps=1, peak_tflops=1e-6)
    trainer = Trainer(Toy(), _data(), _collate, cfg, tmp_path)
    history = trainer.fit()
    n_params = sum(p.numel() for p in Toy().parameters())
    for row in (h for h in history if "loss" in h):
        assert row["mfu"] == pytest.approx(6 * n_params * row["tokens_per_s"] / 1e6)
        assert row["tokens_per_s"] > 0
    cpu = Trainer(Toy(), _data(), _collate, TrainConfig(steps=1, batch_size=8, micro_batch_size=8), tmp_path / "b")
    assert "mfu" not in cpu.fit()[0]


class Counted(Toy):
    """A model that counts its own FLOPs (as MLLM.flops_counter): 1e4 per row plus the attended tokens it is given."""

    def flops_counter(self):  # noqa: ANN201
        return lambda batch, tokens: 1e4 * len(batch["x"]) + tokens


def test_mfu_uses_the_models_own_flop_count(tmp_path: Path) -> None:
    cfg = TrainConfig(steps=2, batch_size=8, micro_batch_size=4, log_every=1, warmup_steps=1, peak_tflops=1e-6)
    for row in (h for h in Trainer(Counted(), _data(), _collate, cfg, tmp_path).fit() if "loss" in h):
        # one step = 8 rows of 5 attended tokens: 8e4 + 40 FLOPs over the step's time, 40 tokens over the same time
        assert row["mfu"] == pytest.approx((8e4 + 40) * row["tokens_per_s"] / 40 / 1e6)


def _fit(out: Path, steps: int, **kw: object) -> Trainer:
    cfg = TrainConfig(steps=steps, batch_size=8, micro_batch_size=4, lr=0.05, warmup_steps=1, log_every=1, **kw)
    trainer = Trainer(Toy(), _data(), _collate, cfg, out)
    trainer.fit(resume="auto")
    return trainer


def test_rotation_cut_short_by_a_kill_leaves_no_false_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_rmtree = trainer_mod.shutil.rmtree

    def killed_during_delete(path: object, *a: object, **k: object) -> None:
        if ".tmp-del-" in str(path):  # the process dies right after renaming the old checkpoint away
            return
        real_rmtree(path, *a, **k)

    monkeypatch.setattr(trainer_mod.shutil, "rmtree", killed_during_delete)
    _fit(tmp_path, steps=6, save_every=2, keep_last=1)
    root = tmp_path / "checkpoints"
    names = sorted(p.name for p in root.iterdir())
    assert names == [".tmp-del-step-0000002", ".tmp-del-step-0000004", "step-0000006"]
    assert all((root / n / "trainer_state.json").is_file() for n in names)  # complete, but renamed away
    assert resolve_resume("auto", tmp_path) == root / "step-0000006"
    monkeypatch.undo()
    _fit(tmp_path, steps=7, save_every=2, keep_last=0)  # keep_last 0 still keeps the newest
    assert sorted(p.name for p in root.iterdir()) == ["step-0000007"]


def test_torn_checkpoint_is_ignored_and_removed(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _fit(tmp_path, steps=2)
    torn = tmp_path / "checkpoints" / ".tmp-step-0000003"
    torn.mkdir()
    (torn / "model.safetensors").write_bytes(b"half")
    assert resolve_resume("auto", tmp_path) == tmp_path / "checkpoints" / "step-0000002"
    with caplog.at_level("WARNING", logger="mllm.train"):
        trainer = _fit(tmp_path, steps=3)
    assert trainer.step == 3 and not torn.exists()
    assert "removed 1 torn checkpoint folder(s) left by an interrupted run: .tmp-step-0000003" in caplog.text


class Stream:
    def __init__(self, items: list[dict[str, torch.Tensor]], fail_after: int | None = None) -> None:
        self.items, self.fail_after, self.read = items, fail_after, 0

    def __iter__(self):  # noqa: ANN204
        for item in self.items:
            self.read += 1
            if self.fail_after is not None and self.read > self.fail_after:
                raise KeyboardInterrupt  # the process stops mid-run
            yield item


def test_streamed_data_resumes_at_its_position(tmp_path: Path) -> None:
    def fit(out: Path, stream: Stream, resume: str | None = None) -> list[dict]:
        torch.manual_seed(0)
        cfg = TrainConfig(steps=10, batch_size=8, micro_batch_size=4, lr=0.05, warmup_steps=1, log_every=1,
                          save_every=3)
        return [h for h in Trainer(Toy(), stream, _collate, cfg, out).fit(resume=resume) if "loss" in h]

    full = fit(tmp_path / "a", Stream(_data(20)))
    with pytest.raises(KeyboardInterrupt):
        fit(tmp_path / "b", Stream(_data(20), fail_after=55))  # dies reading step 6's batch (epoch 3)
    resumed = fit(tmp_path / "b", Stream(_data(20)), resume="auto")
    assert [h["step"] for h in resumed] == list(range(1, 11))
    assert [h["loss"] for h in resumed] == pytest.approx([h["loss"] for h in full], rel=1e-6)
    with pytest.raises(TrainingError, match="group_by_length needs a random-access data set"):
        Trainer(Toy(), Stream(_data()), _collate, TrainConfig(group_by_length=2), tmp_path / "c")
