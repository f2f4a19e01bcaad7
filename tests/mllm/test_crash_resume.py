"""Crash safety end to end: ``mllm train`` SIGKILLed at a random moment after its first checkpoint,
resumed with ``--resume auto``, logs exactly the per-step losses of an uninterrupted run.

The run trains LoRA adapters with dropout (stage ``instruct``), so the losses after the resume only
match if model, optimizer, scheduler, data position *and* the RNG streams were all restored.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mllm import cli, run

STEPS, SAVE_EVERY, KEEP = 100, 5, 2
TINY = [
    "model.encoder.image_size=32", "model.encoder.embed_dim=32", "model.encoder.depth=1", "model.encoder.num_heads=2",
    "model.llm.arch.hidden_size=32", "model.llm.arch.intermediate_size=64", "model.llm.arch.num_hidden_layers=1",
    "model.llm.arch.num_attention_heads=2", "model.llm.arch.num_key_value_heads=2", "model.max_length=96",
    "data.image_size=32", "data.grid=2", "data.max_objects=3", "data.train_images=24", "data.val_images=1",
    "data.test_images=1", "data.questions_per_image=2",
    f"train.steps={STEPS}", "train.batch_size=4", "train.micro_batch_size=2", "train.warmup_steps=2",
    "train.log_every=1", f"train.save_every={SAVE_EVERY}", f"train.keep_last={KEEP}",
    "train.stage=instruct", "train.lora.r=4", "train.lora.dropout=0.2",
]
FLAGS = [arg for item in TINY for arg in ("--set", item)]
REPO = Path(__file__).resolve().parents[2]


def _losses(run_dir: Path) -> dict[int, float]:
    history = json.loads((run_dir / "train_summary.json").read_text())["history"]
    return {h["step"]: h["loss"] for h in history if "loss" in h}


def _complete(run_dir: Path) -> list[str]:
    root = run_dir / "checkpoints"
    return sorted(p.name for p in root.glob("step-*") if (p / "trainer_state.json").is_file()) if root.is_dir() else []


def test_sigkill_then_resume_auto_matches_the_uninterrupted_run(tmp_path: Path) -> None:
    run.train("tiny", tmp_path / "ref", TINY, evaluate=False)
    reference = _losses(tmp_path / "ref")
    assert sorted(reference) == list(range(1, STEPS + 1))

    killed = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}  # same float reductions as here
    with open(tmp_path / "child.log", "wb") as child_log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mllm.cli", "train", "tiny", "--out", str(killed), "--no-eval", *FLAGS],
            cwd=REPO, env=env, stdout=child_log, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 180
        while not _complete(killed):
            assert proc.poll() is None, (tmp_path / "child.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint within 180 s"
            time.sleep(0.01)
        delay = random.uniform(0.0, 0.4)
        time.sleep(delay)
        assert proc.poll() is None, f"the run finished before the kill ({delay:.3f} s after its first checkpoint)"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    survivors = _complete(killed)
    assert survivors, "the kill left no complete checkpoint"
    assert len(survivors) <= KEEP
    # A checkpoint torn mid-write (as a kill during save leaves it) must be ignored, then removed.
    torn = killed / "checkpoints" / f".tmp-step-{STEPS + 1:07d}"
    torn.mkdir(parents=True, exist_ok=True)
    (torn / "model.safetensors").write_bytes(b"half a file")

    assert cli.main(["train", "tiny", "--out", str(killed), "--no-eval", "--resume", "auto", *FLAGS]) == 0
    resumed = _losses(killed)
    assert sorted(resumed) == sorted(reference)
    resumed_from = int(survivors[-1].split("-")[1])
    for step in reference:
        assert resumed[step] == pytest.approx(reference[step], rel=1e-6, abs=0), (
            f"step {step} (resumed from {resumed_from}, killed {delay:.3f} s after the first checkpoint)"
        )
    leftovers = sorted(p.name for p in (killed / "checkpoints").iterdir())
    assert leftovers == [f"step-{s:07d}" for s in range(STEPS - SAVE_EVERY * (KEEP - 1), STEPS + 1, SAVE_EVERY)]
