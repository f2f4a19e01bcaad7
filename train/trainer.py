"""One accelerate training loop: AdamW, warmup + cosine, accumulation, clipping, resumable checkpoints.

The loop serves any model whose ``forward(**batch)`` returns an object with a scalar ``loss``
(:class:`LossModel`); it never imports ``mllm``. Periodic evaluation is a callback handed in by
the caller (``eval_fn(step) -> dict``), so ``train/`` does not depend on ``eval/``.

Data order is a pure function of ``(seed, step)`` (:class:`StepBatchSampler`), so a resumed run
reads exactly the batches the uninterrupted run would have read. Checkpoints hold model, optimizer,
scheduler and RNG states (``accelerator.save_state``) plus the step; each is written to a
``.tmp-*`` folder and renamed into place, so a run killed at any moment resumes from the newest
complete one, and torn ``.tmp-*`` folders are removed on the next start. Accumulation goes through
``accelerator.accumulate`` (no gradient all-reduce on inner micro-batches; DeepSpeed steps at the
boundary itself).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Sequence, Sized
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from torch.utils.data import DataLoader

from common.errors import UserError
from train.sampler import StepBatchSampler, stream_batches
from train.stages import DEFAULT_TRAINABLE, LoraConfig, plan_groups
from train.throughput import mfu, peak_flops, token_flops

log = logging.getLogger("mllm.train")


class TrainingError(UserError, RuntimeError):
    """The run cannot go on (NaN loss, bad batch arithmetic, unreadable checkpoint)."""


@dataclass
class EvalTaskSpec:
    """One task evaluated during training (``train.eval_tasks``); the roof builds it, as ``mllm eval`` does."""

    task: str  # a registered eval task name, e.g. pope
    data: str | None = None  # its benchmark file; none for a generated task (shapesworld, arithmetic, ...)
    images: str | None = None  # its image folder; None = the task's default
    limit: int | None = None  # the first N samples only (None = all)
    max_new_tokens: int | None = None  # None = eval.max_new_tokens; a reasoning chain needs more
    options: dict[str, Any] = field(default_factory=dict)  # the task's own config keys, as `mllm eval --opt`

    def __post_init__(self) -> None:
        for name in ("limit", "max_new_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name}: expected >= 1 or null, got {value}")


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
    # Tasks evaluated at every eval point (and at the end), each logged as eval/TASK/METRIC and written to
    # RUN/eval_tasks/step-N/TASK, e.g. [{task: pope, data: coco_pope_random.json, images: val2014, limit: 500}]
    eval_tasks: list[EvalTaskSpec] = field(default_factory=list)
    save_every: int = 0  # 0 = checkpoint only at the end
    keep_last: int = 2  # complete checkpoints kept; the newest complete one is never deleted
    num_workers: int = 0
    mixed_precision: str = "no"  # no | bf16 | fp16 (accelerate)
    trainable: list[str] = field(default_factory=lambda: list(DEFAULT_TRAINABLE))  # groups, when no stage
    stage: str | None = None  # align | instruct: a named freeze plan (train/stages.py) instead of trainable
    init_from: str | None = None  # a saved model folder (e.g. stage 1's RUN/model) whose weights start this run
    unfreeze_encoder: bool = False  # with a stage: the vision encoder trains too
    lora: LoraConfig | None = None  # LoRA adapters on the LLM (peft) instead of training it in full
    lr_groups: dict[str, float] = field(default_factory=dict)  # peak lr by parameter-name prefix, e.g. llm: 2e-5
    gradient_checkpointing: bool = False  # recompute activations in backward (LLM and encoder)
    group_by_length: int = 0  # > 0: steps per length-sorted mega-batch (train/sampler.py); 0 = off
    peak_tflops: float | None = None  # per-device peak for MFU; None = known GPUs' bf16 peak, no MFU on CPU
    # DDP: tolerate trainable parameters outside a step's graph (e.g. an encoder's final norm that no tapped
    # layer uses); false saves a graph walk per step when every trainable parameter is always used.
    find_unused_parameters: bool = True
    # Experiment trackers, by accelerate's names (``log_with=``): tensorboard, wandb, mlflow, aim, ... when
    # installed; logs go under RUN/logs for those that write locally. [] logs to none.
    log_with: list[str] = field(default_factory=lambda: ["tensorboard"])

    def __post_init__(self) -> None:
        if self.steps <= 0 or self.batch_size <= 0 or self.micro_batch_size <= 0:
            raise ValueError("steps, batch_size and micro_batch_size must be positive")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ValueError(f"mixed_precision: expected no|bf16|fp16, got {self.mixed_precision!r}")
        if len(self.betas) != 2:
            raise ValueError(f"betas: expected two numbers, got {self.betas}")
        if self.group_by_length < 0:
            raise ValueError(f"group_by_length: expected 0 (off) or a number of steps, got {self.group_by_length}")
        bad_lr = [k for k, v in self.lr_groups.items() if not v > 0]
        if bad_lr:
            raise ValueError(f"lr_groups.{bad_lr[0]}: expected a positive learning rate")
        names = [spec.task for spec in self.eval_tasks]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"eval_tasks: task {repeated[0]!r} listed twice (each task writes one folder per step)")
        self.groups()  # a contradictory stage / trainable / lora plan fails here, before any I/O
        check_trackers(self.log_with)

    def groups(self) -> list[str]:
        """The module groups this run trains (train/stages.py)."""
        return plan_groups(self.stage, self.trainable, self.unfreeze_encoder, self.lora)

    def accumulation(self, num_processes: int) -> int:
        """Micro-batches per optimizer step; the global batch must divide evenly (prismatic)."""
        per_step = self.micro_batch_size * num_processes
        if self.batch_size % per_step:
            raise TrainingError(
                f"train.batch_size={self.batch_size} is not a multiple of micro_batch_size "
                f"{self.micro_batch_size} x {num_processes} processes"
            )
        return self.batch_size // per_step


def check_trackers(names: Sequence[str]) -> None:
    """Each of ``train.log_with`` must be one of accelerate's trackers and installed here."""
    from accelerate.tracking import get_available_trackers
    from accelerate.utils import LoggerType

    known = [n for n in LoggerType.list() if n != LoggerType.ALL.value]
    installed = sorted(str(LoggerType(t).value) for t in get_available_trackers())
    for name in names:
        if name not in known:
            raise TrainingError(f"train.log_with: unknown tracker {name!r}; expected some of: {', '.join(known)}")
        if name not in installed:
            raise TrainingError(
                f"train.log_with: tracker {name!r} is not installed (pip install {name}); "
                f"installed: {', '.join(installed) or 'none'}"
            )


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


