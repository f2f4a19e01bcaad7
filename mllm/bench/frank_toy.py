"""FRANK end to end at toy scale (issue 8): ``mllm bench frank-toy`` / ``benchmarks/frank_toy.py``.

Stages, each in its own folder under ``--out`` and reused when its config hash (which includes the
hashes of the stages it reads) matches the one recorded in its ``stage.json``:

1. ``base``      theta_0 pre-trained from scratch on text of both domains (toy_parts.pretrain_base);
                 its tokenizer is built from both generators' vocabulary texts.
2. ``reasoner``  theta_R = theta_0 fine-tuned on arithmetic chains.
3. ``mllm``      theta_V = ViT + projector + copy of theta_0, trained on ShapesWorld.
4. ``probe``     per-layer visual attention share of theta_V (METHODS.md 1.7), JSON + plot.
5. ``merges/*``  theta_V's LLM blocks with theta_R over theta_0 through ``mllm merge`` YAML; vision
                 tower, projector, embeddings and final norm from theta_V (frozen = theta_0's in both
                 fine-tunes): FRANK (fitted prior, sum / max normalisation), FRANK without prior
                 (Eq. 13), task arithmetic (lambda grid), TIES, linear, layer swapping, LiNeS.
6. ``evals/*``   ShapesWorld VQA + grounding, arithmetic (text only), compositional, per model.
7. report        frank_toy.json / .md (+ plots) in ``--out`` and, with ``--results``, copied there.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from common.atomic import atomic_write
from mllm.config import RunConfig, from_dict, to_dict
from train.data.arithmetic import Arithmetic, ArithmeticConfig
from train.data.shapesworld import ShapesWorld, ShapesWorldConfig
from train.trainer import TrainConfig

log = logging.getLogger("mllm.bench")
STAGE_FILE = "stage.json"
TASKS = ("shapesworld", "arithmetic", "compositional")
METRICS = ("shapesworld_vqa", "grounding", "arithmetic", "compositional")
PROBE_QUESTION = "How many objects are there?"


@dataclass
class FrankToyConfig:
    seed: int = 0
    llm: dict[str, Any] = field(default_factory=lambda: {
        "hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4,
        "num_key_value_heads": 4, "max_position_embeddings": 192, "tie_word_embeddings": True})
    # theta_V's vision side is the `tiny` recipe's (conv stem, object heads): its LLM is theta_0's copy
    encoder: dict[str, Any] = field(default_factory=lambda: {
        "name": "timm_vit", "model_name": "vit_tiny_patch16_224", "image_size": 64, "patch_size": 16,
        "embed_dim": 128, "depth": 4, "num_heads": 4, "layers": [-1], "stem": "conv", "stem_width": 32})
    mllm_model: dict[str, Any] = field(default_factory=lambda: {  # theta_V's other model keys (mllm.config)
        "object_heads": {"weight": 1.0}, "loss_reduction": "sample"})
    mllm_data: dict[str, Any] = field(default_factory=lambda: {  # theta_V's training data (ShapesWorldConfig)
        "questions_per_image": 1, "grounding_fraction": 0.25})
    base_steps: int = 1500
    base_lr: float = 2e-3
    base_scenes: int = 2000  # ShapesWorld scenes whose Q/A become pre-training text
    base_arithmetic: int = 6000  # one-step facts, and as many direct-answer problems
    reasoner_steps: int = 600
    reasoner_lr: float = 1e-3
    mllm_steps: int = 3000
    mllm_lr: float = 5e-4
    mllm_batch_size: int = 64
    mllm_llm_lr: float | None = None  # the LLM's learning rate in theta_V's training (None: mllm_lr)
    train_images: int = 500000  # generated on demand: every theta_V training sample is a fresh scene
    batch_size: int = 32
    max_length: int = 192
    eval_scenes: int = 50  # ShapesWorld test scenes (about 6 questions each) and compositional questions
    eval_arithmetic: int = 100
    eval_batch_size: int = 64
    probe_images: int = 32
    ta_lambdas: list[float] = field(default_factory=lambda: [0.3, 0.5, 0.7, 1.0])
    ties_density: float = 0.2
    lines_alpha: float = 0.5
    lines_beta: float = 0.5
    threads: int = 1  # torch intra-op threads: tiny ops gain nothing from more, and spin-waits hurt on a busy CPU

    @property
    def num_layers(self) -> int:
        return int(self.llm["num_hidden_layers"])


def fast_config() -> FrankToyConfig:
    """Tiny sizes and a few steps: the plumbing test (tests/mllm/test_frank_toy.py)."""
    return FrankToyConfig(
        llm={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 2,
             "num_key_value_heads": 2, "max_position_embeddings": 192, "tie_word_embeddings": True},
        encoder={"name": "timm_vit", "model_name": "vit_tiny_patch16_224", "image_size": 64, "patch_size": 16,
                 "embed_dim": 32, "depth": 1, "num_heads": 2, "layers": [-1]},
        base_steps=6, base_scenes=16, base_arithmetic=64, reasoner_steps=4, mllm_steps=4, train_images=64,
        batch_size=8, mllm_batch_size=8, eval_scenes=3, eval_arithmetic=4, eval_batch_size=16, probe_images=4,
        ta_lambdas=[0.5, 1.0], threads=1,
    )


# --- stage caching -----------------------------------------------------------------------------
def digest(key: Any) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Stages:
    """Runs ``fn(folder)`` unless ``folder/stage.json`` records the same key hash; records wall time."""

    def __init__(self, root: Path) -> None:
        self.root, self.seconds = root, {}

    def run(self, name: str, key: Any, fn: Callable[[Path], None]) -> tuple[Path, str]:
        h, folder = digest(key), self.root / name
        marker = folder / STAGE_FILE
        if marker.is_file() and json.loads(marker.read_text()).get("hash") == h:
            self.seconds[name] = {"seconds": json.loads(marker.read_text())["seconds"], "cached": True}
            return folder, h
        shutil.rmtree(folder, ignore_errors=True)  # a stale or torn stage: redo it whole
        folder.mkdir(parents=True)
        t0 = time.perf_counter()
        log.info("stage %s ...", name)
        fn(folder)
        seconds = time.perf_counter() - t0
        atomic_write(marker, json.dumps({"hash": h, "key": key, "seconds": seconds}, indent=2, default=str))
        self.seconds[name] = {"seconds": seconds, "cached": False}
        return folder, h


# --- configs of the parts ------------------------------------------------------------------------
def data_config(cfg: FrankToyConfig) -> ShapesWorldConfig:
    return ShapesWorldConfig(seed=cfg.seed, image_size=cfg.encoder["image_size"], train_images=cfg.train_images,
                             val_images=max(cfg.probe_images, 1), test_images=cfg.eval_scenes)


def train_config(cfg: FrankToyConfig, steps: int, lr: float, batch_size: int | None = None) -> dict[str, Any]:
    batch_size = batch_size or cfg.batch_size
    return {"steps": steps, "batch_size": batch_size, "micro_batch_size": batch_size, "lr": lr,
            "warmup_steps": max(1, steps // 20), "seed": cfg.seed, "log_every": max(1, steps // 10)}


def mllm_run_config(cfg: FrankToyConfig, base: Path) -> RunConfig:
    return from_dict(RunConfig, {
        "model": {"encoder": cfg.encoder, "projector": {"name": "mlp"}, "tokenizer": str(base),
                  "llm": {"path": str(base), "attn_implementation": "sdpa"}, "template": "plain",
                  "max_length": cfg.max_length, **cfg.mllm_model},
        "data": {**dataclasses.asdict(data_config(cfg)), **cfg.mllm_data},
        "train": {**train_config(cfg, cfg.mllm_steps, cfg.mllm_lr, cfg.mllm_batch_size),
                  "trainable": ["encoder", "projector", "llm"],
                  "lr_groups": {} if cfg.mllm_llm_lr is None else {"llm": cfg.mllm_llm_lr}},
    }, where="frank_toy.mllm")


def base_corpus(cfg: FrankToyConfig) -> list[str]:
    """ShapesWorld Q/A as text, one-step arithmetic facts, direct-answer arithmetic questions."""
    scenes = ShapesWorld(dataclasses.replace(data_config(cfg), seed=cfg.seed + 1, train_images=cfg.base_scenes))
    texts = [f"USER: {it['question']} ASSISTANT: {it['answer']}" for s in scenes.split("train") for it in s["items"]]
    arith = Arithmetic(ArithmeticConfig(seed=cfg.seed + 1, train_size=cfg.base_arithmetic))
    texts += arith.statements(cfg.base_arithmetic)
    texts += [f"USER: {p['items'][0]['question']} ASSISTANT: {p['answer']}" for p in arith.split("train")]
    return texts


def merge_specs(cfg: FrankToyConfig, base: Path, mllm: Path, reasoner: Path, probe: Path) -> dict[str, dict[str, Any]]:
    """The merge YAML (as dicts) of every compared method; decoder blocks only, the rest from theta_V."""
    v, r, b = str(mllm), str(reasoner), str(base)
    common = {"dtype": "float32", "reference_model": v, "name_map": {r"^llm\.": ""},
              "include": [r"^llm\.model\.layers\."]}
    both = [{"model": v, "parameters": {"weight": 1.0}}, {"model": r, "parameters": {"weight": 1.0}}]
    specs: dict[str, dict[str, Any]] = {
        "frank": {"merge_method": "frank", "base_model": b, "models": [v, r],
                  "parameters": {"prior": str(probe), "prior_norm": "sum"}},
        "frank_max": {"merge_method": "frank", "base_model": b, "models": [v, r],
                      "parameters": {"prior": str(probe), "prior_norm": "max"}},
        "frank_noprior": {"merge_method": "frank", "base_model": b, "models": [v, r]},
    }
    for lam in cfg.ta_lambdas:
        specs[f"task_arithmetic_{lam:g}"] = {"merge_method": "task_arithmetic", "base_model": b, "models": both,
                                              "parameters": {"lambda": lam}}
    specs["ties"] = {"merge_method": "ties", "base_model": b, "parameters": {"lambda": 1.0},
                     "models": [{"model": m["model"], "parameters": {"weight": 1.0, "density": cfg.ties_density}}
                                for m in both]}
    specs["linear"] = {"merge_method": "linear", "models": [{"model": v, "parameters": {"weight": 0.5}},
                                                            {"model": r, "parameters": {"weight": 0.5}}]}
    # shallow blocks from the MLLM, deep ones from the reasoner (FRANK's picture, as a hard switch)
    specs["layer_swap"] = {"merge_method": "layer_swap", "parameters": {"bottom": cfg.num_layers // 2, "top": 0},
                           "models": [{"model": v, "parameters": {"swap": True}}, {"model": r}]}
    specs["lines"] = {"merge_method": "lines", "base_model": b, "models": both,
                      "parameters": {"alpha": cfg.lines_alpha, "beta": cfg.lines_beta}}
    return {name: {**common, **spec} for name, spec in specs.items()}


# --- the stages ------------------------------------------------------------------------------------
def build_base(cfg: FrankToyConfig, folder: Path) -> None:
    from mllm.bench.toy_parts import pretrain_base
    from train.data.templates import get_template
    from train.data.tokenizer import build_tokenizer

    tokenizer = build_tokenizer([*ShapesWorld(data_config(cfg)).vocabulary_texts(),
                                 *Arithmetic(ArithmeticConfig()).vocabulary_texts(),
                                 *get_template("plain").vocabulary_texts()])
    train = from_dict(TrainConfig, train_config(cfg, cfg.base_steps, cfg.base_lr), where="frank_toy.base")
    pretrain_base(tokenizer, cfg.llm, base_corpus(cfg), train, folder / "model", cfg.max_length)


def build_reasoner(cfg: FrankToyConfig, base: Path, folder: Path) -> None:
    from mllm.bench.toy_parts import finetune_reasoner

    data = Arithmetic(ArithmeticConfig(seed=cfg.seed, train_size=cfg.reasoner_steps * cfg.batch_size)).split("train")
    train = from_dict(TrainConfig, train_config(cfg, cfg.reasoner_steps, cfg.reasoner_lr), where="frank_toy.reasoner")
    finetune_reasoner(base, data, train, folder / "model", cfg.max_length)


def build_probe(cfg: FrankToyConfig, mllm: Path, folder: Path) -> None:
    from mllm.bench.toy_parts import probe_batches
    from mllm.merge.probe import run_probe
    from mllm.model import MLLM

    model = MLLM.from_pretrained(mllm)
    val = ShapesWorld(data_config(cfg)).split("val")
    images = [val[i]["image"] for i in range(cfg.probe_images)]
    run_probe(model, probe_batches(model, images, PROBE_QUESTION), folder,
              source=f"ShapesWorld val, {cfg.probe_images} images, question {PROBE_QUESTION!r}")


def build_merge(spec: dict[str, Any], mllm: Path, folder: Path) -> None:
    from mllm.merge import run_merge

    path = folder / "merge.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    out = run_merge(path, folder / "model")
    for sub in ("llm", "tokenizer"):  # an MLLM checkpoint's sub-folders, where the engine left them out
        if not (out / sub).exists():
            shutil.copytree(mllm / sub, out / sub)


def run(cfg: FrankToyConfig, out: Path, results: Path | None = None) -> dict[str, Any]:
    """The whole experiment into ``out`` (stages reused where cached); returns the report dict."""
    import torch

    from mllm.bench.frank_report import evaluate, report

    torch.set_num_threads(cfg.threads)
    t0 = time.perf_counter()
    stages = Stages(out)
    conf = to_dict(cfg)
    model_keys = {k: conf[k] for k in ("seed", "llm", "max_length", "batch_size")}
    base, hb = stages.run("base", {**model_keys, "steps": cfg.base_steps, "lr": cfg.base_lr,
                                   "scenes": cfg.base_scenes, "arith": cfg.base_arithmetic, "image": cfg.encoder["image_size"]},
                          lambda f: build_base(cfg, f))
    base = base / "model"
    reasoner, hr = stages.run("reasoner", {"base": hb, "steps": cfg.reasoner_steps, "lr": cfg.reasoner_lr},
                              lambda f: build_reasoner(cfg, base, f))
    reasoner = reasoner / "model"
    mllm, hv = stages.run("mllm", {"base": hb, "encoder": cfg.encoder, "steps": cfg.mllm_steps, "lr": cfg.mllm_lr,
                                   "llm_lr": cfg.mllm_llm_lr, "images": cfg.train_images, "model": cfg.mllm_model,
                                   "data": cfg.mllm_data, "batch": cfg.mllm_batch_size},
                          lambda f: train_mllm_stage(cfg, base, f))
    mllm = mllm / "model"
    probe, hp = stages.run("probe", {"mllm": hv, "images": cfg.probe_images, "q": PROBE_QUESTION},
                           lambda f: build_probe(cfg, mllm, f))
    models: dict[str, tuple[Path, str]] = {"mllm": (mllm, hv), "reasoner": (reasoner, hr)}
    for name, spec in merge_specs(cfg, base, mllm, reasoner, probe / "probe.json").items():
        folder, h = stages.run(f"merges/{name}", {"spec": spec, "inputs": [hb, hv, hr, hp]},
                               lambda f, s=spec: build_merge(s, mllm, f))
        models[name] = (folder / "model", h)
    scores = evaluate(cfg, stages, models)
    doc = report(cfg, out, models, scores, stages.seconds, time.perf_counter() - t0, results)
    return doc


def train_mllm_stage(cfg: FrankToyConfig, base: Path, folder: Path) -> None:
    from mllm.bench.toy_parts import train_mllm

    train_mllm(mllm_run_config(cfg, base), folder / "model")


def main(argv: list[str] | None = None) -> int:
    """``mllm bench frank-toy`` / ``python benchmarks/frank_toy.py``: run, print the Markdown table."""
    import argparse

    from mllm.config import apply_overrides

    p = argparse.ArgumentParser(prog="mllm bench frank-toy", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/frank_toy", help="stage folders (cached between runs)")
    p.add_argument("--results", default=None, help="also copy frank_toy.json/.md and plots here")
    p.add_argument("--fast", action="store_true", help="tiny sizes, few steps (the test-suite variant)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a FrankToyConfig field, e.g. --set mllm_steps=500 (repeatable)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    base = to_dict(fast_config() if args.fast else FrankToyConfig())
    cfg = from_dict(FrankToyConfig, apply_overrides(base, args.overrides), where="frank_toy")
    doc = run(cfg, Path(args.out), Path(args.results) if args.results else None)
    print((Path(args.out) / "frank_toy.md").read_text())
    return 0 if doc else 1
