"""The fusion and injection ablation: every recipe against ``tiny``, same data and step budget.

    python benchmarks/ablation.py all --out runs/ablation --seeds 0 1 2 [--steps N] [--results FILE] [RECIPE ...]
    python benchmarks/ablation.py train --out runs/ablation [--steps N] [--seed S] RECIPE ...   # train + test-split eval
    python benchmarks/ablation.py table --out runs/ablation [runs/ablation_s1 ...]   # the table of every run there

``all`` is the whole ablation from scratch in one command: it trains ``tiny`` and every recipe named (by default
:data:`RECIPES`: the four encoder-side fusions, the three LLM-side injections and the two pooling projectors) for
every seed into ``OUT/seed_S/RECIPE``, skipping the runs that finished (``train_summary.json``) and resuming a
started one from its newest checkpoint (``all`` checkpoints every :data:`SAVE_EVERY` steps unless ``--set
train.save_every=...`` says otherwise), so a killed command picks up where it stopped; a run folder trained with
another config than the one asked for (another ``--steps``, a recipe changed since) is refused before anything
trains -- keys that only say how a run logs and checkpoints (:data:`BOOKKEEPING`) are not compared. It then
writes both tables below, the command line that made them and the date to ``--results`` (default
``benchmarks/results/ablation.md``; a temp file renamed into place, so a failure leaves the old file as it was)
and prints them. Recipes go before ``--seeds``, which takes every number after it.

``train`` runs ``mllm train RECIPE`` (its own config; ``--steps`` overrides ``train.steps`` for every recipe alike,
``--seed`` sets ``train.seed``: the initialisation and the order of the training scenes, while ``data.seed`` keeps
the test split) into ``OUT/RECIPE``; two ``train`` commands with different recipes may run side by side.
``--set KEY=VALUE`` (repeatable) overrides any other config key for every run of ``train`` or ``all``, as
``mllm train --set`` does. ``table`` reads each finished run and prints one Markdown row per recipe: test VQA
accuracy, the difference from ``tiny`` in points, grounding Acc@0.5, mean train seconds per step, and the visual tokens the LLM's
sequence holds per decoder layer (mean over layers: 16 for a splice recipe with tiny's projector, 4 with the
pool-adapter, 21 with the pyramid projector, 0 for cross-attention / FFN-embedding recipes that read the image
outside the sequence, fewer with the DPN pyramid, measured on 64 test samples), and for a fused encoder each tower's
share of the fusion's output (:func:`tower_shares`: a tower behind a gate that never opened shows ~0). Given several
folders (one per ``--seed``), it then prints each recipe's mean over seeds with the sample standard deviation of VQA
and Acc@0.5 (mean ± sd), its mean difference from tiny on the same seeds (paired: a recipe run on fewer seeds is not
set against tiny's other seeds), its mean s/step and visual tokens per layer, and the per-type accuracies; relpos is
also split by axis (``relpos-x``: left / right, ``relpos-y``: above / below), because a run can learn one axis and
not the other, and count by what it counts (``count-all``: every object, ``count-colour``: one colour,
``count-shape``: one shape), because telling each token's shape apart to count it is not the same skill as naming
one object's shape. ``table``'s last line is the JSON of the tables.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from statistics import fmean, stdev
from typing import Any

import torch

from common.atomic import atomic_write
from common.errors import UserError
from encoders.fused import FusedEncoder
from mllm import run
from mllm.config import RunConfig, load_config
from mllm.model import MLLM
from mllm.schema import to_dict
from train.data.shapesworld import (
    COLOUR_NAMES,
    PLURALS,
    Q_COUNT_ALL,
    Q_COUNT_COLOUR,
    Q_COUNT_SHAPE,
    ShapesWorld,
)

REFERENCE = "tiny"  # every run is set against it: `all` always trains it
RECIPES = (REFERENCE, "comm", "convgate", "dbfusion", "ftz",  # encoder-side fusions
           "xattn", "dpn", "dehvf",  # LLM-side injections
           "pool_adapter", "pyramid_projector")  # pooling projectors
RESULTS = Path(__file__).resolve().parent / "results" / "ablation.md"
SAVE_EVERY = 500  # all: the grid outlasts a session on a 2-core machine, so its runs checkpoint along the way
BOOKKEEPING = ("train.save_every", "train.keep_last", "train.log_every", "train.log_with")  # no effect on the weights
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
    model, cfg = run.load_run(run_dir)  # loaded once for both probes below
    return {
        "recipe": run_dir.name, "seed": cfg.train.seed,
        "steps": summary["history"][-1]["step"], "vqa": summary["eval"]["vqa_accuracy"],
        "grounding": summary["eval"]["grounding_accuracy"], "per_type": per_type,
        "s_per_step": sum(steps) / len(steps), "visual_tokens_per_layer": visual_tokens_per_layer(model, cfg),
        "tower_shares": tower_shares(model, cfg),
    }


class AblationError(UserError):
    """A run folder the ablation cannot use; the message names it and what was expected."""


def _differences(old: Any, new: Any, key: str = "") -> list[str]:
    """``key: OLD there, NEW now`` for every dotted key whose value differs between two config mappings, the
    :data:`BOOKKEEPING` keys left out."""
    if key.lstrip(".") in BOOKKEEPING:
        return []
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for k in sorted(old.keys() | new.keys()) for d in _differences(old.get(k), new.get(k), f"{key}.{k}")]
    return [] if old == new else [f"{key.lstrip('.')}: {old!r} there, {new!r} now"]


def train_missing(out: Path, seeds: Sequence[int], recipes: Sequence[str], overrides: Sequence[str]) -> list[Path]:
    """Train every recipe for every seed into ``out/seed_S/RECIPE`` unless it finished (``train_summary.json``);
    a started run resumes from its newest checkpoint, its evaluation (``eval/``, cut short) redone. Every config is
    loaded (and so validated) and checked against a started run's ``config.yaml`` before the first step trains.
    Returns the folders trained."""
    plan = [(out / f"seed_{seed}" / recipe, recipe, [*overrides, f"train.seed={seed}"])
            for seed in seeds for recipe in recipes]
    for run_dir, recipe, wanted in plan:
        if (run_dir / "config.yaml").is_file():
            saved = to_dict(load_config(str(run_dir / "config.yaml")))
            if diff := _differences(saved, to_dict(load_config(recipe, wanted))):
                raise AblationError(f"{run_dir}: trained with another config ({'; '.join(diff[:3])}); "
                                    "remove the folder or choose another --out")
        else:
            load_config(recipe, wanted)
    todo = [(d, r, w) for d, r, w in plan if not (d / "train_summary.json").is_file()]
    for run_dir, recipe, wanted in todo:
        shutil.rmtree(run_dir / "eval", ignore_errors=True)  # the evaluation refuses to write over predictions
        run.train(recipe, run_dir, wanted, resume="auto")
    return [d for d, _, _ in todo]


def _points(delta: float | None) -> str:
    return "" if delta is None else f"{100 * delta:+.1f}"


def _spread(mean: float, sd: float | None) -> str:
    return f"{mean:.3f}" if sd is None else f"{mean:.3f} ± {sd:.3f}"


def seed_means(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per recipe: VQA, Acc@0.5, s/step, visual tokens per layer and per-type accuracy averaged over its
    seeds; ``vqa_sd`` and ``grounding_sd``, the sample standard deviations over seeds (``None`` for one seed); and
    ``vs_tiny``, the mean of its runs' differences from tiny of the same seed (``None`` where no seed has a tiny run)."""
    by_recipe: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_recipe.setdefault(r["recipe"], []).append(r)
    means = []
    for name, runs in by_recipe.items():
        vqa, grounding = [r["vqa"] for r in runs], [r["grounding"] for r in runs]
        deltas = [r["vs_tiny"] for r in runs if r["vs_tiny"] is not None]
        means.append({
            "recipe": name, "seeds": sorted(r["seed"] for r in runs),
            "vqa": fmean(vqa), "vqa_sd": stdev(vqa) if len(runs) > 1 else None,
            "grounding": fmean(grounding), "grounding_sd": stdev(grounding) if len(runs) > 1 else None,
            "vs_tiny": fmean(deltas) if deltas else None,
            "s_per_step": fmean(r["s_per_step"] for r in runs),
            "visual_tokens_per_layer": fmean(r["visual_tokens_per_layer"] for r in runs),
            "per_type": {t: fmean(r["per_type"][t] for r in runs) for t in runs[0]["per_type"]}})
    return means


