"""Evaluation, analysis and the report of the FRANK toy experiment (see benchmarks/frank/study.py).

The JSON holds ``{"models": {NAME: {"shapesworld_vqa", "grounding", "arithmetic", "compositional",
"compositional_count"}}, "task_arithmetic_best": {...}, "layers": [...], "frank": {...}, "goals": {...},
"stage_seconds": {...}, "settings": {...}}``; a metric a model is not evaluated on (the reasoner has
no vision) is null. ``layers`` gives, per decoder block, ||tau_V||^2, ||tau_R||^2 (absolute and relative
to theta_0's ||theta_0||^2), their cosine, the probe's visual share and each FRANK variant's lambda_V -- the
numbers that explain the table; ``properties`` (also ``properties.json``, written before any merge) checks
FRANK's assumptions on the parents: theta_0's loss curve, the largest relative move, the visual-share decay
and the parents' scores.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import torch

from common.atomic import atomic_write
from mllm.config import to_dict
from train.data.shapesworld import COLOUR_NAMES, SHAPES

from .config import data_config
from .parts import HISTORY, TextGenerator

FRANK_VARIANTS = ("frank", "frank_max", "frank_share", "frank_linear", "frank_noprior")
TEXT_ONLY = ("base", "reasoner")  # language models only: scored on arithmetic
PROPERTIES = "properties.json"


def _tasks(cfg: Any) -> dict[str, Any]:
    from eval.tasks.arithmetic import ArithmeticTask
    from eval.tasks.compositional import CompositionalConfig, CompositionalTask
    from eval.tasks.shapesworld import ShapesWorldTask
    from train.data.arithmetic import ArithmeticConfig

    return {
        "shapesworld": ShapesWorldTask(data_config(cfg), split="test"),
        "arithmetic": ArithmeticTask(ArithmeticConfig(seed=cfg.seed, test_size=cfg.eval_arithmetic)),
        "compositional": CompositionalTask(CompositionalConfig(data=data_config(cfg), seed=cfg.seed)),
    }


def _generator(name: str, path: Path, task: str, cache: dict[str, Any]) -> Any:
    """The model as the runner's generator: an MLLM on image tasks, its LLM (or the reasoner) on text."""
    if name not in cache:
        if name in TEXT_ONLY:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            llm = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True).eval()
            cache[name] = (None, TextGenerator(llm, AutoTokenizer.from_pretrained(str(path), local_files_only=True)))
        else:
            from mllm.model import MLLM

            model = MLLM.from_pretrained(path).eval()
            cache[name] = (model, TextGenerator(model.llm, model.tokenizer))
    model, text = cache[name]
    return text if task == "arithmetic" else model


def _scores(task: str, m: dict[str, Any]) -> dict[str, Any]:
    if task == "shapesworld":
        return {"shapesworld_vqa": m["vqa_accuracy"], "grounding": m["grounding_accuracy"]}
    if task == "arithmetic":
        return {"arithmetic": m["accuracy"]}
    return {"compositional": m["accuracy"], "compositional_count": m["count_accuracy"]}


def evaluate(cfg: Any, stages: Any, models: dict[str, tuple[Path, str]]) -> dict[str, dict[str, Any]]:
    """Every model on its tasks, each (model, task) a cached stage ``evals/NAME/TASK``."""
    from eval.runner import Dist, EvalConfig, run_task

    tasks = _tasks(cfg)
    scores: dict[str, dict[str, Any]] = {}
    for name, (path, h) in models.items():
        cache: dict[str, Any] = {}
        scores[name] = {k: None for k in ("shapesworld_vqa", "grounding", "arithmetic", "compositional",
                                          "compositional_count")}
        for task in (("arithmetic",) if name in TEXT_ONLY else tasks):
            ecfg = EvalConfig(batch_size=cfg.eval_batch_size, max_new_tokens=24 if task == "shapesworld" else 48)
            key = {"model": h, "protocol": tasks[task].protocol(), "eval": to_dict(ecfg)}

            def fn(folder: Path, name: str = name, path: Path = path, task: str = task, ecfg: Any = ecfg,
                   cache: dict[str, Any] = cache) -> None:
                run_task(_generator(name, path, task, cache), tasks[task], ecfg, folder, dist=Dist(), progress=False)

            folder, _ = stages.run(f"evals/{name}/{task}", key, fn)
            scores[name].update(_scores(task, json.loads((folder / "metrics.json").read_text())))
    return scores


