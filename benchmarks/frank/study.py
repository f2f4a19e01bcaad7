"""FRANK end to end at toy scale (issue 8), run by ``python benchmarks/frank_toy.py``.

Stages, each in its own folder under ``--out`` and reused when its config hash (which includes the
hashes of the stages it reads) matches the one recorded in its ``stage.json``:

1. ``base``      theta_0 pre-trained from scratch on text of both domains (parts.pretrain_base);
                 its tokenizer is built from both generators' vocabulary texts.
2. ``reasoner``  theta_R = theta_0 fine-tuned on arithmetic chains.
3. ``mllm``      theta_V = ViT + projector + copy of theta_0, trained on ShapesWorld: align (LLM frozen),
                 then tune (LLM at a low rate).
4. ``probe``     per-layer visual attention share of theta_V (FRANK's prior, Wei & Chen 2025, arXiv 2505.16151, §3.2.3), JSON + plot;
                 then the parents are evaluated and FRANK's assumptions measured (``properties.json``).
5. ``merges/*``  theta_V's LLM blocks with theta_R over theta_0 through ``mllm merge`` YAML; vision
                 tower, projector, embeddings and final norm from theta_V (frozen = theta_0's in both
                 fine-tunes): FRANK (fitted prior, sum / max normalisation), FRANK without prior
                 (Eq. 13), task arithmetic (lambda grid), TIES, linear, layer swapping, LiNeS.
6. ``evals/*``   ShapesWorld VQA + grounding, arithmetic (text only), compositional, per model.
7. report        frank_toy.json / .md (+ plots) in ``--out`` and, with ``--results``, copied there.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from common.atomic import atomic_write
from mllm.config import from_dict, to_dict
from train.data.arithmetic import Arithmetic, ArithmeticConfig
from train.data.shapesworld import ShapesWorld
from train.data.tokenizer import build_tokenizer
from train.templates import get_template
from train.trainer import TrainConfig

from .config import (
    PROBE_QUESTION,
    FrankToyConfig,
    base_corpus,
    data_config,
    fast_config,
    mllm_run_configs,
    train_config,
)
from .parts import finetune_reasoner, pretrain_base, probe_batches, train_mllm
from .report import evaluate, properties, report

log = logging.getLogger("frank_toy")
STAGE_FILE = "stage.json"


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
        "frank_share": {"merge_method": "frank", "base_model": b, "models": [v, r],
                        "parameters": {"prior": str(probe), "prior_norm": "share"}},
        "frank_linear": {"merge_method": "frank", "base_model": b, "models": [v, r], "parameters": {"prior": "linear"}},
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
    tokenizer = build_tokenizer([*ShapesWorld(data_config(cfg)).vocabulary_texts(),
                                 *Arithmetic(ArithmeticConfig()).vocabulary_texts(),
                                 *get_template("plain").vocabulary_texts()])
    train = from_dict(TrainConfig, train_config(cfg, cfg.base_steps, cfg.base_lr), where="frank_toy.base")
    pretrain_base(tokenizer, cfg.llm, base_corpus(cfg), train, folder / "model", cfg.max_length)


def build_reasoner(cfg: FrankToyConfig, base: Path, folder: Path) -> None:
    data = Arithmetic(ArithmeticConfig(seed=cfg.seed, train_size=cfg.reasoner_steps * cfg.batch_size)).split("train")
    train = from_dict(TrainConfig, train_config(cfg, cfg.reasoner_steps, cfg.reasoner_lr), where="frank_toy.reasoner")
    finetune_reasoner(base, data, train, folder / "model", cfg.max_length)


def build_probe(cfg: FrankToyConfig, mllm: Path, folder: Path) -> None:
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

    torch.set_num_threads(cfg.threads)
    t0 = time.perf_counter()
    stages = Stages(out)
    conf = to_dict(cfg)
    model_keys = {k: conf[k] for k in ("seed", "llm", "max_length", "batch_size")}
    base, hb = stages.run("base", {**model_keys, "steps": cfg.base_steps, "lr": cfg.base_lr,
                                   "scenes": cfg.base_scenes, "arith": cfg.base_arithmetic,
                                   "direct": cfg.base_direct_answers, "image": cfg.encoder["image_size"],
                                   **({"scene_text": True} if cfg.base_scene_text else {})},
                          lambda f: build_base(cfg, f))
    base = base / "model"
    reasoner, hr = stages.run("reasoner", {"base": hb, "steps": cfg.reasoner_steps, "lr": cfg.reasoner_lr},
                              lambda f: build_reasoner(cfg, base, f))
    reasoner = reasoner / "model"
    mllm_key = {"base": hb, "encoder": cfg.encoder, "steps": cfg.mllm_steps, "lr": cfg.mllm_lr,
                "align_steps": cfg.mllm_align_steps, "llm_lr": cfg.mllm_llm_lr, "images": cfg.train_images,
                "model": cfg.mllm_model, "data": cfg.mllm_data, "batch": cfg.mllm_batch_size}
    if cfg.mllm_lora is not None:  # only when set: the full-tune theta_V cached before the option stays valid
        mllm_key["lora"] = cfg.mllm_lora
    mllm, hv = stages.run("mllm", mllm_key, lambda f: train_mllm_stage(cfg, base, f))
    mllm = mllm / "model"
    probe, hp = stages.run("probe", {"mllm": hv, "images": cfg.probe_images, "q": PROBE_QUESTION},
                           lambda f: build_probe(cfg, mllm, f))
    # theta_0 is scored too: whatever it already does, the fine-tunes cannot be credited with
    models: dict[str, tuple[Path, str]] = {"base": (base, hb), "mllm": (mllm, hv), "reasoner": (reasoner, hr)}
    # FRANK's assumptions, measured on the parents before anything is merged
    props = properties(cfg, out, models, evaluate(cfg, stages, models))
    log.info("properties of theta_0 / theta_V / theta_R: %s", json.dumps(props["checks"]))
    for name, spec in merge_specs(cfg, base, mllm, reasoner, probe / "probe.json").items():
        folder, h = stages.run(f"merges/{name}", {"spec": spec, "inputs": [hb, hv, hr, hp]},
                               lambda f, s=spec: build_merge(s, mllm, f))
        models[name] = (folder / "model", h)
    scores = evaluate(cfg, stages, models)
    doc = report(cfg, out, models, scores, stages.seconds, time.perf_counter() - t0, results)
    return doc


def train_mllm_stage(cfg: FrankToyConfig, base: Path, folder: Path) -> None:
    train_mllm(mllm_run_configs(cfg, base), folder / "model")


def main(argv: list[str] | None = None) -> int:
    """``python benchmarks/frank_toy.py``: run, print the Markdown table."""
    import argparse

    from mllm.config import apply_overrides

    p = argparse.ArgumentParser(prog="benchmarks/frank_toy.py", description=__doc__.splitlines()[0])
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