def folder_rows(out: Path, recipes: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """The :func:`row` of every finished run in ``out`` (or of ``recipes``, in that order), each with ``vs_tiny``,
    its VQA difference from tiny's run in the same folder (``None`` without one)."""
    dirs = [p.parent for p in sorted(out.glob("*/train_summary.json"))] if recipes is None else [out / r for r in recipes]
    if not dirs:
        raise AblationError(f"{out}: no finished run (train_summary.json) to tabulate")
    found = [row(d) for d in dirs]
    tiny = next((r["vqa"] for r in found if r["recipe"] == REFERENCE), None)
    for r in found:
        r["vs_tiny"] = None if tiny is None else r["vqa"] - tiny
    return found


def runs_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| recipe | seed | steps | VQA | vs tiny (pts) | grounding Acc@0.5 | s/step | visual tokens / layer | tower shares |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['recipe']} | {r['seed']} | {r['steps']} | {r['vqa']:.3f} | {_points(r['vs_tiny'])} | "
                     f"{r['grounding']:.3f} | {r['s_per_step']:.3f} | {r['visual_tokens_per_layer']:.1f} | "
                     f"{' / '.join(f'{x:.3f}' for x in r['tower_shares'] or [])} |")
    return lines


def means_table(means: list[dict[str, Any]]) -> list[str]:
    types = list(means[0]["per_type"])
    lines = [f"| recipe | seeds | VQA (mean ± sd) | vs tiny, same seeds (pts) | Acc@0.5 (mean ± sd) | s/step | "
             f"visual tokens / layer | {' / '.join(types)} |", "|---|---|---|---|---|---|---|---|"]
    for m in means:
        per_type = " / ".join(f"{m['per_type'][t]:.2f}" for t in types)
        lines.append(f"| {m['recipe']} | {', '.join(map(str, m['seeds']))} | {_spread(m['vqa'], m['vqa_sd'])} | "
                     f"{_points(m['vs_tiny'])} | {_spread(m['grounding'], m['grounding_sd'])} | {m['s_per_step']:.3f} | "
                     f"{m['visual_tokens_per_layer']:.1f} | {per_type} |")
    return lines


