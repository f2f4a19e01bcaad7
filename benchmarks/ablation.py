"""The fusion ablation of issues 3 and 4: every fusion recipe against ``tiny``, same data and step budget.

    python benchmarks/ablation.py train --out runs/ablation [--steps N] [--seed S] RECIPE ...   # train + test-split eval
    python benchmarks/ablation.py table --out runs/ablation                          # the table of every run there

``train`` runs ``mllm train RECIPE`` (its own config; ``--steps`` overrides ``train.steps`` for every
recipe alike, ``--seed`` sets ``train.seed``: the initialisation and the order of the training scenes,
while ``data.seed`` keeps the test split) into ``OUT/RECIPE``; two ``train`` commands with different recipes may run side by
side. ``table`` reads each finished run and prints one Markdown row per recipe: test VQA accuracy, the
difference from ``tiny`` in points, grounding Acc@0.5, mean train seconds per step, and the visual
tokens the LLM's sequence holds per decoder layer (mean over layers: 16 for a splice recipe, 0 for
cross-attention / FFN-embedding recipes that read the image outside the sequence, fewer with the DPN
pyramid, measured on 64 test samples). The last line is the JSON of the table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

from mllm import run
from mllm.config import load_config
from mllm.model import MLLM
from train.data.shapesworld import ShapesWorld

PROBE_SAMPLES = 64


def visual_tokens_per_layer(run_dir: Path) -> float:
    """Mean over decoder layers of the visual tokens in the LLM's sequence, on test samples."""
    model = MLLM.from_pretrained(run_dir / "model").eval()
    cfg = load_config(str(run_dir / "config.yaml"))
    pyramids = [i for i in model.injectors if hasattr(i, "tokens_per_layer")]
    if not pyramids:
        return float(model.num_image_tokens)
    test = ShapesWorld(cfg.data).split("test")
    batch = run.make_collator(model, cfg)([test[i] for i in range(PROBE_SAMPLES)])
    pyramids[0].reset_stats()
    with torch.no_grad():
        model(**{k: v for k, v in batch.items() if k != "labels"})
    per_layer = pyramids[0].tokens_per_layer()
    return sum(per_layer) / len(per_layer)


def row(run_dir: Path) -> dict[str, Any]:
    summary = json.loads((run_dir / "train_summary.json").read_text())
    steps = [h["s_per_step"] for h in summary["history"] if "s_per_step" in h]
    return {
        "recipe": run_dir.name, "steps": summary["history"][-1]["step"],
        "vqa": summary["eval"]["vqa_accuracy"], "grounding": summary["eval"]["grounding_accuracy"],
        "s_per_step": sum(steps) / len(steps), "visual_tokens_per_layer": visual_tokens_per_layer(run_dir),
    }


def table(out: Path) -> list[dict[str, Any]]:
    runs = sorted(p.parent for p in out.glob("*/train_summary.json"))
    rows = [row(p) for p in runs]
    if not rows:
        sys.exit(f"{out}: no finished run (train_summary.json) to tabulate")
    tiny = next((r["vqa"] for r in rows if r["recipe"] == "tiny"), None)
    print("| recipe | steps | VQA | vs tiny (pts) | grounding Acc@0.5 | s/step | visual tokens / layer |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        delta = "" if tiny is None else f"{100 * (r['vqa'] - tiny):+.1f}"
        print(f"| {r['recipe']} | {r['steps']} | {r['vqa']:.3f} | {delta} | {r['grounding']:.3f} | "
              f"{r['s_per_step']:.3f} | {r['visual_tokens_per_layer']:.1f} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["train", "table"])
    parser.add_argument("recipes", nargs="*")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=None, help="train.steps for every recipe (default: each recipe's own)")
    parser.add_argument("--seed", type=int, default=None, help="train.seed for every recipe (default: each recipe's own)")
    args = parser.parse_intermixed_args()
    if args.action == "train":
        overrides = [f"train.{key}={value}" for key, value in (("steps", args.steps), ("seed", args.seed)) if value is not None]
        for recipe in args.recipes:
            run.train(recipe, args.out / recipe, overrides)
        return
    print(json.dumps(table(args.out)))


if __name__ == "__main__":
    main()
