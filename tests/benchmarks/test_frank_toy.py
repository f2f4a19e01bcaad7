"""The FRANK toy experiment's plumbing at tiny sizes (benchmarks/frank/, fast_config).

One run trains theta_0 / theta_R / theta_V for a few steps, probes, merges with every method and
evaluates; the checks: every merge loads and was evaluated on every task, the FRANK coefficients
equal the closed form recomputed here from the saved norms and probe, the merged blocks hold those
coefficients, the norms agree with the checkpoints, and a second run reuses every stage. Its
modules import each other without a circle.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from frank.config import (  # benchmarks/frank/ (tests/benchmarks/conftest.py)
    METRICS,
    base_corpus,
    data_config,
    fast_config,
)
from frank.study import merge_specs, run
from safetensors.torch import load_file

VARIANTS = ("frank", "frank_max", "frank_share", "frank_linear", "frank_noprior")
PACKAGE = Path(__file__).resolve().parents[2] / "benchmarks" / "frank"


def test_the_modules_import_each_other_without_a_circle() -> None:
    edges = {}
    for path in PACKAGE.glob("*.py"):
        tree = ast.parse(path.read_text())
        edges[path.stem] = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level == 1}
        edges[path.stem] |= {f"{n.module}".removeprefix("frank.") for n in ast.walk(tree)
                             if isinstance(n, ast.ImportFrom) and n.level == 0 and (n.module or "").startswith("frank")}
    assert edges["study"] == {"config", "parts", "report"} and edges["report"] == {"config", "parts"}
    order: list[str] = []  # topological order: a module comes after everything it imports
    while len(order) < len(edges):
        ready = sorted(m for m in edges if m not in order and edges[m] <= set(order))
        assert ready, f"import circle among {sorted(set(edges) - set(order))}"
        order += ready


def test_direct_answers_enter_the_base_corpus_only_when_asked() -> None:
    cfg = fast_config()
    direct = [t for t in base_corpus(dataclasses.replace(cfg, base_direct_answers=True)) if t.startswith("USER: Compute")]
    assert len(direct) == cfg.base_arithmetic and all(" ASSISTANT: " in t for t in direct)
    assert not [t for t in base_corpus(cfg) if t.startswith("USER: Compute")]  # the default: one-step facts only


def test_scene_text_sits_where_theta_v_reads_the_image() -> None:
    from train.data.shapesworld import ShapesWorld, scene_text

    cfg = fast_config()
    texts = base_corpus(cfg)
    scene = ShapesWorld(dataclasses.replace(data_config(cfg), seed=cfg.seed + 1, train_images=1)).split("train")[0]
    item = scene["items"][0]  # question first (mllm_data.image_first: false): the scene where the image goes
    assert texts[0] == f"USER: {item['question']}\n{scene_text(scene['objects'])} ASSISTANT: {item['answer']}"
    flipped = dataclasses.replace(cfg, mllm_data={**cfg.mllm_data, "image_first": True})
    assert base_corpus(flipped)[0] == f"USER: {scene_text(scene['objects'])}\n{item['question']} ASSISTANT: {item['answer']}"
    plain = base_corpus(dataclasses.replace(cfg, base_scene_text=False))[0]
    assert plain == f"USER: {item['question']} ASSISTANT: {item['answer']}"


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("frank_toy")
    doc = run(fast_config(), out, results=out / "results")
    return out, doc


def test_every_model_is_evaluated_on_its_tasks(toy: tuple[Path, dict]) -> None:
    out, doc = toy
    cfg = fast_config()
    names = set(merge_specs(cfg, Path("b"), Path("v"), Path("r"), Path("p")))
    assert set(doc["models"]) == names | {"base", "mllm", "reasoner", "task_arithmetic_best"}
    for name, row in doc["models"].items():
        for metric in METRICS:
            if name in ("base", "reasoner") and metric != "arithmetic":
                assert row[metric] is None  # no vision: text tasks only
            else:
                assert isinstance(row[metric], float) and 0.0 <= row[metric] <= 1.0, (name, metric)
    for name in names:  # a merge loads as an MLLM and its three evaluations wrote their predictions
        for task, n in (("shapesworld", None), ("arithmetic", cfg.eval_arithmetic), ("compositional", cfg.eval_scenes)):
            preds = (out / "evals" / name / task / "predictions.jsonl").read_text().splitlines()
            assert len(preds) == (n if n is not None else len(preds)) and preds
    assert doc["task_arithmetic_best"]["model"] in names
    saved = json.loads((out / "results" / "frank_toy.json").read_text())
    assert saved["models"] == doc["models"]
    for png in ("frank_toy_visual_share.png", *(f"frank_toy_{v}_coefficients.png" for v in VARIANTS)):
        assert (out / "results" / png).stat().st_size > 1000


def test_evaluations_ask_in_the_layout_theta_v_trained_with(toy: tuple[Path, dict]) -> None:
    """theta_V learns question-first turns (``mllm_data.image_first: false``): an image-first eval prompt
    would ask it something it never saw (the first full run scored theta_V VQA 0.275 that way, 0.468 right)."""
    out, _ = toy
    assert fast_config().mllm_data["image_first"] is False
    for task in ("shapesworld", "compositional"):
        rows = [json.loads(line) for line in (out / "evals" / "mllm" / task / "predictions.jsonl").read_text().splitlines()]
        assert rows and all(r["prompt"].endswith("\n<image>") and "<image>" not in r["prompt"][:-7] for r in rows)


def _prior(share: list[float], norm: str) -> np.ndarray:
    """w_V(l) of FRANK's fitted prior (Eq. 40-45, arXiv 2505.16151), computed independently of mllm.merge."""
    layers = np.arange(1, len(share) + 1)
    slope, intercept = np.polyfit(layers, np.log(share), 1)  # ln a_l = ln C - alpha l
    if norm == "share":
        return np.clip(np.exp(intercept + slope * layers), 0.0, 1.0)  # C e^{-alpha l}
    raw = np.exp(slope * (layers - 1))  # e^{-alpha (l - 1)}
    return raw / (raw.sum() if norm == "sum" else raw.max())


