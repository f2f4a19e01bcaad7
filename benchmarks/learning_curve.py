"""How fast a recipe learns ShapesWorld: teacher-forced accuracy per question type against steps and seconds.

    python benchmarks/learning_curve.py STEPS [--every 100] [--recipe tiny] [KEY=VALUE ...]   # recipe overrides

A quick probe for tuning the ``make demo`` default (issue 2), cheaper than full runs with periodic
generation: the recipe trains with the trainer's own optimizer (``build_optimizer``: AdamW groups,
warmup + cosine over ``STEPS``) and clipping on the train split, and every ``--every`` steps it scores
a fixed set of 1536 one-question conversations drawn from scenes no training sample uses
(seed + 999). A sample counts as right when every answer token but the closing EOS is the argmax of
the teacher-forced logits — for a box, all four coordinate tokens exactly; ``grounding@0.5`` scores the teacher-forced
box tokens by IoU >= 0.5 instead, as Acc@0.5 does.
One JSON line per point:
``{"step", "seconds", "loss" (the last training batch), "val_loss" (held-out), "accuracy": {type: float}}``. Not part of the tests.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from collections import defaultdict
from typing import Any

import torch

from eval.metrics import grounding_hit, parse_box
from mllm import run
from mllm.config import load_config
from train.data.shapesworld import ShapesWorld
from train.templates import IGNORE_INDEX
from train.trainer import build_optimizer

VAL_SAMPLES, VAL_BATCH = 1536, 256  # about 180 items per VQA type: a 3-point standard error


def _score(model: Any, batches: list[dict[str, torch.Tensor]], samples: list[dict[str, Any]]) -> tuple[float, dict[str, float]]:
    """The held-out loss (mean over batches) and the per-type accuracy of the teacher-forced argmax."""
    model.eval()
    hits: dict[str, list[bool]] = defaultdict(list)
    losses, start = [], 0
    for batch in batches:
        with torch.no_grad():
            out = model(**batch)
        losses.append(out.loss.item())
        predicted = out.logits.argmax(-1)
        chunk, start = samples[start : start + len(batch["labels"])], start + len(batch["labels"])
        for row, sample in enumerate(chunk):
            item = sample["items"][0]
            positions = (batch["labels"][row] != IGNORE_INDEX).nonzero().flatten()[:-1]  # all but EOS
            guess = predicted[row, positions - 1]
            hits[item["type"]].append(bool((guess == batch["labels"][row, positions]).all()))
            if item["box"] is not None:
                text = model.tokenizer.decode(guess, skip_special_tokens=True)
                hits["grounding@0.5"].append(bool(grounding_hit(parse_box(text), item["box"])))
    model.train()
    return round(sum(losses) / len(losses), 4), {kind: round(sum(v) / len(v), 3) for kind, v in sorted(hits.items())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("steps", type=int)
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--recipe", default="tiny", help="recipe name or YAML path (default: tiny)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides of the recipe")
    args = parser.parse_intermixed_args()  # overrides may come before or after --every
    cfg = load_config(args.recipe, args.overrides)
    train_cfg = dataclasses.replace(cfg.train, steps=args.steps)
    torch.manual_seed(train_cfg.seed)
    tokenizer = run.build_tokenizer_for(cfg)
    model = run.build_model(cfg, tokenizer)
    collate = run.make_collator(model, cfg)
    train = ShapesWorld(cfg.data).split("train")
    held_out = ShapesWorld(dataclasses.replace(cfg.data, seed=cfg.data.seed + 999, questions_per_image=1)).split("train")
    val = [held_out[i] for i in range(VAL_SAMPLES)]
    val_batches = [collate(val[i : i + VAL_BATCH]) for i in range(0, VAL_SAMPLES, VAL_BATCH)]
    optimizer, schedule = build_optimizer(model, train_cfg)
    size, t0 = train_cfg.batch_size, time.perf_counter()
    for step in range(1, args.steps + 1):
        loss = model(**collate([train[(step - 1) * size + j] for j in range(size)])).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), train_cfg.grad_clip)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % args.every == 0 or step == args.steps:
            val_loss, accuracy = _score(model, val_batches, val)
            print(json.dumps({"step": step, "seconds": round(time.perf_counter() - t0, 1), "loss": round(loss.item(), 4),
                              "val_loss": val_loss, "accuracy": accuracy}), flush=True)


if __name__ == "__main__":
    main()
