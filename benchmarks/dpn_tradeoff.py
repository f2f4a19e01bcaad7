"""A trained DPN run's accuracy against the LLM FLOPs its pooling spends on visual tokens, per pooling setting.

    python benchmarks/dpn_tradeoff.py RUN [--pin 2,2,2 ...] [--limit N] [--results FILE]

DPN (Ai et al., 2025, arXiv 2503.20322) trains its routers to pick one pooling expert per stage and row; the
run's own routing is one point of the curve. Every other point pins each pooling stage to one expert
(``PyramidInjector.pin``: the router's probability of that expert still scales the pooled tokens, as in
training) and scores the run's ShapesWorld test split (VQA, Acc@0.5, per type). DPN trains on experts drawn
from its routers, so a setting its routers never drew is one the model never trained on: the curve shows that
too. Default settings: the routers' own argmax, then every stage at one expert, and the settings that pool only
later stages.

FLOPs ratio = the visual tokens' LLM FLOPs over those of plain splicing (every layer holding all visual tokens):
``sum_l [F(n_text + n_v(l)) - F(n_text)] / sum_l [F(n_text + n_v) - F(n_text)]`` with the prefill block formula of
``injection_bench.LLMShape.block_flops`` at the run's LLM sizes, ``n_v(l)`` the mean visual tokens entering layer
``l`` over the evaluated prompts (read from the injector) and ``n_text`` their mean text tokens. Prints Markdown;
the last line is JSON; ``--results`` also writes the Markdown, with the command line and date.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shlex
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from statistics import fmean
from typing import Any

import torch
from injection_bench import LLMShape

from common.atomic import atomic_write
from common.errors import UserError
from eval.runner import Dist, EvalConfig, run_task
from eval.tasks.shapesworld import ShapesWorldTask
from mllm import run
from mllm.injection.pyramid import PyramidInjector
from mllm.model import MLLM
from train.templates import encode_prompt

TYPES = ("colour", "shape", "count", "exists", "relpos")


def default_settings(stages: int, experts: int) -> list[list[int] | None]:
    """The routers' own choice, every stage at one expert, and each expert from stage ``s`` on (earlier stages
    keep every token)."""
    settings: list[list[int] | None] = [None]
    for k in range(experts):
        for first in range(stages):
            pinned = [0] * first + [k] * (stages - first)
            if pinned not in settings:
                settings.append(pinned)
    return settings


def llm_shape(model: MLLM) -> LLMShape:
    c = model.llm.config
    return LLMShape(hidden=c.hidden_size, ffn=c.intermediate_size, layers=c.num_hidden_layers,
                    heads=c.num_attention_heads, vocab=c.vocab_size)


def flops_ratio(shape: LLMShape, text: float, visual: int, tokens_per_layer: list[float]) -> float:
    """Visual-token FLOPs of the pooled run over plain splicing's (module docstring)."""
    return shape.visual_flops(text, tokens_per_layer) / shape.visual_flops(text, [float(visual)] * shape.layers)


def text_tokens(model: MLLM, questions: list[str]) -> float:
    """Mean prompt tokens besides the visual ones, laid out as the model was trained."""
    return fmean(len(encode_prompt(model.tokenizer, q, model.template, model.cfg.image_token, model.num_image_tokens,
                                   model.cfg.image_first)) - model.num_image_tokens for q in questions)


def point(model: MLLM, dpn: PyramidInjector, task: ShapesWorldTask, cfg: EvalConfig,
          pinned: list[int] | None) -> dict[str, Any]:
    dpn.pin(pinned)
    dpn.reset_stats()
    try:
        with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):  # the runner's table
            metrics = run_task(model, task, cfg, tmp, dist=Dist(), progress=False)
    finally:
        dpn.pin(None)  # the routers choose again, whatever happened
    return {"pinned": pinned, "tokens_per_layer": dpn.tokens_per_layer(), "vqa": metrics["vqa_accuracy"],
            "grounding": metrics["grounding_accuracy"], "per_type": {t: metrics["per_type"].get(t) for t in TYPES}}


def tradeoff(run_dir: Path, settings: list[list[int] | None] | None, limit: int | None) -> dict[str, Any]:
    model, cfg = run.load_run(run_dir)
    dpn = next((i for i in model.injectors if isinstance(i, PyramidInjector)), None)
    if dpn is None:
        raise UserError(f"{run_dir}: the run has no pyramid (DPN) injector")
    settings = settings if settings is not None else default_settings(len(dpn.pool_layers), len(dpn.experts))
    task = ShapesWorldTask(cfg.data, split="test")
    ecfg = EvalConfig(batch_size=cfg.eval.batch_size, max_new_tokens=cfg.eval.max_new_tokens, limit=limit)
    questions = [s.question for s in task.samples()][:limit]
    shape, text = llm_shape(model), text_tokens(model, questions)
    points = [point(model, dpn, task, ecfg, pinned) for pinned in settings]
    for p in points:
        p["flops_ratio"] = flops_ratio(shape, text, model.num_visual_tokens, p["tokens_per_layer"])
    return {"run": str(run_dir), "pool_after": dpn.pool_layers, "experts": dpn.experts, "text_tokens": text,
            "samples": len(questions), "points": points}


def markdown(doc: dict[str, Any]) -> str:
    experts = ", ".join(f"{i}: {kh}x{kw}" for i, (kh, kw) in enumerate(doc["experts"]))
    lines = [f"Run `{doc['run']}`: pooling after layers {doc['pool_after']}, experts {experts} (kernel = stride); "
             f"{doc['samples']} test samples, {doc['text_tokens']:.1f} text tokens per prompt.", "",
             f"| experts per stage | visual tokens per layer | FLOPs ratio | VQA | Acc@0.5 | {' | '.join(TYPES)} |",
             "|---|---|---|---|---|" + "---|" * len(TYPES)]
    for p in doc["points"]:
        name = "routers' argmax" if p["pinned"] is None else ",".join(map(str, p["pinned"]))
        tokens = ", ".join(f"{n:g}" for n in p["tokens_per_layer"])
        types = " | ".join("-" if p["per_type"][t] is None else f"{p['per_type'][t]:.3f}" for t in TYPES)
        lines.append(f"| {name} | {tokens} | {p['flops_ratio']:.3f} | {p['vqa']:.3f} | {p['grounding']:.3f} | {types} |")
    return "\n".join(lines)


def _setting(text: str) -> list[int]:
    try:
        return [int(k) for k in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--pin: expected expert indices like 2,2,2, got {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--pin", type=_setting, action="append", default=None,
                        help="expert index per pooling stage, e.g. 2,2,2 (repeatable; default: module docstring)")
    parser.add_argument("--limit", type=int, default=None, help="test samples (default: the whole split)")
    parser.add_argument("--results", type=Path, default=None, help="also write the Markdown here")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        with torch.no_grad():
            doc = tradeoff(args.run, args.pin, args.limit)
    except UserError as err:
        print(f"dpn_tradeoff.py: error: {err}", file=sys.stderr, flush=True)
        return 2
    text = markdown(doc)
    print(text)
    print(json.dumps(doc))
    if args.results is not None:
        when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        command = shlex.join(["python", "benchmarks/dpn_tradeoff.py", *(sys.argv[1:] if argv is None else argv)])
        atomic_write(args.results, f"# DPN: accuracy against visual FLOPs\n\nMade on {when} by\n\n    {command}\n\n"
                     f"{__doc__.split(chr(10) + chr(10), 2)[1]}\n\n{text}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
