"""Our training step vs transformers' ``LlavaForConditionalGeneration``, same model, same batch (issue 5).

    python benchmarks/bench_train_step.py [--repeats 20] [--batch 16] [--threads 1]

One random model shaped like the ``tiny`` recipe, with a transformers tower so that Llava can hold
it: a CLIP vision tower (``hf_vision``, 64 px, patch 16 -> 16 patches, 4 blocks, d = 128, layer -2,
CLS dropped), the LLaVA ``mlp`` projector and a 4-layer Llama (d = 128, tied embeddings, sdpa).
It is saved, exported with :func:`mllm.hf.export_llava` and loaded back with plain
``LlavaForConditionalGeneration.from_pretrained``, so both sides start from the same weights and the
config Llava itself reads. The batch is ShapesWorld training samples (4 turns each) collated once
by our ``Collator``; Llava gets the same ``input_ids`` / ``attention_mask`` / ``pixel_values`` / ``labels``.

A step = forward with labels (shifted cross-entropy) + backward + AdamW step, training the projector
and the LLM with the tower frozen (LLaVA stage 2) on both sides. Steps alternate between the two
(ours, Llava, ours, ...) after warm-up, so load from other processes on a shared CPU hits both;
reported times are medians. The first step's losses are printed to show that both compute the same
thing. Last line: JSON with ``ratio`` = our step time / Llava's (goal <= 1.05). Not part of the tests.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import LlavaForConditionalGeneration

from mllm.config import ModelConfig, from_dict
from mllm.hf import export_llava
from mllm.model import MLLM
from train.data.collate import Collator
from train.data.shapesworld import ShapesWorld, ShapesWorldConfig
from train.data.tokenizer import build_tokenizer
from train.templates import get_template

MODEL = {
    "encoder": {"name": "hf_vision", "model_type": "clip_vision_model", "layers": [-2], "drop_prefix": True,
                "arch": {"hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 4,
                         "num_attention_heads": 4, "image_size": 64, "patch_size": 16},
                "processor": {"image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": 64},
                              "crop_size": {"height": 64, "width": 64}}},
    "projector": {"name": "mlp"},
    "llm": {"model_type": "llama", "attn_implementation": "sdpa",
            "arch": {"hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 4, "num_attention_heads": 4,
                     "num_key_value_heads": 4, "max_position_embeddings": 256, "tie_word_embeddings": True}},
    "template": "plain",
}


def build(folder: Path) -> tuple[MLLM, LlavaForConditionalGeneration]:
    """Our model and the same weights as a transformers Llava (exported, then loaded back)."""
    world = ShapesWorld(ShapesWorldConfig(train_images=1000))
    tokenizer = build_tokenizer(world.vocabulary_texts() + get_template("plain").vocabulary_texts())
    torch.manual_seed(0)
    model = MLLM(from_dict(ModelConfig, MODEL, "bench"), tokenizer)
    model.save_pretrained(folder / "ours")
    export_llava(folder / "ours", folder / "llava")
    llava = LlavaForConditionalGeneration.from_pretrained(folder / "llava", local_files_only=True,
                                                          attn_implementation="sdpa")
    return MLLM.from_pretrained(folder / "ours"), llava


def train_step(opt: torch.optim.Optimizer, forward: Callable[[], Any]) -> float:
    opt.zero_grad(set_to_none=True)
    loss = forward().loss
    loss.backward()
    opt.step()
    return float(loss.detach())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: steadier on a shared CPU)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        ours, llava = build(Path(tmp))
    world = ShapesWorld(ShapesWorldConfig(train_images=1000))
    samples = [world.split("train")[i] for i in range(args.batch)]
    collate = Collator(ours.tokenizer, ours.template, ours.cfg.image_token, ours.num_image_tokens, ours.preprocess,
                       ours.cfg.max_length)
    batch = collate(samples)

    ours.train()
    ours.set_trainable(["projector", "llm"])
    llava.train()
    llava.model.vision_tower.requires_grad_(False)
    opts = {
        name: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)
        for name, m in (("ours", ours), ("llava", llava))
    }
    steps: dict[str, Callable[[], float]] = {
        "ours": lambda: train_step(opts["ours"], lambda: ours(**batch)),
        "llava": lambda: train_step(opts["llava"], lambda: llava(**batch)),
    }
    first = {name: step() for name, step in steps.items()}
    for _ in range(args.warmup - 1):
        for step in steps.values():
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    losses: dict[str, float] = {}
    for _ in range(args.repeats):
        for name, step in steps.items():
            t0 = time.perf_counter()
            losses[name] = step()
            times[name].append(time.perf_counter() - t0)
    median = {name: statistics.median(ts) for name, ts in times.items()}
    trainable = sum(p.numel() for p in ours.parameters() if p.requires_grad)
    total = sum(p.numel() for p in ours.parameters())
    tokens = int(batch["attention_mask"].sum())
    print(f"model: {total / 1e6:.2f}M params ({trainable / 1e6:.2f}M trained); batch {args.batch} x "
          f"{batch['input_ids'].shape[1]} tokens ({tokens} real, {ours.num_image_tokens} image tokens per row); "
          f"torch threads {torch.get_num_threads()}")
    print(f"first-step loss: ours {first['ours']:.6f}, llava {first['llava']:.6f}; after {args.warmup + args.repeats} "
          f"steps: ours {losses['ours']:.6f}, llava {losses['llava']:.6f}")
    for name, ts in times.items():
        print(f"{name:<6} median {median[name] * 1e3:8.2f} ms  min {min(ts) * 1e3:8.2f} ms  max {max(ts) * 1e3:8.2f} ms")
    print(json.dumps({
        "ratio": round(median["ours"] / median["llava"], 4), "ours_s": round(median["ours"], 5),
        "llava_s": round(median["llava"], 5), "repeats": args.repeats, "batch": args.batch, "tokens": tokens,
        "first_loss": {k: round(v, 6) for k, v in first.items()}, "threads": torch.get_num_threads(),
    }))


if __name__ == "__main__":
    main()
