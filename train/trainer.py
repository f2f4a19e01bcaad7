"""One accelerate training loop: AdamW, warmup + cosine, accumulation, clipping, resumable checkpoints.

The loop serves any model whose ``forward(**batch)`` returns an object with a scalar ``loss``
(:class:`LossModel`); it never imports ``mllm``. Periodic evaluation is a callback handed in by
the caller (``eval_fn(step) -> dict``), so ``train/`` does not depend on ``eval/``.

Data order is a pure function of ``(seed, step)`` (:class:`StepBatchSampler`), so a resumed run
reads exactly the batches the uninterrupted run would have read.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from torch.utils.data import DataLoader, Sampler

log = logging.getLogger("mllm.train")


class TrainingError(RuntimeError):
    """The run cannot go on (NaN loss, bad batch arithmetic, unreadable checkpoint)."""


@dataclass
class TrainConfig:
    steps: int = 3000  # optimizer steps
    batch_size: int = 64  # global batch (samples per optimizer step, all processes)
    micro_batch_size: int = 64  # per process and forward; accumulation = batch / (micro * processes)
    lr: float = 5e-4  # peak learning rate
    weight_decay: float = 0.01
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1  # cosine floor as a fraction of lr
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    grad_clip: float = 1.0  # max global grad norm; 0 disables
    seed: int = 0
    log_every: int = 25
    eval_every: int = 0  # 0 = evaluate only at the end
    save_every: int = 0  # 0 = checkpoint only at the end
    keep_last: int = 2  # complete checkpoints kept; the newest complete one is never deleted
    num_workers: int = 0
    mixed_precision: str = "no"  # no | bf16 | fp16 (accelerate)
    trainable: list[str] = field(default_factory=lambda: ["encoder", "projector", "llm"])

    def __post_init__(self) -> None:
        if self.steps <= 0 or self.batch_size <= 0 or self.micro_batch_size <= 0:
            raise ValueError("steps, batch_size and micro_batch_size must be positive")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ValueError(f"mixed_precision: expected no|bf16|fp16, got {self.mixed_precision!r}")
        if len(self.betas) != 2:
            raise ValueError(f"betas: expected two numbers, got {self.betas}")

    def accumulation(self, num_processes: int) -> int:
        """Micro-batches per optimizer step; the global batch must divide evenly (prismatic)."""
        per_step = self.micro_batch_size * num_processes
        if self.batch_size % per_step:
            raise TrainingError(
                f"train.batch_size={self.batch_size} is not a multiple of micro_batch_size "
                f"{self.micro_batch_size} x {num_processes} processes"
            )
        return self.batch_size // per_step


class LossModel(Protocol):
    """What the trainer needs from a model: ``model(**batch).loss``."""

    def __call__(self, **batch: Any) -> Any: ...

    def parameters(self) -> Iterator[nn.Parameter]: ...


def lr_lambda(step: int, cfg: TrainConfig) -> float:
    """Multiplier of the peak lr: linear warmup, then cosine to ``min_lr_ratio``.

    m(s) = s / w for s < w;  m(s) = r + (1 - r) * (1 + cos(pi * (s - w) / (S - w))) / 2 after.
    """
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class StepBatchSampler(Sampler[list[int]]):
    """Yields micro-batches of dataset indices; the order depends only on (seed, step).

    Epoch e is the permutation ``randperm(n, generator=seed + e)``; global step s takes the next
    ``batch_size`` indices of the endless stream, and this process takes its slice of them.
    """

    def __init__(self, n: int, cfg: TrainConfig, start_step: int, rank: int, world: int) -> None:
        self.n, self.cfg, self.start_step, self.rank, self.world = n, cfg, start_step, rank, world
        self._perms: dict[int, torch.Tensor] = {}

    def _index(self, flat: int) -> int:
        epoch, pos = divmod(flat, self.n)
        if epoch not in self._perms:
            self._perms = {epoch: torch.randperm(self.n, generator=torch.Generator().manual_seed(self.cfg.seed + epoch))}
        return int(self._perms[epoch][pos])

    def __iter__(self) -> Iterator[list[int]]:
        micro, global_bs = self.cfg.micro_batch_size, self.cfg.batch_size
        for step in range(self.start_step, self.cfg.steps):
            base = step * global_bs
            for m in range(global_bs // (micro * self.world)):
                start = base + (m * self.world + self.rank) * micro
                yield [self._index(start + j) for j in range(micro)]

    def __len__(self) -> int:
        return (self.cfg.steps - self.start_step) * (self.cfg.batch_size // (self.cfg.micro_batch_size * self.world))


def _complete_checkpoints(root: Path) -> list[Path]:
    """Checkpoint folders that finished writing (the rename is the commit point), oldest first."""
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and (p / "trainer_state.json").is_file()]
    return sorted(done, key=lambda p: int(p.name.split("-")[1]))


def resolve_resume(resume: str | None, out_dir: Path) -> Path | None:
    """``None`` -> fresh start; ``"auto"`` -> latest complete checkpoint in the run (or fresh); else a path."""
    if resume is None:
        return None
    if resume == "auto":
        found = _complete_checkpoints(out_dir / "checkpoints")
        return found[-1] if found else None
    path = Path(resume)
    if not (path / "trainer_state.json").is_file():
        raise TrainingError(f"--resume {path}: not a complete checkpoint (no trainer_state.json)")
    return path


class Trainer:
    """Runs ``cfg.steps`` optimizer steps of ``model`` on ``dataset`` under accelerate."""

    def __init__(
        self,
        model: nn.Module,
        dataset: Sequence[Any],
        collate_fn: Callable[[list[Any]], dict[str, torch.Tensor]],
        cfg: TrainConfig,
        out_dir: str | os.PathLike[str],
        eval_fn: Callable[[int], dict[str, float]] | None = None,
    ) -> None:
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        self.cfg, self.out_dir, self.eval_fn = cfg, Path(out_dir), eval_fn
        self.accelerator = Accelerator(
            gradient_accumulation_steps=1,  # we step by hand: accumulation is explicit below
            mixed_precision=cfg.mixed_precision,
            log_with="tensorboard",
            project_dir=str(self.out_dir),
        )
        self.accum = cfg.accumulation(self.accelerator.num_processes)
        set_seed(cfg.seed)
        self.dataset, self.collate_fn = dataset, collate_fn
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise TrainingError("no trainable parameters: check train.trainable")
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]  # norms and biases: no weight decay
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.lr, betas=tuple(cfg.betas),
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_lambda(s, cfg))
        self.model, self.optimizer, self.scheduler = self.accelerator.prepare(model, optimizer, scheduler)
        self.step = 0
        self.history: list[dict[str, float]] = []

    # --- checkpoints ---------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        """accelerate state + trainer_state.json into a temp dir, then rename; rotate old ones."""
        root = self.out_dir / "checkpoints"
        final = root / f"step-{self.step:07d}"
        tmp = root / f".tmp-step-{self.step:07d}"
        if self.accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        self.accelerator.save_state(str(tmp))
        if self.accelerator.is_main_process:
            state = {"step": self.step, "history": self.history}
            (tmp / "trainer_state.json").write_text(json.dumps(state))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            for old in _complete_checkpoints(root)[: -max(1, self.cfg.keep_last)]:
                shutil.rmtree(old, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        return final

    def load_checkpoint(self, path: Path) -> None:
        self.accelerator.load_state(str(path))
        state = json.loads((path / "trainer_state.json").read_text())
        self.step, self.history = int(state["step"]), list(state["history"])
        log.info("resumed from %s at step %d", path, self.step)

    # --- loop ------------------------------------------------------------------------------------
    def _loader(self) -> DataLoader:
        sampler = StepBatchSampler(
            len(self.dataset), self.cfg, self.step, self.accelerator.process_index, self.accelerator.num_processes
        )
        return DataLoader(
            self.dataset, batch_sampler=sampler, collate_fn=self.collate_fn, num_workers=self.cfg.num_workers
        )

    def fit(self, resume: str | None = None) -> list[dict[str, float]]:
        """Train to ``cfg.steps``; returns the logged history (one dict per log/eval point)."""
        from tqdm.auto import tqdm

        ckpt = resolve_resume(resume, self.out_dir)
        if ckpt is not None:
            self.load_checkpoint(ckpt)
        self.accelerator.init_trackers("tb")
        cfg, acc = self.cfg, self.accelerator
        self.model.train()
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not acc.is_local_main_process, desc="train")
        loss_sum, tokens, samples, t0 = 0.0, 0, 0, time.perf_counter()
        batches = iter(self._loader())
        while self.step < cfg.steps:
            for _ in range(self.accum):
                batch = next(batches)
                batch = {k: v.to(acc.device) if torch.is_tensor(v) else v for k, v in batch.items()}
                loss = self.model(**batch).loss
                if not torch.isfinite(loss):
                    raise TrainingError(f"non-finite loss {loss.item()} at step {self.step}: lower train.lr or check the data")
                acc.backward(loss / self.accum)
                loss_sum += loss.item() / self.accum
                tokens += int(batch["attention_mask"].sum()) if "attention_mask" in batch else 0
                samples += len(next(iter(batch.values())))
            if cfg.grad_clip > 0:
                acc.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            bar.update(1)
            if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                dt = time.perf_counter() - t0
                n = cfg.log_every if self.step % cfg.log_every == 0 else self.step % cfg.log_every
                row = {
                    "step": self.step, "loss": loss_sum / n, "lr": self.scheduler.get_last_lr()[0],
                    "tokens_per_s": tokens / dt, "samples_per_s": samples / dt, "s_per_step": dt / n,
                }
                self.history.append(row)
                acc.log({f"train/{k}": v for k, v in row.items() if k != "step"}, step=self.step)
                bar.set_postfix(loss=f"{row['loss']:.3f}", lr=f"{row['lr']:.1e}", tok_s=f"{row['tokens_per_s']:.0f}")
                loss_sum, tokens, samples, t0 = 0.0, 0, 0, time.perf_counter()
            if self.eval_fn is not None and cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.steps:
                self._evaluate()
                t0 = time.perf_counter()
            if cfg.save_every and self.step % cfg.save_every == 0 and self.step < cfg.steps:
                self.save_checkpoint()
                t0 = time.perf_counter()
        bar.close()
        self.save_checkpoint()
        if self.eval_fn is not None:
            self._evaluate()
        acc.end_training()
        return self.history

    def _evaluate(self) -> None:
        self.model.eval()
        metrics = self.eval_fn(self.step) if self.eval_fn else {}
        self.model.train()
        self.history.append({"step": self.step, **{f"eval/{k}": v for k, v in metrics.items()}})
        self.accelerator.log({f"eval/{k}": v for k, v in metrics.items()}, step=self.step)

    def unwrapped(self) -> nn.Module:
        return self.accelerator.unwrap_model(self.model)
