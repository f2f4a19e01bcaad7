"""Shared set-up of bench_dpn.py and bench_dehvf.py: one ~100M-parameter random Llama, the LLaVA-1.5
geometry (576 visual tokens on a 24 x 24 grid), FLOPs bookkeeping (prefill, per block: ``n (8 d^2 + 6 d d_ff) + 4 n^2 d``), and a timer."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

GRID = (24, 24)  # CLIP ViT-L/14 at 336 px
VISUAL = GRID[0] * GRID[1]
PREFIX, TEXT = 4, 40  # "<s> USER :" before the image, question + assistant header after it


@dataclass(frozen=True)
class LLMShape:
    hidden: int = 768
    ffn: int = 2560
    layers: int = 12
    heads: int = 12
    vocab: int = 1024

    def block_flops(self, n: int) -> float:
        """One decoder block on ``n`` tokens, a multiply-add = 2 FLOPs: ``n (8 d^2 + 6 d d_ff) + 4 n^2 d``."""
        d = self.hidden
        return n * (8 * d * d + 6 * d * self.ffn) + 4 * n * n * d

    def visual_flops(self, text: float, tokens_per_layer: list[float]) -> float:
        """What visual tokens add to the blocks' FLOPs beside ``text`` tokens: ``sum_l [F(text + n_l) - F(text)]``."""
        return sum(self.block_flops(text + n) - self.block_flops(text) for n in tokens_per_layer)


def bench_args(description: str, extra: Callable[[argparse.ArgumentParser], object] | None = None) -> argparse.Namespace:
    """The benchmarks' shared flags (--repeats, --batch, --threads; ``extra`` adds more), threads applied."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: steadier on a shared CPU)")
    if extra is not None:
        extra(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    return args


def build_llm(shape: LLMShape) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.ffn, num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads, num_key_value_heads=shape.heads, max_position_embeddings=1024,
        tie_word_embeddings=True, attn_implementation="sdpa", pad_token_id=0,
    )
    return LlamaForCausalLM(cfg).eval()


def timed(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Best-of-``repeats`` wall seconds of each function (after one warm-up each), runs interleaved:
    on a shared CPU, load from other processes only ever adds time, so the minimum is the least
    disturbed measurement, and interleaving spreads slow phases over every variant."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    with torch.inference_mode():
        for fn in fns.values():
            fn()
        for _ in range(repeats):
            for name, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    return {name: min(ts) for name, ts in times.items()}
