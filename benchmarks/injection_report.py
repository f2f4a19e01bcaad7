"""Where a trained run's LLM reads the image: the diagnosis of each LLM-side injector, per run.

    python benchmarks/injection_report.py runs/diag/xattn runs/diag/dehvf runs/diag/dpn [--scenes 16]

For each run (a folder written by ``mllm train``) one forward pass over single-question prompts of the first
``--scenes`` ShapesWorld test scenes (every question of a scene, one per row, laid out as the scene's first turn:
question and ``<image>`` in the recipe's order), then, per injector the run has
(:mod:`mllm.injection.diagnose`):

* ``gated_xattn`` (Flamingo): per block the gates ``tanh(a_x)``, ``tanh(a_f)`` and the visual read / residual;
* ``ffn_embed`` (DEHVF / MemVP): per layer the encoder-layer selection ``beta``, the memory read / the FFN's own
  output, the key norm, and how much the read changes when each prompt sees the next scene's image;
* ``pyramid`` (DPN): per pooling stage and question type the mean router probabilities, the share of rows sent
  to each expert, visual tokens kept, and the mean ``p_k`` the pooled tokens are multiplied by.

Prints Markdown; the last line is the JSON of all reports.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path
from statistics import fmean
from typing import Any

import torch

from mllm import run
from mllm.injection.diagnose import ffn_report, router_report, xattn_report
from mllm.model import MLLM
from train.data.shapesworld import ShapesWorld


def single_question_rows(scenes: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[str]]:
    """One conversation per (scene, question), in the layout of the scene's first turn; and each row's type."""
    rows, types = [], []
    for scene in scenes:
        image_first = scene["conversations"][0]["value"].startswith("<image>")
        for n, item in enumerate(scene["items"]):
            prompt = f"<image>\n{item['question']}" if image_first else f"{item['question']}\n<image>"
            rows.append({"id": f"{scene['id']}-{n}", "image": scene["image"], "objects": scene["objects"], "conversations": [
                {"from": "human", "value": prompt}, {"from": "gpt", "value": item["answer"]}]})
            types.append(item["type"])
    return rows, types


def xattn_rows(model: MLLM, batch: dict[str, Any]) -> list[dict[str, Any]]:
    return [asdict(r) | {"read_ratio": r.read_ratio} for r in xattn_report(model, batch)]


def ffn_rows(model: MLLM, batch: dict[str, Any], shift: int) -> list[dict[str, Any]]:
    return [asdict(r) | {"read_ratio": r.read_ratio} for r in ffn_report(model, batch, shift)]


def router_rows(model: MLLM, batch: dict[str, Any], types: list[str]) -> list[dict[str, Any]]:
    """Per stage and question type: mean p, the share of pooled rows per chosen expert, tokens out, mean p_k."""
    by_type: dict[str, list[int]] = defaultdict(list)
    for row, kind in enumerate(types):
        by_type[kind].append(row)
    out = []
    for stage in router_report(model, batch):
        chosen, scale, experts = stage.chosen, stage.scale, len(stage.probs[0])  # properties: computed once per stage
        for kind, rows in sorted(by_type.items()):
            pooled = [r for r in rows if chosen[r] is not None]
            out.append({
                "layer": stage.layer, "type": kind,
                "mean_p": [fmean(stage.probs[r][e] for r in rows) for e in range(experts)],
                "chosen": [sum(chosen[r] == e for r in pooled) / max(len(pooled), 1) for e in range(experts)],
                "tokens_out": fmean(stage.tokens_out[r] for r in rows),
                "scale": fmean(scale[r] for r in pooled) if pooled else None,  # type: ignore[misc]
            })
    return out


def report(run_dir: Path, scenes: int) -> dict[str, Any]:
    model, cfg = run.load_run(run_dir)
    test = ShapesWorld(cfg.data).split("test")
    samples, types = single_question_rows([test[i] for i in range(scenes)])
    # with the answers' labels: the injectors' query is then the prompt, as in training and generate (without
    # them every attended token is query, the answer too, and DPN routes at the answer's last token)
    batch = run.make_collator(model, cfg)(samples)
    names = {type(i).__name__ for i in model.injectors}
    return {
        "run": str(run_dir),
        "xattn": xattn_rows(model, batch) if "GatedXAttnInjector" in names else [],
        "ffn_embed": ffn_rows(model, batch, len(test[0]["items"])) if "FFNEmbedInjector" in names else [],
        "pyramid": router_rows(model, batch, types) if "PyramidInjector" in names else [],
    }


def _floats(xs: list[float]) -> str:
    return " / ".join(f"{x:.2f}" for x in xs)


def print_markdown(rep: dict[str, Any]) -> None:
    print(f"\n### {rep['run']}")
    if rep["xattn"]:
        print("\n| layer | tanh(a_x) | tanh(a_f) | read / residual |\n|---|---|---|---|")
        for r in rep["xattn"]:
            print(f"| {r['layer']} | {r['attn_gate']:+.3f} | {r['ff_gate']:+.3f} | {r['read_ratio']:.3f} |")
    if rep["ffn_embed"]:
        print("\n| layer | selection beta | memory read / FFN output | read | FFN output | key norm | image dependence |\n"
              "|---|---|---|---|---|---|---|")
        for r in rep["ffn_embed"]:
            print(f"| {r['layer']} | {_floats(r['selection'])} | {r['read_ratio']:.2e} | {r['memory_read']:.2e} | "
                  f"{r['ffn_out']:.2f} | {r['key_norm']:.2e} | {r['image_dependence']:.3f} |")
    if rep["pyramid"]:
        print("\n| after layer | question type | mean p | share chosen | tokens out | mean p_k |\n|---|---|---|---|---|---|")
        for r in rep["pyramid"]:
            scale = "-" if r["scale"] is None else f"{r['scale']:.3f}"
            print(f"| {r['layer']} | {r['type']} | {_floats(r['mean_p'])} | {_floats(r['chosen'])} | "
                  f"{r['tokens_out']:.1f} | {scale} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--scenes", type=int, default=16, help="test scenes, each giving one row per question (default 16)")
    args = parser.parse_args()
    reports = []
    with torch.no_grad():
        for run_dir in args.runs:
            reports.append(report(run_dir, args.scenes))
            print_markdown(reports[-1])
    print(json.dumps(reports))


if __name__ == "__main__":
    main()
