"""Evaluation, analysis and the report of the FRANK toy experiment (see benchmarks/frank/study.py).

The JSON holds ``{"models": {NAME: {"shapesworld_vqa", "grounding", "arithmetic", "compositional",
"compositional_count"}}, "task_arithmetic_best": {...}, "layers": [...], "frank": {...}, "goals": {...},
"stage_seconds": {...}, "settings": {...}}``; a metric a model is not evaluated on (the reasoner has
no vision) is null. ``layers`` gives, per decoder block, ||tau_V||^2, ||tau_R||^2, their cosine, the
probe's visual share and each FRANK variant's lambda_V -- the numbers that explain the table.
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

from .config import data_config
from .parts import TextGenerator

FRANK_VARIANTS = ("frank", "frank_max", "frank_noprior")
TEXT_ONLY = ("reasoner",)


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
def _layer_deltas(path: Path, prefix: str, base: dict[str, torch.Tensor], num_layers: int) -> list[torch.Tensor]:
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    flat: list[list[torch.Tensor]] = [[] for _ in range(num_layers)]
    for name, b in sorted(base.items()):
        if name.startswith("model.layers."):
            layer = int(name.split(".")[2])
            flat[layer].append((tensors[prefix + name].float() - b.float()).reshape(-1))
    return [torch.cat(parts) for parts in flat]


def task_vector_layers(base: Path, mllm: Path, reasoner: Path, num_layers: int) -> list[dict[str, float]]:
    """Per decoder block: ||tau_V||^2, ||tau_R||^2 and cos(tau_V, tau_R) (all block tensors flattened)."""
    from safetensors.torch import load_file

    b = load_file(str(base / "model.safetensors"))
    tv = _layer_deltas(mllm / "model.safetensors", "llm.", b, num_layers)
    tr = _layer_deltas(reasoner / "model.safetensors", "", b, num_layers)
    rows = []
    for layer, (v, r) in enumerate(zip(tv, tr, strict=True)):
        nv, nr = float(v.double().square().sum()), float(r.double().square().sum())
        cos = float(v.double() @ r.double()) / math.sqrt(nv * nr) if nv and nr else 0.0
        rows.append({"layer": layer, "norm_sq_V": nv, "norm_sq_R": nr, "cosine": cos})
    return rows


def _mean(row: dict[str, Any]) -> float:
    vals = [row[k] for k in ("shapesworld_vqa", "grounding", "arithmetic", "compositional") if row[k] is not None]
    return sum(vals) / len(vals) if vals else 0.0


def _goals(models: dict[str, dict[str, Any]], best: str) -> dict[str, Any]:
    f, v, r, ta = models["frank"], models["mllm"], models["reasoner"], models[best]

    def ratio(a: float | None, b: float | None) -> float | None:
        return None if a is None or not b else a / b

    goals = {
        "shapesworld_vqa_kept": ratio(f["shapesworld_vqa"], v["shapesworld_vqa"]),
        "grounding_kept": ratio(f["grounding"], v["grounding"]),
        "arithmetic_kept": ratio(f["arithmetic"], r["arithmetic"]),
    }
    comp = f["compositional"] or 0.0
    goals["compositional_beats_parents_and_best_ta"] = comp > max(v["compositional"] or 0.0, r["compositional"] or 0.0,
                                                                   ta["compositional"] or 0.0)
    goals["met"] = all(x is not None and x >= 0.9 for k, x in goals.items() if k.endswith("_kept")) and \
        goals["compositional_beats_parents_and_best_ta"]
    return goals


def report(cfg: Any, out: Path, models: dict[str, tuple[Path, str]], scores: dict[str, dict[str, Any]],
           seconds: dict[str, Any], wall: float, results: Path | None) -> dict[str, Any]:
    """Write frank_toy.json / .md (and plots) into ``out``, copied into ``results`` when given."""
    ta = [n for n in scores if n.startswith("task_arithmetic_")]
    best = max(ta, key=lambda n: _mean(scores[n]))
    layers = task_vector_layers(out / "base" / "model", models["mllm"][0], models["reasoner"][0], cfg.num_layers)
    probe = json.loads((out / "probe" / "probe.json").read_text())
    frank = {}
    for variant in FRANK_VARIANTS:
        coef = json.loads((models[variant][0] / "frank_coefficients.json").read_text())
        frank[variant] = coef
        for row, c in zip(layers, coef["layers"], strict=True):
            row[f"lambda_V_{variant}"] = c["lambda_V"]
    for row, share in zip(layers, probe["visual_share"], strict=True):
        row["visual_share"] = share
    table = {**scores, "task_arithmetic_best": dict(scores[best])}
    doc = {
        "models": table, "task_arithmetic_best": {"model": best, "rule": "highest mean of the four metrics (test set)"},
        "goals": _goals(table, best), "layers": layers, "probe": probe, "frank": frank,
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
              "| layer | ‖τ_V‖² | ‖τ_R‖² | cos(τ_V, τ_R) | visual share | λ_V frank | λ_V frank_max | λ_V frank_noprior |",
              "|---|---|---|---|---|---|---|---|"]
    for r in doc["layers"]:
        lines.append(f"| {r['layer']} | {r['norm_sq_V']:.4g} | {r['norm_sq_R']:.4g} | {r['cosine']:.3f} "
                     f"| {r['visual_share']:.3f} | {r['lambda_V_frank']:.3f} | {r['lambda_V_frank_max']:.3f} "
                     f"| {r['lambda_V_frank_noprior']:.3f} |")
    lines += ["", "| stage | seconds | cached |", "|---|---|---|"]
    lines += [f"| {k} | {v['seconds']:.1f} | {v['cached']} |" for k, v in doc["stage_seconds"].items()]
    lines += ["", f"Total wall time of this invocation: {doc['wall_seconds']:.0f} s", ""]
    return "\n".join(lines)