# --- analysis ---------------------------------------------------------------------------------------
def _block_vectors(tensors: dict[str, torch.Tensor], prefix: str, base: dict[str, torch.Tensor],
                   num_layers: int, minus_base: bool = True) -> list[torch.Tensor]:
    """Per decoder block, all of its tensors flattened into one vector (minus theta_0's: the task vector)."""
    flat: list[list[torch.Tensor]] = [[] for _ in range(num_layers)]
    for name, b in sorted(base.items()):
        if name.startswith("model.layers."):
            t = tensors[prefix + name].double()
            flat[int(name.split(".")[2])].append((t - b.double() if minus_base else t).reshape(-1))
    return [torch.cat(parts) for parts in flat]


def task_vector_layers(base: Path, mllm: Path, reasoner: Path, num_layers: int) -> list[dict[str, float]]:
    """Per decoder block: ||tau_V||^2, ||tau_R||^2, each relative to ||theta_0||^2 of the block (how small
    a move each fine-tune is), and cos(tau_V, tau_R) (all block tensors flattened)."""
    from safetensors.torch import load_file

    b = load_file(str(base / "model.safetensors"))
    t0 = _block_vectors(b, "", b, num_layers, minus_base=False)
    tv = _block_vectors(load_file(str(mllm / "model.safetensors")), "llm.", b, num_layers)
    tr = _block_vectors(load_file(str(reasoner / "model.safetensors")), "", b, num_layers)
    rows = []
    for layer, (w, v, r) in enumerate(zip(t0, tv, tr, strict=True)):
        nv, nr, n0 = float(v.square().sum()), float(r.square().sum()), float(w.square().sum())
        cos = float(v @ r) / math.sqrt(nv * nr) if nv and nr else 0.0
        rows.append({"layer": layer, "norm_sq_V": nv, "norm_sq_R": nr, "norm_sq_0": n0, "rel_sq_V": nv / n0,
                     "rel_sq_R": nr / n0, "cosine": cos})
    return rows


ANSWER_WORDS = {"colour": COLOUR_NAMES, "shape": SHAPES, "exists": ("yes", "no"), "relpos-x": ("left", "right"),
                "relpos-y": ("above", "below")}