def _closed_form(w_v: np.ndarray, n_v: list[float], n_r: list[float]) -> list[float]:
    """lambda_V of Eq. 15."""
    return [float(w * a / (w * a + (1 - w) * b)) for w, a, b in zip(w_v, n_v, n_r, strict=True)]


@pytest.mark.parametrize("variant", VARIANTS)
def test_frank_coefficients_are_the_closed_form(toy: tuple[Path, dict], variant: str) -> None:
    out, doc = toy
    coef = json.loads((out / "merges" / variant / "model" / "frank_coefficients.json").read_text())
    rows = coef["layers"]
    n_v, n_r = [r["norm_sq_V"] for r in rows], [r["norm_sq_R"] for r in rows]
    if variant == "frank_noprior":
        expected = [a / (a + b) for a, b in zip(n_v, n_r, strict=True)]  # Eq. 13
    elif variant == "frank_linear":  # 1 in the first block down to 0 in the last
        expected = _closed_form(np.linspace(1.0, 0.0, len(rows)), n_v, n_r)
    else:
        share = json.loads((out / "probe" / "probe.json").read_text())["visual_share"]
        expected = _closed_form(_prior(share, {"frank": "sum"}.get(variant, variant.removeprefix("frank_"))), n_v, n_r)
    assert [r["lambda_V"] for r in rows] == pytest.approx(expected, rel=1e-6)
    assert [r["lambda_V"] + r["lambda_R"] for r in rows] == pytest.approx([1.0] * len(rows))
    # the saved norms are the checkpoints' per-block ||tau||^2 (computed by the report from the files)
    assert n_v == pytest.approx([r["norm_sq_V"] for r in doc["layers"]], rel=1e-5)
    assert n_r == pytest.approx([r["norm_sq_R"] for r in doc["layers"]], rel=1e-5)
    assert all(v > 0 for v in n_v + n_r)  # both fine-tunes moved every block
    # the merged block is theta_0 + lambda_V tau_V + lambda_R tau_R with those coefficients
    base = load_file(str(out / "base" / "model" / "model.safetensors"))
    v = load_file(str(out / "mllm" / "model" / "model.safetensors"))
    r = load_file(str(out / "reasoner" / "model" / "model.safetensors"))
    merged = load_file(str(out / "merges" / variant / "model" / "model.safetensors"))
    for layer, row in enumerate(rows):
        name = f"model.layers.{layer}.mlp.down_proj.weight"
        b = base[name]
        want = b + row["lambda_V"] * (v["llm." + name] - b) + row["lambda_R"] * (r[name] - b)
        torch.testing.assert_close(merged["llm." + name], want, rtol=1e-5, atol=1e-6)
    # outside the blocks everything is theta_V's (vision tower, projector, embeddings = theta_0's)
    for name in ("projector.layers.0.weight", "llm.lm_head.weight", "llm.model.norm.weight"):
        assert torch.equal(merged[name], v[name])
    # tied embeddings and the final norm stayed frozen in both fine-tunes
    assert torch.equal(v["llm.lm_head.weight"], base["model.embed_tokens.weight"])
    assert torch.equal(v["llm.model.norm.weight"], base["model.norm.weight"])
    assert torch.equal(r["model.norm.weight"], base["model.norm.weight"])