def param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict[str, Any]]:
    """AdamW parameter groups: by ``cfg.lr_groups`` prefix (the longest matching prefix of a
    parameter's name wins; others get ``cfg.lr``) x weight decay on matrices only (no decay on
    norms and biases). Each group's ``lr`` is its peak; the schedule scales all groups alike."""
    prefixes = sorted(cfg.lr_groups, key=len, reverse=True)
    buckets: dict[tuple[str, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        prefix = next((q for q in prefixes if name == q or name.startswith(q + ".")), "")
        buckets.setdefault((prefix, param.ndim >= 2), []).append(param)
    if not buckets:
        raise TrainingError("no trainable parameters: check train.stage / train.trainable")
    unused = [q for q in prefixes if not any(prefix == q for prefix, _ in buckets)]
    if unused:
        raise TrainingError(f"train.lr_groups.{unused[0]}: no trainable parameter's name starts with {unused[0]!r}")
    return [
        {"params": params, "lr": cfg.lr_groups.get(prefix, cfg.lr), "weight_decay": cfg.weight_decay if decay else 0.0,
         "name": (prefix or "default") + ("" if decay else "/no_decay")}
        for (prefix, decay), params in buckets.items()
    ]


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over :func:`param_groups` and its warmup + cosine schedule (:func:`lr_lambda`), stepped once per step."""
    optimizer = torch.optim.AdamW(param_groups(model, cfg), lr=cfg.lr, betas=tuple(cfg.betas))
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_lambda(s, cfg))


def _complete_checkpoints(root: Path) -> list[Path]:
    """Checkpoint folders that finished writing (the rename is the commit point), oldest first."""
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and (p / "trainer_state.json").is_file()]
    return sorted(done, key=lambda p: int(p.name.split("-")[1]))


def clean_torn(root: Path) -> list[str]:
    """Remove ``.tmp-*`` folders: checkpoints (or deletions) a killed run left half-written."""
    torn = sorted(p for p in root.glob(".tmp-*") if p.is_dir()) if root.is_dir() else []
    for path in torn:
        shutil.rmtree(path, ignore_errors=True)
    if torn:
        log.warning("removed %d torn checkpoint folder(s) left by an interrupted run: %s",
                    len(torn), ", ".join(p.name for p in torn))
    return [p.name for p in torn]


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
        dataset: Sequence[Any] | Iterable[Any],
        collate_fn: Callable[[list[Any]], dict[str, torch.Tensor]],
        cfg: TrainConfig,
        out_dir: str | os.PathLike[str],
        eval_fn: Callable[[int], dict[str, float]] | None = None,
        lengths: Sequence[int] | None = None,
    ) -> None:
        """``dataset``: random access (a Sequence), or an iterable read as a stream; ``lengths``: per
        sample, for ``cfg.group_by_length``."""
        from accelerate import Accelerator
        from accelerate.utils import (
            DataLoaderConfiguration,
            DistributedDataParallelKwargs,
            ProjectConfiguration,
            set_seed,
        )

        self.cfg, self.out_dir, self.eval_fn = cfg, Path(out_dir), eval_fn
        self.accelerator = Accelerator(
            mixed_precision=cfg.mixed_precision,
            log_with=list(cfg.log_with) or None,
            project_config=ProjectConfiguration(project_dir=str(self.out_dir), logging_dir=str(self.out_dir / "logs")),
            # Our schedule counts optimizer steps: step it once per step, not once per process.
            dataloader_config=DataLoaderConfiguration(split_batches=True),
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=cfg.find_unused_parameters)],
        )
        self.accum = cfg.accumulation(self.accelerator.num_processes)
        self.accelerator.gradient_accumulation_steps = self.accum  # before prepare: DeepSpeed reads it there
        set_seed(cfg.seed)
        if cfg.group_by_length and (lengths is None or not isinstance(dataset, Sized)):
            raise TrainingError(
                "train.group_by_length needs a random-access data set with sample lengths (train_data, not streamed)"
            )
        self.dataset, self.collate_fn, self.lengths = dataset, collate_fn, lengths
        self.num_params = sum(p.numel() for p in model.parameters())  # before any sharding
        # a model that runs parts of itself per image patch counts its own FLOPs (MLLM.flops_counter)
        self._flops = (model.flops_counter() if hasattr(model, "flops_counter")
                       else lambda _batch, n: token_flops(self.num_params, n))
        self.peak = peak_flops(self.accelerator.device, cfg.peak_tflops)
        optimizer, scheduler = build_optimizer(model, cfg)
        ds_plugin = self.accelerator.state.deepspeed_plugin
        if ds_plugin is not None:  # no prepared data loader tells DeepSpeed the micro-batch: say it
            ds_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = cfg.micro_batch_size
            ds_plugin.deepspeed_config["gradient_clipping"] = cfg.grad_clip
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
            (tmp / "trainer_state.json").write_text(json.dumps(state))  # last file: the completeness marker
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            # Rotation runs only after the new one is complete; an old one is first renamed to a
            # .tmp-* name, so a deletion cut short is never mistaken for a complete checkpoint.
            for old in _complete_checkpoints(root)[: -max(1, self.cfg.keep_last)]:
                doomed = root / f".tmp-del-{old.name}"
                os.replace(old, doomed)
                shutil.rmtree(doomed, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        return final

    def load_checkpoint(self, path: Path) -> None:
        self.accelerator.load_state(str(path))
        state = json.loads((path / "trainer_state.json").read_text())
        self.step, self.history = int(state["step"]), list(state["history"])
        log.info("resumed from %s at step %d", path, self.step)

    # --- loop ------------------------------------------------------------------------------------
    def _loader(self) -> Iterable[dict[str, Any]]:
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        if not isinstance(self.dataset, Sized):
            return map(self.collate_fn, stream_batches(self.dataset, self.cfg, self.step, rank, world))
        sampler = StepBatchSampler(len(self.dataset), self.cfg, self.step, rank, world, self.lengths)
        # Its own generator: a DataLoader otherwise draws its worker seed from the global RNG, which a
        # resumed run (RNG restored mid-run) would draw once more than the uninterrupted run.
        generator = torch.Generator().manual_seed(self.cfg.seed + self.step)
        return DataLoader(
            self.dataset, batch_sampler=sampler, collate_fn=self.collate_fn, num_workers=self.cfg.num_workers,
            generator=generator,
        )

    def fit(self, resume: str | None = None) -> list[dict[str, float]]:
        """Train to ``cfg.steps``; returns the logged history (one dict per log/eval point)."""
        from tqdm.auto import tqdm

        if self.accelerator.is_main_process:
            clean_torn(self.out_dir / "checkpoints")
        self.accelerator.wait_for_everyone()
        ckpt = resolve_resume(resume, self.out_dir)
        if ckpt is not None:
            self.load_checkpoint(ckpt)
        self.accelerator.init_trackers(self.out_dir.resolve().name or "mllm")  # the run's name
        cfg, acc = self.cfg, self.accelerator
        self.model.train()
        # Closed before an error leaves the loop, so the error (not a redraw) is the last line printed.
        with tqdm(total=cfg.steps, initial=self.step, disable=not acc.is_local_main_process, desc="train") as bar:
            loss_sum, tokens, samples, flops, since, t0 = 0.0, 0, 0, 0.0, 0, time.perf_counter()  # since the last log
            batches = iter(self._loader())
            while self.step < cfg.steps:
                for _ in range(self.accum):
                    batch = next(batches)
                    batch = {k: v.to(acc.device) if torch.is_tensor(v) else v for k, v in batch.items()}
                    with acc.accumulate(self.model):  # the last micro-batch of a step syncs gradients
                        loss = self.model(**batch).loss
                        if not torch.isfinite(loss):
                            raise TrainingError(
                                f"non-finite loss {loss.item()} at step {self.step}: lower train.lr or check the data"
                            )
                        acc.backward(loss)  # scaled by 1 / accumulation
                    loss_sum += loss.item() / self.accum
                    attended = int(batch["attention_mask"].sum()) if "attention_mask" in batch else 0
                    tokens += attended
                    flops += self._flops(batch, attended)
                    samples += len(next(iter(batch.values())))
                if cfg.grad_clip > 0:
                    acc.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.step += 1
                bar.update(1)
                since += 1
                if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                    dt = time.perf_counter() - t0
                    # Over all processes: the mean loss, and the tokens / samples they processed together.
                    totals = acc.reduce(torch.tensor([loss_sum, tokens, samples, flops], dtype=torch.float64,
                                                     device=acc.device), reduction="sum").tolist()
                    row = self._row(totals[0] / acc.num_processes / since, totals[1] / dt, totals[2] / dt, dt / since,
                                    totals[3] / dt)
                    self.history.append(row)
                    acc.log({f"train/{k}": v for k, v in row.items() if k != "step"}, step=self.step)
                    extra = {"mfu": f"{row['mfu']:.1%}"} if "mfu" in row else {}
                    bar.set_postfix(loss=f"{row['loss']:.3f}", lr=f"{row['lr']:.1e}", tok_s=f"{row['tokens_per_s']:.0f}", **extra)
                    loss_sum, tokens, samples, flops, since, t0 = 0.0, 0, 0, 0.0, 0, time.perf_counter()
                if self.eval_fn is not None and cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.steps:
                    self._evaluate()
                    t0 = time.perf_counter()
                if cfg.save_every and self.step % cfg.save_every == 0 and self.step < cfg.steps:
                    self.save_checkpoint()
                    t0 = time.perf_counter()
        self.save_checkpoint()
        if self.eval_fn is not None:
            self._evaluate()
        acc.end_training()
        return self.history

    def _row(self, loss: float, tokens_per_s: float, samples_per_s: float, s_per_step: float,
             flops_per_s: float) -> dict[str, float]:
        """One log point (throughput over all processes); ``mfu`` per device, where its peak is known."""
        lrs = self.scheduler.get_last_lr()
        row = {"step": self.step, "loss": loss, "lr": lrs[0], "tokens_per_s": tokens_per_s,
               "samples_per_s": samples_per_s, "s_per_step": s_per_step}
        if self.cfg.lr_groups:
            for group, lr in zip(self.optimizer.param_groups, lrs, strict=True):
                row.setdefault(f"lr/{group['name'].split('/')[0]}", lr)
        util = mfu(flops_per_s / self.accelerator.num_processes, self.peak)
        if util is not None:
            row["mfu"] = util
        return row

    def _evaluate(self) -> None:
        self.model.eval()
        metrics = self.eval_fn(self.step) if self.eval_fn else {}
        self.model.train()
        self.history.append({"step": self.step, **{f"eval/{k}": v for k, v in metrics.items()}})
        self.accelerator.log({f"eval/{k}": v for k, v in metrics.items()}, step=self.step)

    def unwrapped(self) -> nn.Module:
        return self.accelerator.unwrap_model(self.model)