def answer_word_cosines(base: Path) -> dict[str, float]:
    """Per ShapesWorld answer type, the mean pairwise cosine of theta_0's (tied) embeddings of its answer words
    as they follow ``ASSISTANT:``: how far apart theta_0 has set the words theta_V must choose among (near 1:
    almost one vector, which theta_V, keeping the embeddings frozen, can only separate along their small
    differences)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(base), local_files_only=True)
    table = AutoModelForCausalLM.from_pretrained(str(base), local_files_only=True).get_input_embeddings().weight
    out = {}
    for kind, words in ANSWER_WORDS.items():
        ids = [tokenizer(" " + w, add_special_tokens=False)["input_ids"][-1] for w in words]
        unit = torch.nn.functional.normalize(table[ids].detach().double(), dim=-1)
        n = len(ids)
        out[kind] = float(((unit @ unit.T).sum() - n) / (n * (n - 1)))
    return out


def loss_curve(run_dir: Path) -> dict[str, Any]:
    """The trainer's logged loss of a run: first, at 50% / 80% of the steps, last, and the relative drop
    over the last 20% of the steps (near 0: the loss has flattened)."""
    points = [(row["step"], row["loss"]) for row in json.loads((run_dir / HISTORY).read_text()) if "loss" in row]
    steps = points[-1][0]

    def at(frac: float) -> float:
        return min(points, key=lambda p: abs(p[0] - frac * steps))[1]

    return {"steps": steps, "first": points[0][1], "at_50pct": at(0.5), "at_80pct": at(0.8), "last": points[-1][1],
            "drop_last_20pct": 1.0 - points[-1][1] / at(0.8)}


def properties(cfg: Any, out: Path, models: dict[str, tuple[Path, str]], scores: dict[str, dict[str, Any]]
               ) -> dict[str, Any]:
    """What FRANK assumes, measured on the parents before any merge: theta_0 trained until its loss flattens and
    telling the answer words of each type apart (:func:`answer_word_cosines`),
    tau_V and tau_R small (||tau||^2 / ||theta_0||^2 per block) and near-orthogonal, theta_V's visual
    attention share decaying with depth (image-only probe: every image with one prompt), and theta_V /
    theta_R good at their tasks. Written to ``properties.json`` in ``out``."""
    layers = task_vector_layers(out / "base" / "model", models["mllm"][0], models["reasoner"][0], cfg.num_layers)
    probe = json.loads((out / "probe" / "probe.json").read_text())
    for row, share in zip(layers, probe["visual_share"], strict=True):
        row["visual_share"] = share
    v, r, b = scores["mllm"], scores["reasoner"], scores["base"]
    words = answer_word_cosines(out / "base" / "model")
    doc = {"base_loss": loss_curve(out / "base" / "model-run"), "layers": layers, "probe_fit": probe.get("fit"),
           "answer_word_cosine": words,
           "parents": {"base": b, "mllm": v, "reasoner": r},
           "checks": {"mllm_vqa_at_least_0.85": (v["shapesworld_vqa"] or 0.0) >= 0.85,
                      "mllm_grounding_at_least_0.5": (v["grounding"] or 0.0) >= 0.5,
                      "reasoner_beats_base_on_arithmetic": (r["arithmetic"] or 0.0) > (b["arithmetic"] or 0.0),
                      "max_rel_sq_V": max(row["rel_sq_V"] for row in layers),
                      "max_rel_sq_R": max(row["rel_sq_R"] for row in layers),
                      "max_abs_cosine": max(abs(row["cosine"]) for row in layers),
                      "max_answer_word_cosine": max(words.values()),
                      "share_first_over_last": layers[0]["visual_share"] / max(layers[-1]["visual_share"], 1e-12)}}
    atomic_write(out / PROPERTIES, json.dumps(doc, indent=2))
    return doc


def _mean(row: dict[str, Any]) -> float:
    vals = [row[k] for k in ("shapesworld_vqa", "grounding", "arithmetic", "compositional") if row[k] is not None]
    return sum(vals) / len(vals) if vals else 0.0


def _goals(models: dict[str, dict[str, Any]], best: str) -> dict[str, Any]:
    """Per FRANK variant: the share of theta_V's VQA / grounding and of theta_R's arithmetic it keeps (goal
    >= 0.9 each) and whether its compositional score beats both parents and the best task arithmetic."""
    v, r, ta = models["mllm"], models["reasoner"], models[best]

    def ratio(a: float | None, b: float | None) -> float | None:
        return None if a is None or not b else a / b

    goals: dict[str, Any] = {}
    for variant in FRANK_VARIANTS:
        f = models[variant]
        g: dict[str, Any] = {"shapesworld_vqa_kept": ratio(f["shapesworld_vqa"], v["shapesworld_vqa"]),
                             "grounding_kept": ratio(f["grounding"], v["grounding"]),
                             "arithmetic_kept": ratio(f["arithmetic"], r["arithmetic"])}
        g["compositional_beats_parents_and_best_ta"] = (f["compositional"] or 0.0) > max(
            v["compositional"] or 0.0, r["compositional"] or 0.0, ta["compositional"] or 0.0)
        g["met"] = all(x is not None and x >= 0.9 for k, x in g.items() if k.endswith("_kept")) and \
            g["compositional_beats_parents_and_best_ta"]
        goals[variant] = g
    goals["met_by"] = [variant for variant in FRANK_VARIANTS if goals[variant]["met"]]
    return goals


def report(cfg: Any, out: Path, models: dict[str, tuple[Path, str]], scores: dict[str, dict[str, Any]],
           seconds: dict[str, Any], wall: float, results: Path | None) -> dict[str, Any]:
    """Write frank_toy.json / .md (and plots) into ``out``, copied into ``results`` when given."""
    ta = [n for n in scores if n.startswith("task_arithmetic_")]
    best = max(ta, key=lambda n: _mean(scores[n]))
    props = properties(cfg, out, models, scores)
    layers, probe = props["layers"], json.loads((out / "probe" / "probe.json").read_text())
    frank = {}
    for variant in FRANK_VARIANTS:
        coef = json.loads((models[variant][0] / "frank_coefficients.json").read_text())
        frank[variant] = coef
        for row, c in zip(layers, coef["layers"], strict=True):
            row[f"lambda_V_{variant}"] = c["lambda_V"]
    table = {**scores, "task_arithmetic_best": dict(scores[best])}
    doc = {
        "models": table, "task_arithmetic_best": {"model": best, "rule": "highest mean of the four metrics (test set)"},
        "goals": _goals(table, best), "properties": {k: v for k, v in props.items() if k != "layers"}, "layers": layers, "probe": probe, "frank": frank,
        "stage_seconds": seconds, "wall_seconds": wall,
        "settings": {**to_dict(cfg), "torch_threads": torch.get_num_threads(),
                     "notes": ["theta_V and theta_R keep theta_0's tied embeddings and final norm frozen; merges "
                               "touch decoder blocks only, the rest comes from theta_V",
                               "linear (0.5/0.5 of the models) equals task arithmetic with lambda 0.5 here",
                               "arithmetic is asked text-only (each MLLM's language model, no image)"]},
    }
    atomic_write(out / "frank_toy.json", json.dumps(doc, indent=2))
    atomic_write(out / "frank_toy.md", markdown(doc))
    if results is not None:
        results.mkdir(parents=True, exist_ok=True)
        for name in ("frank_toy.json", "frank_toy.md"):
            shutil.copy2(out / name, results / name)
        shutil.copy2(out / "probe" / "probe.png", results / "frank_toy_visual_share.png")
        for variant in FRANK_VARIANTS:
            shutil.copy2(models[variant][0] / "frank_coefficients.png", results / f"frank_toy_{variant}_coefficients.png")
    return doc


def _f(x: Any) -> str:
    return "–" if x is None else f"{x:.3f}" if isinstance(x, float) else str(x)


def markdown(doc: dict[str, Any]) -> str:
    lines = ["# FRANK toy experiment", "", "| model | ShapesWorld VQA | grounding Acc@0.5 | arithmetic | compositional "
             "| compositional: count right |", "|---|---|---|---|---|---|"]
    for name, r in doc["models"].items():
        lines.append(f"| {name} | {_f(r['shapesworld_vqa'])} | {_f(r['grounding'])} | {_f(r['arithmetic'])} "
                     f"| {_f(r['compositional'])} | {_f(r['compositional_count'])} |")
    lines += ["", f"task_arithmetic_best = {doc['task_arithmetic_best']['model']} "
              f"({doc['task_arithmetic_best']['rule']}); goals: `{json.dumps(doc['goals'])}`", "",
              "| layer | ‖τ_V‖² / ‖θ0‖² | ‖τ_R‖² / ‖θ0‖² | cos(τ_V, τ_R) | visual share | "
              + " | ".join(f"λ_V {v}" for v in FRANK_VARIANTS) + " |", "|---" * (5 + len(FRANK_VARIANTS)) + "|"]
    for r in doc["layers"]:
        lines.append(f"| {r['layer']} | {r['rel_sq_V']:.3g} | {r['rel_sq_R']:.3g} | {r['cosine']:.3f} "
                     f"| {r['visual_share']:.3f} | " + " | ".join(f"{r[f'lambda_V_{v}']:.3f}" for v in FRANK_VARIANTS)
                     + " |")
    props = doc["properties"]
    lines += ["", f"θ0 loss (trainer log): `{json.dumps(props['base_loss'])}`; probe fit: "
              f"`{json.dumps(props['probe_fit'])}`; checks on the parents: `{json.dumps(props['checks'])}`"]
    lines += ["", "| stage | seconds | cached |", "|---|---|---|"]
    lines += [f"| {k} | {v['seconds']:.1f} | {v['cached']} |" for k, v in doc["stage_seconds"].items()]
    lines += ["", f"Total wall time of this invocation: {doc['wall_seconds']:.0f} s", ""]
    return "\n".join(lines)