def test_the_properties_are_measured_from_the_checkpoints(toy: tuple[Path, dict]) -> None:
    out, doc = toy
    cfg = fast_config()
    props = json.loads((out / "properties.json").read_text())
    base = load_file(str(out / "base" / "model" / "model.safetensors"))
    for layer, row in enumerate(props["layers"]):
        block = [t.double() for n, t in base.items() if n.startswith(f"model.layers.{layer}.")]
        norm_0 = sum(float(t.square().sum()) for t in block)
        assert row["rel_sq_V"] == pytest.approx(row["norm_sq_V"] / norm_0, rel=1e-9)
        assert row["rel_sq_R"] == pytest.approx(row["norm_sq_R"] / norm_0, rel=1e-9)
    # theta_0's yes / no: the cosine of the two embedding rows the tokenizer gives " yes" and " no"
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out / "base" / "model"))
    table = base["model.embed_tokens.weight"].double()
    yes, no = (table[tok(" " + w, add_special_tokens=False)["input_ids"][-1]] for w in ("yes", "no"))
    assert props["answer_word_cosine"]["exists"] == pytest.approx(float(yes @ no / (yes.norm() * no.norm())), rel=1e-9)
    assert props["checks"]["max_answer_word_cosine"] == max(props["answer_word_cosine"].values())
    # theta_0's loss curve is the trainer's log: its last point is the last step
    history = json.loads((out / "base" / "model-run" / "history.json").read_text())
    losses = [r["loss"] for r in history if "loss" in r]
    assert props["base_loss"]["steps"] == cfg.base_steps and props["base_loss"]["last"] == losses[-1]
    assert props["base_loss"]["drop_last_20pct"] == pytest.approx(1 - losses[-1] / props["base_loss"]["at_80pct"])
    # theta_V trained in two phases (align, then tune), each with its own trainer log
    for i, steps in enumerate((cfg.mllm_align_steps, cfg.mllm_steps)):
        rows = json.loads((out / "mllm" / f"model-{i}" / "history.json").read_text())
        assert rows[-1]["step"] == steps
    # the align phase left the LLM's blocks at theta_0 (its end checkpoint); the tune phase moved them
    (aligned,) = (out / "mllm" / "model-0" / "checkpoints").glob("step-*/model.safetensors")
    aligned_t, final = load_file(str(aligned)), load_file(str(out / "mllm" / "model" / "model.safetensors"))
    blocks = [n for n in base if n.startswith("model.layers.")]
    assert all(torch.equal(aligned_t["llm." + n], base[n]) for n in blocks)
    assert all(not torch.equal(final["llm." + n], base[n]) for n in blocks if n.endswith("proj.weight"))
    v = doc["models"]["mllm"]
    assert props["checks"]["mllm_vqa_at_least_0.85"] == (v["shapesworld_vqa"] >= 0.85)
    assert props["parents"]["mllm"]["grounding"] == v["grounding"]


def test_rerun_reuses_every_stage(toy: tuple[Path, dict]) -> None:
    out, doc = toy
    again = run(fast_config(), out)
    assert all(s["cached"] for s in again["stage_seconds"].values())
    assert again["models"] == doc["models"]
    assert not math.isnan(again["wall_seconds"])


def test_lora_theta_v_is_a_rank_bounded_move_merged_back(toy: tuple[Path, dict], tmp_path: Path) -> None:
    from frank.config import mllm_run_configs
    from frank.parts import train_mllm

    out, _ = toy
    r = 2
    cfg = dataclasses.replace(fast_config(), mllm_lora={"r": r, "alpha": 4, "dropout": 0.0})
    phases = mllm_run_configs(cfg, out / "base" / "model")
    assert [p.train.lora for p in phases][0] is None and phases[1].train.lora.r == r  # the tune phase only
    train_mllm(phases, tmp_path / "model")
    from mllm.model import MLLM

    stored = load_file(str(tmp_path / "model" / "model.safetensors"))
    assert not [n for n in stored if "lora_" in n or "base_layer" in n]  # merged back: theta_0's tensor names
    llm = MLLM.from_pretrained(tmp_path / "model").llm.state_dict()
    base = load_file(str(out / "base" / "model" / "model.safetensors"))
    moved = 0
    for name, t in base.items():
        delta = llm[name].double() - t.double()
        if name.startswith("model.layers.") and name.endswith("proj.weight"):
            moved += int(delta.abs().max() > 0)
            sv = torch.linalg.svdvals(delta)  # beyond rank r: only the float32 rounding of W + (alpha / r) B A
            assert float(sv[r]) < 1e-3 * float(sv[0]), (name, sv[: r + 2].tolist())
        elif not name.startswith("model.layers."):  # embeddings (tied lm_head) and the final norm: theta_0's
            assert torch.equal(delta, torch.zeros_like(delta)), name
        else:  # the blocks' norms carry no adapter
            assert torch.equal(delta, torch.zeros_like(delta)), name
    assert moved == 7 * cfg.num_layers  # every q/k/v/o/gate/up/down projection of every block moved
