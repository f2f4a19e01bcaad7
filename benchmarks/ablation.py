"""The fusion and injection ablation: every recipe against ``tiny``, same data and step budget.

    python benchmarks/ablation.py train --out runs/ablation [--steps N] [--seed S] RECIPE ...   # train + test-split eval
    python benchmarks/ablation.py table --out runs/ablation [runs/ablation_s1 ...]   # the table of every run there

``train`` runs ``mllm train RECIPE`` (its own config; ``--steps`` overrides ``train.steps`` for every
recipe alike, ``--seed`` sets ``train.seed``: the initialisation and the order of the training scenes,
while ``data.seed`` keeps the test split) into ``OUT/RECIPE``; two ``train`` commands with different recipes may run
side by side. ``table`` reads each finished run and prints one Markdown row per recipe: test VQA accuracy, the
difference from ``tiny`` in points, grounding Acc@0.5, mean train seconds per step, and the visual
tokens the LLM's sequence holds per decoder layer (mean over layers: 16 for a splice recipe, 0 for
cross-attention / FFN-embedding recipes that read the image outside the sequence, fewer with the DPN
pyramid, measured on 64 test samples), and for a fused encoder each tower's share of the fusion's output
(:func:`tower_shares`: a tower behind a gate that never opened shows ~0). Given several folders (one per ``--seed``), it then prints each
recipe's mean over seeds and its mean difference from tiny on the same seeds (paired: a recipe run on fewer
seeds is not set against tiny's other seeds), with the per-type accuracies; relpos is also split by axis
(``relpos-x``: left / right, ``relpos-y``: above / below), because a run can learn one axis and not the other, and
count by what it counts (``count-all``: every object, ``count-colour``: one colour, ``count-shape``: one shape),
because telling each token's shape apart to count it is not the same skill as naming one object's shape. The
last line is the JSON of the tables.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from statistics import fmean
from typing import Any

import torch

from encoders.fused import FusedEncoder
from mllm import run
from mllm.config import RunConfig, load_config
from mllm.model import MLLM
from train.data.shapesworld import (
    COLOUR_NAMES,
    PLURALS,
    Q_COUNT_ALL,
    Q_COUNT_COLOUR,
    Q_COUNT_SHAPE,
    ShapesWorld,
)

PROBE_SAMPLES = 64
RELPOS_AXES = {"relpos-x": ("left", "right"), "relpos-y": ("above", "below")}  # by reference answer
COUNT_FILTERS = {Q_COUNT_ALL: "count-all"} | {Q_COUNT_COLOUR.format(colour=c): "count-colour" for c in COLOUR_NAMES} | {
    Q_COUNT_SHAPE.format(plural=p): "count-shape" for p in PLURALS.values()}  # by question
SUBTYPES = (*RELPOS_AXES, "count-all", "count-colour", "count-shape")  # column order


def visual_tokens_per_layer(model: MLLM, cfg: RunConfig) -> float:
    """Mean over decoder layers of the visual tokens in the LLM's sequence, on test samples."""
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


def tower_shares(model: MLLM, cfg: RunConfig) -> list[float] | None:
    """For a fused encoder, how much each tower moves the fusion's output on test samples (``None`` otherwise):
    ``||F(Z) - F(Z with tower t's tokens replaced by their mean over samples and positions)|| / ||F(Z)||``, a
    mean ablation; about 0 for a tower the fusion has shut out (e.g. behind a gate that stayed closed)."""
    encoder = model.encoder
    if not isinstance(encoder, FusedEncoder):
        return None
    test = ShapesWorld(cfg.data).split("test")
    pixels = torch.stack([encoder.preprocess(test[i]["image"]) for i in range(PROBE_SAMPLES)])
    shares = []
    with torch.no_grad():
        feats = encoder.tower_features(pixels)
        fused = encoder.fusion(feats)
        for t in range(len(feats)):
            ablated = [[x.mean(dim=(0, 1), keepdim=True).expand_as(x) for x in layers] if u == t else layers
                       for u, layers in enumerate(feats)]
            shares.append(float((fused - encoder.fusion(ablated)).norm() / fused.norm()))
    return shares


def subtype(item: dict[str, Any]) -> str | None:
    """A relpos item's axis (by its reference answer) or a count item's filter (by its question), else ``None``."""
    if item["type"] == "relpos":
        return next((a for a, answers in RELPOS_AXES.items() if item["reference"] in answers), None)
    if item["type"] == "count":
        # the prompt is the question and the <image> marker on separate lines, in the recipe's order
        return next((COUNT_FILTERS[line] for line in item["prompt"].splitlines() if line in COUNT_FILTERS), None)
    return None


def subtype_scores(run_dir: Path) -> dict[str, float]:
    """Accuracy per :func:`subtype`, from the run's test predictions (``eval/predictions.jsonl``)."""
    scores: dict[str, list[float]] = {name: [] for name in SUBTYPES}
    with (run_dir / "eval" / "predictions.jsonl").open() as lines:
        for line in lines:
            item = json.loads(line)
            if (name := subtype(item)) is not None:
                scores[name].append(float(item["score"]))
    return {name: fmean(s) for name, s in scores.items() if s}


