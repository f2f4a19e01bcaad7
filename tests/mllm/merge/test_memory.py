"""The engine's memory bound, as the growth of this process' peak RSS while it merges models whose one
tensor is large next to a row block (the peak is reset through /proc/self/clear_refs; Linux only)."""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from mllm.merge import run_merge
from mllm.merge.engine import release_memory
from mllm.merge.tensors import ShardWriter, TensorSpec

NAME = "model.layers.0.mlp.up_proj.weight"
ROWS, COLS = 8192, 4096  # 32 Mi elements: 64 MiB in bf16, 128 MiB in fp32, 128 row blocks
BF16_COPY, FP32_COPY = 2 * ROWS * COLS, 4 * ROWS * COLS
MIB = 1 << 20
SLACK = 32 * MIB  # block temporaries, heap kept for reuse, first-use imports: 12-16 MiB measured
CLEAR_REFS = Path("/proc/self/clear_refs")

pytestmark = pytest.mark.skipif(not CLEAR_REFS.exists(), reason="needs Linux's /proc/self/clear_refs")


def _status_bytes(key: str) -> int:
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(key + ":"))
    return int(line.split()[1]) * 1024


def peak_growth(run: Callable[[], object]) -> int:
    """Bytes by which ``run`` raised the RSS above where it started (freed heap returned first)."""
    gc.collect()
    release_memory()
    before = _status_bytes("VmRSS")
    CLEAR_REFS.write_text("5")  # the peak (VmHWM) restarts from the current RSS
    run()
    return _status_bytes("VmHWM") - before


def _rows(noise_seed: int | None) -> Iterator[torch.Tensor]:
    """The tensor in blocks of 1024 rows: a shared base (seed 0) plus noise of the given seed."""
    base_gen = torch.Generator().manual_seed(0)
    noise_gen = torch.Generator().manual_seed(noise_seed) if noise_seed is not None else None
    for _ in range(0, ROWS, 1024):
        block = torch.randn(1024, COLS, generator=base_gen) * 0.02
        if noise_gen is not None:
            block += 0.002 * torch.randn(1024, COLS, generator=noise_gen)
        yield block.to(torch.bfloat16)


@pytest.fixture(scope="module")
def big_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """base and two fine-tunes in bf16, one ROWS x COLS tensor each, written block by block."""
    root = tmp_path_factory.mktemp("big")
    paths = {}
    for key, seed in (("base", None), ("a", 1), ("b", 2)):
        paths[key] = root / key
        paths[key].mkdir()
        writer = ShardWriter(paths[key], [TensorSpec(NAME, (ROWS, COLS), torch.bfloat16)], 1 << 30)
        writer.write(NAME, _rows(seed))
        writer.close()
    return paths


def _merge(tmp_path: Path, ckpt, models: dict[str, Path], method: str, parameters: dict) -> Callable[[], object]:
    cfg = {"merge_method": method, "dtype": "bfloat16",
           "models": [{"model": str(models[k]), "parameters": parameters} for k in ("a", "b")]}
    if method != "linear":
        cfg["base_model"] = str(models["base"])
    path = ckpt.write_yaml(tmp_path / f"{method}.yaml", cfg)
    return lambda: run_merge(path, tmp_path / method)


def test_streaming_merge_holds_blocks_not_tensors(tmp_path: Path, ckpt, big_models) -> None:
    """linear reads, merges and writes row blocks: well under one bf16 copy of the tensor (16 MiB measured)."""
    grew = peak_growth(_merge(tmp_path, ckpt, big_models, "linear", {"weight": 0.5}))
    assert grew < BF16_COPY // 2, f"{grew / MIB:.1f} MiB"


def test_ties_trim_threshold_holds_one_fp32_copy_and_the_base(tmp_path: Path, ckpt, big_models) -> None:
    """TIES' whole-tensor threshold: the model's tensor is read straight into the one fp32 copy that
    the threshold is computed in, beside the base as stored -- no bf16 copy of the model's tensor
    (nor mapped file pages) on top: 202 MiB measured, where reading the tensor whole took 285 MiB."""
    grew = peak_growth(_merge(tmp_path, ckpt, big_models, "ties", {"weight": 0.5, "density": 0.5}))
    assert FP32_COPY < grew < FP32_COPY + BF16_COPY + SLACK, f"{grew / MIB:.1f} MiB"
