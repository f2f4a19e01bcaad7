"""Batched eval runner vs a per-sample generate loop, same tiny model and ShapesWorld items, one run.

Prints per-sample and batched throughput and, as its last line, a JSON object with
``"ratio"`` = batched samples/s / per-sample samples/s (goal >= 8) and ``"identical"``: whether the
two paths produced the same prediction for every sample.

    .venv/bin/python benchmarks/bench_eval.py [--samples 96] [--batch-size 16] [--checkpoint RUN/model]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from eval.runner import EvalConfig, read_records, run_task
from eval.tasks.shapesworld import ShapesWorldTask
from mllm import run
from mllm.config import load_config
from mllm.model import MLLM


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--checkpoint", default=None, help="a trained RUN/model (default: random tiny model)")
    args = parser.parse_args()

    cfg = load_config("tiny")
    torch.manual_seed(0)
    model = MLLM.from_pretrained(args.checkpoint) if args.checkpoint else run.build_model(cfg, run.build_tokenizer_for(cfg))
    model.eval()
    task = ShapesWorldTask(cfg.data, split="test")
    samples = [s for _, s in zip(range(args.samples), task.samples(), strict=False)]
    kwargs = {"max_new_tokens": args.max_new_tokens}

    model.generate([samples[0].load_image()], [task.build_prompt(samples[0])], **kwargs)  # warm-up
    t0 = time.perf_counter()
    single = [model.generate([s.load_image()], [task.build_prompt(s)], **kwargs)[0] for s in samples]
    t_single = time.perf_counter() - t0

    eval_cfg = EvalConfig(batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, limit=args.samples)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        run_task(model, task, eval_cfg, Path(tmp), progress=False)
        t_batched = time.perf_counter() - t0
        batched = {r["id"]: r["prediction"] for r in read_records(Path(tmp) / "predictions.jsonl")}

    identical = all(batched[s.id] == text for s, text in zip(samples, single, strict=True))
    n = len(samples)
    print(f"per-sample loop: {n / t_single:8.1f} samples/s ({t_single:.2f} s)")
    print(f"batched runner : {n / t_batched:8.1f} samples/s ({t_batched:.2f} s, batch {args.batch_size})")
    print(json.dumps({"ratio": round(t_single / t_batched, 2), "identical": identical, "samples": n,
                      "batch_size": args.batch_size, "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