def row(run_dir: Path) -> dict[str, Any]:
    summary = json.loads((run_dir / "train_summary.json").read_text())
    steps = [h["s_per_step"] for h in summary["history"] if "s_per_step" in h]
    per_type = {k: v for k, v in summary["eval"]["per_type"].items() if k != "grounding"} | subtype_scores(run_dir)
    model = MLLM.from_pretrained(run_dir / "model").eval()  # loaded once for both probes below
    cfg = load_config(str(run_dir / "config.yaml"))
    return {
        "recipe": run_dir.name, "seed": cfg.train.seed,
        "steps": summary["history"][-1]["step"], "vqa": summary["eval"]["vqa_accuracy"],
        "grounding": summary["eval"]["grounding_accuracy"], "per_type": per_type,
        "s_per_step": sum(steps) / len(steps), "visual_tokens_per_layer": visual_tokens_per_layer(model, cfg),
        "tower_shares": tower_shares(model, cfg),
    }


def _points(delta: float | None) -> str:
    return "" if delta is None else f"{100 * delta:+.1f}"


def seed_means(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per recipe: VQA, Acc@0.5 and per-type accuracy averaged over its seeds, and ``vs_tiny``, the
    mean of its runs' differences from tiny of the same seed (``None`` where no seed has a tiny run)."""
    by_recipe: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_recipe.setdefault(r["recipe"], []).append(r)
    return [
        {"recipe": name, "seeds": sorted(r["seed"] for r in runs), "vqa": fmean(r["vqa"] for r in runs),
         "grounding": fmean(r["grounding"] for r in runs),
         "vs_tiny": fmean(deltas) if (deltas := [r["vs_tiny"] for r in runs if r["vs_tiny"] is not None]) else None,
         "per_type": {t: fmean(r["per_type"][t] for r in runs) for t in runs[0]["per_type"]}}
        for name, runs in by_recipe.items()
    ]


def table(outs: list[Path]) -> dict[str, list[dict[str, Any]]]:
    """Every finished run under ``outs`` (one folder per seed), each against ``tiny`` of its own folder;
    with several folders, then each recipe's mean over seeds and its mean difference from tiny (same seeds)."""
    rows: list[dict[str, Any]] = []
    print("| recipe | seed | steps | VQA | vs tiny (pts) | grounding Acc@0.5 | s/step | visual tokens / layer | tower shares |")
    print("|---|---|---|---|---|---|---|---|---|")
    for out in outs:
        found = [row(p.parent) for p in sorted(out.glob("*/train_summary.json"))]
        if not found:
            sys.exit(f"{out}: no finished run (train_summary.json) to tabulate")
        tiny = next((r["vqa"] for r in found if r["recipe"] == "tiny"), None)
        for r in found:
            r["vs_tiny"] = None if tiny is None else r["vqa"] - tiny
            print(f"| {r['recipe']} | {r['seed']} | {r['steps']} | {r['vqa']:.3f} | {_points(r['vs_tiny'])} | "
                  f"{r['grounding']:.3f} | {r['s_per_step']:.3f} | {r['visual_tokens_per_layer']:.1f} | "
                  f"{' / '.join(f'{x:.3f}' for x in r['tower_shares'] or [])} |")
        rows += found
    means = seed_means(rows)
    if len(outs) > 1:
        types = list(means[0]["per_type"])
        print(f"\n| recipe | seeds | mean VQA | vs tiny, same seeds (pts) | mean Acc@0.5 | {' / '.join(types)} |")
        print("|---|---|---|---|---|---|")
        for m in means:
            per_type = " / ".join(f"{m['per_type'][t]:.2f}" for t in types)
            print(f"| {m['recipe']} | {', '.join(map(str, m['seeds']))} | {m['vqa']:.3f} | {_points(m['vs_tiny'])} | "
                  f"{m['grounding']:.3f} | {per_type} |")
    return {"runs": rows, "seed_means": means}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["train", "table"])
    parser.add_argument("recipes", nargs="*")
    parser.add_argument("--out", type=Path, nargs="+", required=True, help="train: one folder; table: one per seed")
    parser.add_argument("--steps", type=int, default=None, help="train.steps for every recipe (default: each recipe's own)")
    parser.add_argument("--seed", type=int, default=None, help="train.seed for every recipe (default: each recipe's own)")
    args = parser.parse_intermixed_args()
    if args.action == "train":
        if len(args.out) != 1:
            parser.error("train: one --out folder")
        overrides = [f"train.{key}={value}" for key, value in (("steps", args.steps), ("seed", args.seed)) if value is not None]
        for recipe in args.recipes:
            run.train(recipe, args.out[0] / recipe, overrides)
        return
    print(json.dumps(table(args.out)))


if __name__ == "__main__":
    main()
