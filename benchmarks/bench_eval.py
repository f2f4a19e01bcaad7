"""Batched eval runner vs a per-sample generate loop, same tiny model and ShapesWorld items, one run; then a
multi-task run: one model load, three tasks through :func:`eval.suite.run_tasks`, at batch 1 and at ``--batch-size``.

Prints per-sample and batched throughput, each suite task's samples/s in ``generate`` at both batch sizes and
whether its predictions are the same at both, and, as its last line, a JSON object with ``"ratio"`` = batched
samples/s / per-sample samples/s (goal >= 8), ``"identical"``: whether the two paths produced the same
prediction for every sample, and ``"suite"``: per task ``{"n", "samples_per_s": {batch: rate}, "identical"}``.

    .venv/bin/python benchmarks/bench_eval.py [--samples 96] [--batch-size 16] [--checkpoint RUN/model]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from eval.runner import EvalConfig, Generator, read_records, run_task
from eval.suite import run_tasks
from eval.tasks.shapesworld import ShapesWorldTask
from mllm import run
from mllm.config import RunConfig, load_config, to_dict
from mllm.evaluation import build_eval_task
from mllm.model import MLLM

SUITE = ("shapesworld", "arithmetic", "compositional")  # generated tasks: no benchmark files needed


class Timed:
    """The model, with the samples and seconds of each ``generate`` call recorded in order."""

    def __init__(self, model: Generator) -> None:
        self.model = model
        self.calls: list[tuple[int, float]] = []

    def generate(self, images: list[Image.Image], prompts: list[str], **kw: Any) -> list[str]:
        t0 = time.perf_counter()
        out = self.model.generate(images, prompts, **kw)
        self.calls.append((len(prompts), time.perf_counter() - t0))
        return out


def suite_runs(model: Generator, cfg: RunConfig, batch_sizes: tuple[int, ...], samples: int,
               max_new_tokens: int) -> dict[str, dict[str, Any]]:
    """Each :data:`SUITE` task (its first ``samples``) through one ``run_tasks`` call per batch size, the model
    loaded once: per task ``{"n", "samples_per_s": {batch: rate}, "identical"}``. A task's time is that of
    its ``generate`` calls: the suite runs the tasks in order and no batch mixes two, so the calls split by
    each task's sample count."""
    tasks = {name: build_eval_task(name, None, None, {}, lambda: to_dict(cfg.data)) for name in SUITE}
    rates: dict[str, dict[str, float]] = {name: {} for name in SUITE}
    predictions: dict[int, dict[str, dict[str, str]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for batch in batch_sizes:
            timed = Timed(model)
            runner = EvalConfig(batch_size=batch, max_new_tokens=max_new_tokens, limit=samples)
            with contextlib.redirect_stdout(io.StringIO()):  # the suite's tables: this script prints its own
                metrics = run_tasks(timed, {name: (task, runner) for name, task in tasks.items()},
                                    Path(tmp) / str(batch), progress=False)
            calls = iter(timed.calls)
            for name in SUITE:
                done, seconds = 0, 0.0
                while done < metrics[name]["n"]:
                    n, dt = next(calls)
                    done, seconds = done + n, seconds + dt
                rates[name][str(batch)] = round(done / seconds, 1)
            predictions[batch] = {name: {r["id"]: r["prediction"] for r in read_records(Path(tmp) / str(batch) / name
                                                                                         / "predictions.jsonl")}
                                  for name in SUITE}
    first = predictions[batch_sizes[0]]
    return {name: {"n": len(first[name]), "samples_per_s": rates[name],
                   "identical": all(predictions[b][name] == first[name] for b in batch_sizes)} for name in SUITE}


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

    suite = suite_runs(model, cfg, (1, args.batch_size), args.samples, args.max_new_tokens)
    print(f"suite, one load, {len(SUITE)} tasks (samples/s in generate at batch 1 / batch {args.batch_size}):")
    for name, row in suite.items():
        rate = row["samples_per_s"]
        print(f"  {name:14s} n {row['n']:3d}: {rate['1']:8.1f} / {rate[str(args.batch_size)]:8.1f}, "
              f"predictions identical: {row['identical']}")
    print(json.dumps({"ratio": round(t_single / t_batched, 2), "identical": identical, "samples": n,
                      "batch_size": args.batch_size, "threads": torch.get_num_threads(), "suite": suite}))


if __name__ == "__main__":
    main()