def table(outs: list[Path], recipes: Sequence[str] | None = None) -> tuple[str, dict[str, list[dict[str, Any]]]]:
    """The Markdown of every finished run under ``outs`` (one folder per seed; ``recipes`` only, if given), each
    against ``tiny`` of its own folder; with several folders, then each recipe's mean over seeds. Also the rows."""
    rows = [r for out in outs for r in folder_rows(out, recipes)]
    means = seed_means(rows)
    lines = runs_table(rows) + (["", *means_table(means)] if len(outs) > 1 else [])
    return "\n".join(lines), {"runs": rows, "seed_means": means}


def ablation(args: argparse.Namespace, command: str) -> str:
    """``all``: train what is missing, then write the tables with ``command`` and the date to ``args.results``."""
    recipes, seeds = list(dict.fromkeys([REFERENCE, *(args.recipes or RECIPES)])), list(dict.fromkeys(args.seeds))
    train_missing(args.out[0], seeds, recipes, [f"train.save_every={SAVE_EVERY}", *_overrides(args, seed=None)])
    tables, _ = table([args.out[0] / f"seed_{seed}" for seed in seeds], recipes)
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    text = (f"# Ablation: every design against {REFERENCE}\n\nMade on {when} by\n\n    {command}\n\n"
            "One row per run (seed), then, with several seeds, each recipe's mean over them (± the sample standard "
            "deviation); columns as `benchmarks/ablation.py` describes.\n\n" + tables + "\n")
    atomic_write(args.results, text)
    return text


def _overrides(args: argparse.Namespace, seed: int | None) -> list[str]:
    given = (("steps", args.steps), ("seed", seed))
    return [f"train.{key}={value}" for key, value in given if value is not None] + args.set


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["all", "train", "table"])
    parser.add_argument("recipes", nargs="*")
    parser.add_argument("--out", type=Path, nargs="+", required=True, help="train, all: one folder; table: one per seed")
    parser.add_argument("--steps", type=int, default=None, help="train.steps for every recipe (default: each recipe's own)")
    parser.add_argument("--seed", type=int, default=None, help="train: train.seed for every recipe (default: each recipe's own)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="all: the train.seed of each run")
    parser.add_argument("--results", type=Path, default=RESULTS, help="all: the Markdown file written")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="train, all: a config override for every run")
    args = parser.parse_intermixed_args(argv)
    if args.action != "table" and len(args.out) != 1:
        parser.error(f"{args.action}: one --out folder")
    if (args.action == "all") != (args.seeds is not None) or (args.action == "all" and args.seed is not None):
        parser.error("--seeds goes with all, --seed with train")
    try:
        if args.action == "all":
            argv = sys.argv[1:] if argv is None else argv
            print(ablation(args, shlex.join(["python", "benchmarks/ablation.py", *argv])))
        elif args.action == "train":
            for recipe in args.recipes:
                run.train(recipe, args.out[0] / recipe, _overrides(args, args.seed))
        else:
            tables, data = table(args.out)
            print(tables)
            print(json.dumps(data))
    except UserError as err:
        print(f"ablation.py {args.action}: error: {err}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
