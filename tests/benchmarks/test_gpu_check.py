"""benchmarks/gpu_check.py, the GPU acceptance script, through its ``--cpu-smoke`` run (the same code at tiny
sizes on the CPU): one JSON line per figure with the fields a reader needs, figures consistent with each
other and with hand-counted parameters, identical batched and one-by-one predictions; the budget skips
what does not fit; a failing figure does not stop the others; without CUDA it says so in one line and exits 2."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import gpu_check  # benchmarks/ (tests/benchmarks/conftest.py)
import pytest

SCRIPT = Path(gpu_check.__file__)


def _lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines()]


def _qwen2_params(vocab: int, hidden: int, inter: int, layers: int, heads: int, kv_heads: int) -> int:
    """A Qwen2 LM with tied embeddings: q/k/v with biases, o without, SwiGLU MLP, two RMSNorms a layer + one."""
    kv = hidden // heads * kv_heads
    attention = (hidden * hidden + hidden) + 2 * (hidden * kv + kv) + hidden * hidden
    return vocab * hidden + layers * (attention + 3 * hidden * inter + 2 * hidden) + hidden


def test_cpu_smoke_prints_every_figure_with_consistent_values() -> None:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--cpu-smoke", "--budget-s", "3600"], capture_output=True,
                          text=True, env=env, cwd=SCRIPT.parents[1], timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = _lines(proc.stdout)  # stdout holds JSON lines only
    assert [line["figure"] for line in lines] == ["environment", "train", "train", "eval", "load"]
    assert all(line["card"] == "cpu" for line in lines)
    env_line, sdpa, flash, evaluation, load = lines
    assert env_line["sizes"] == "cpu-smoke" and env_line["budget_s"] == 3600

    sizes, arch = gpu_check.SMOKE, gpu_check.SMOKE.llm
    assert sdpa["attn_implementation"] == "sdpa" and "skipped" not in sdpa and "error" not in sdpa
    assert (sdpa["autocast"], sdpa["weights"]) == ("bfloat16", "float32")
    assert sdpa["params_llm"] == _qwen2_params(sizes.vocab, arch["hidden_size"], arch["intermediate_size"],
                                               arch["num_hidden_layers"], arch["num_attention_heads"],
                                               arch["num_key_value_heads"])
    assert sdpa["image_tokens"] == (32 // 16) ** 2  # 32 px, patch 16, one token per patch through the mlp
    tokens = sizes.batch * sizes.seq_len
    # every figure has 4 significant digits: a product or quotient of two is within 1e-3 of the exact one
    assert sdpa["tokens_per_s"] * sdpa["step_s"] == pytest.approx(tokens, rel=2e-3)
    flops = 6 * (sdpa["params_llm"] * tokens + sdpa["params_vision"] * sizes.batch * sdpa["image_tokens"])
    assert sdpa["tflops"] * 1e12 * sdpa["step_s"] == pytest.approx(flops, rel=2e-3)
    assert sdpa["mfu"] is None and sdpa["peak_memory_gib"] is None  # no peak FLOPs nor CUDA memory on a CPU
    # a random LM starts near the uniform distribution over its vocabulary, filled up to sizes.vocab words
    assert sdpa["first_loss"] == pytest.approx(math.log(sizes.vocab), abs=0.1)
    assert sdpa["steps"] == sizes.steps and sdpa["wall_s"] > 0
    assert flash == {"figure": "train", "card": "cpu", "attn_implementation": "flash_attention_2",
                     "skipped": "flash_attention_2 needs a CUDA device"}

    assert evaluation["identical"] is True and evaluation["mismatches"] == 0
    assert evaluation["samples"] == sizes.eval_samples and evaluation["batch_size"] == sizes.eval_batch
    assert evaluation["ratio"] == pytest.approx(
        evaluation["batched_samples_per_s"] / evaluation["one_by_one_samples_per_s"], rel=2e-3)

    # bench_load's smallest Llama: hidden 768, intermediate 2048, one layer, untied vocabulary of 32000
    hidden, inter, vocab = 768, 2048, 32000
    assert load["params"]["transformers"] == 2 * vocab * hidden + 4 * hidden**2 + 3 * hidden * inter + 3 * hidden
    assert load["params"]["ours"] > load["params"]["transformers"]  # the same LLM plus a tiny tower and projector
    assert load["dtype"] == "bfloat16" and len(load["walls"]["ours"]) == sizes.load_repeats
    assert load["ratio"] == pytest.approx(load["ours_s"] / load["transformers_s"], rel=2e-3)


def test_a_budget_with_no_room_skips_every_figure(capsys: pytest.CaptureFixture[str]) -> None:
    assert gpu_check.main(["--cpu-smoke", "--budget-s", "0"]) == 0
    lines = _lines(capsys.readouterr().out)
    assert [line["figure"] for line in lines] == ["environment", "train", "train", "eval", "load"]
    for line in (lines[1], lines[3], lines[4]):
        need = gpu_check.SMOKE.needs[line["figure"]]
        assert line["skipped"] == f"budget: 0 s of --budget-s 0 left, this figure needs about {need:g} s"
    assert lines[2]["skipped"] == "flash_attention_2 needs a CUDA device"


def test_a_failing_figure_prints_its_error_the_others_still_run_and_the_exit_status_is_1(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail(*args: Any) -> dict[str, Any]:
        raise RuntimeError("out of memory")

    monkeypatch.setattr(gpu_check, "train_figure", lambda *args: {"step_s": 1.0})
    monkeypatch.setattr(gpu_check, "eval_figure", fail)
    monkeypatch.setattr(gpu_check, "load_figure", lambda *args: {"ratio": 1.0})
    assert gpu_check.main(["--cpu-smoke"]) == 1
    lines = _lines(capsys.readouterr().out)
    assert [line["figure"] for line in lines] == ["environment", "train", "train", "eval", "load"]
    assert lines[1]["step_s"] == 1.0 and lines[4]["ratio"] == 1.0
    assert lines[3]["error"] == "RuntimeError: out of memory" and lines[3]["wall_s"] >= 0


def test_without_cuda_it_says_so_in_one_line_and_exits_2(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(gpu_check.torch.cuda, "is_available", lambda: False)
    assert gpu_check.main([]) == 2
    (line,) = _lines(capsys.readouterr().out)
    assert line["card"] is None and line["error"].startswith("no CUDA device")
