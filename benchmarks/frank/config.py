"""The FRANK toy experiment's settings and the configs of the parts it trains (no stage runs here).

:class:`FrankToyConfig` is every knob of the experiment (``--set KEY=VALUE`` on the command line);
the functions below turn it into the data, training and model configs that :mod:`.study` runs and
:mod:`.report` evaluates with. This module imports neither of them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mllm.config import RunConfig, from_dict
from train.data.arithmetic import Arithmetic, ArithmeticConfig
from train.data.shapesworld import ShapesWorld, ShapesWorldConfig, first_turn, scene_text
from train.templates import IMAGE_MARKER

TASKS = ("shapesworld", "arithmetic", "compositional")
METRICS = ("shapesworld_vqa", "grounding", "arithmetic", "compositional")
PROBE_QUESTION = "How many objects are there?"


@dataclass
class FrankToyConfig:
    seed: int = 0
    llm: dict[str, Any] = field(default_factory=lambda: {
        "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 8, "num_attention_heads": 4,
        "num_key_value_heads": 4, "max_position_embeddings": 192, "tie_word_embeddings": True})
    # theta_V's vision side is the `tiny` recipe's (conv stem, object heads): its LLM is theta_0's copy
    encoder: dict[str, Any] = field(default_factory=lambda: {
        "name": "timm_vit", "model_name": "vit_tiny_patch16_224", "image_size": 64, "patch_size": 16,
        "embed_dim": 128, "depth": 4, "num_heads": 4, "layers": [-1], "stem": "conv", "stem_width": 32})
    mllm_model: dict[str, Any] = field(default_factory=lambda: {  # theta_V's other model keys (mllm.config)
        "aux_heads": [{"name": "object_heads", "weight": 1.0}], "loss_reduction": "sample"})
    # theta_V's training data (ShapesWorldConfig): the `tiny` recipe's mix -- question before the image (every
    # visual token reads the question), half the turns grounding, relative position 6x
    mllm_data: dict[str, Any] = field(default_factory=lambda: {
        "questions_per_image": 1, "grounding_fraction": 0.5, "question_mix": {"relpos": 6}, "image_first": False})
    # theta_0 is pre-trained until its loss flattens (the report shows the curve): FRANK's strong common ancestor
    base_steps: int = 4000
    base_lr: float = 1e-3
    base_scenes: int = 2000  # ShapesWorld scenes whose Q/A become pre-training text
    # each Q/A with its scene in words where theta_V's image goes (shapesworld.scene_text), so the answer follows
    # from the text, as a pre-trained LLM's answers follow from what it reads; without it every colour (shape,
    # yes/no, direction) word sits in the same contexts with the same odds (benchmarks/results/frank_toy_notes.md)
    base_scene_text: bool = True
    base_arithmetic: int = 6000  # one-step facts (and as many direct-answer problems with base_direct_answers)
    # off: theta_0 sees single operations only, so a multi-step problem needs the chain that theta_R learns
    # (with them, a 128 x 8 theta_0 answered the test problems directly, 0.96, and theta_R had nothing to add)
    base_direct_answers: bool = False
    reasoner_steps: int = 1200  # theta_R: a small move at a low rate
    reasoner_lr: float = 3e-4
    # theta_V LLaVA-style (Liu et al., 2023, arXiv 2304.08485, §4.2): first the vision side alone with the LLM
    # frozen (align), then everything with the LLM at a low rate (tune), so tau_V stays a small move
    # The LLM at tiny's rate: at 1e-4 for 2,000 steps theta_V reached VQA 0.468 / grounding 0.20 (1e-4 moved each
    # block by only 0.3-0.5 % of its squared norm, far less than theta_R's 2-3 %); the align loss is flat after 500
    mllm_align_steps: int = 500
    mllm_steps: int = 3000  # the tune phase: tiny's step budget
    mllm_lr: float = 5e-4
    mllm_batch_size: int = 64
    mllm_llm_lr: float | None = 5e-4  # the LLM's learning rate in the tune phase (None: mllm_lr)
    # LoRA on the LLM in the tune phase, merged back when theta_V is saved (train.lora: r, alpha, dropout,
    # target_modules): tau_V = (alpha / r) B A per weight is then of rank <= r (Hu et al., 2021, arXiv 2106.09685,
    # Eq. 3), a move bounded by construction, however high the rate; None: the decoder blocks train in full
    mllm_lora: dict[str, Any] | None = None
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
    """Tiny sizes and a few steps: the plumbing test (tests/benchmarks/test_frank_toy.py)."""
    return FrankToyConfig(
        llm={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 2,
             "num_key_value_heads": 2, "max_position_embeddings": 192, "tie_word_embeddings": True},
        encoder={"name": "timm_vit", "model_name": "vit_tiny_patch16_224", "image_size": 64, "patch_size": 16,
                 "embed_dim": 32, "depth": 1, "num_heads": 2, "layers": [-1]},
        base_steps=6, base_scenes=16, base_arithmetic=64, reasoner_steps=4, mllm_align_steps=2, mllm_steps=4,
        train_images=64,
        batch_size=8, mllm_batch_size=8, eval_scenes=3, eval_arithmetic=4, eval_batch_size=16, probe_images=4,
        ta_lambdas=[0.5, 1.0], threads=1,
    )


# --- configs of the parts ------------------------------------------------------------------------
def data_config(cfg: FrankToyConfig) -> ShapesWorldConfig:
    """The scenes of every stage; prompts laid out as theta_V trains (``mllm_data.image_first``), so the
    evaluations ask every model with the layout theta_V learnt (the question/answer texts do not depend on it)."""
    return ShapesWorldConfig(seed=cfg.seed, image_size=cfg.encoder["image_size"], train_images=cfg.train_images,
                             val_images=max(cfg.probe_images, 1), test_images=cfg.eval_scenes,
                             image_first=cfg.mllm_data.get("image_first", True))


def train_config(cfg: FrankToyConfig, steps: int, lr: float, batch_size: int | None = None) -> dict[str, Any]:
    batch_size = batch_size or cfg.batch_size
    return {"steps": steps, "batch_size": batch_size, "micro_batch_size": batch_size, "lr": lr,
            "warmup_steps": max(1, steps // 20), "seed": cfg.seed, "log_every": max(1, steps // 10)}


def mllm_run_configs(cfg: FrankToyConfig, base: Path) -> list[RunConfig]:
    """theta_V's phases in order: align (LLM frozen; skipped at 0 steps), then tune (LLM at ``mllm_llm_lr``)."""
    model = {"encoder": cfg.encoder, "projector": {"name": "mlp"}, "tokenizer": str(base),
             "llm": {"path": str(base), "attn_implementation": "sdpa"}, "template": "plain",
             "max_length": cfg.max_length, **cfg.mllm_model}
    data = {**dataclasses.asdict(data_config(cfg)), **cfg.mllm_data}
    tune = {"trainable": ["encoder", "projector", "llm"],
            "lr_groups": {} if cfg.mllm_llm_lr is None else {"llm": cfg.mllm_llm_lr}}
    if cfg.mllm_lora is not None:
        tune["lora"] = cfg.mllm_lora
    phases = [("align", cfg.mllm_align_steps, {"trainable": ["encoder", "projector"]}),
              ("tune", cfg.mllm_steps, tune)]
    return [from_dict(RunConfig, {"model": model, "data": data, "train": {
        **train_config(cfg, steps, cfg.mllm_lr, cfg.mllm_batch_size), **plan}},
        where=f"frank_toy.mllm.{name}") for name, steps, plan in phases if steps > 0]


def base_corpus(cfg: FrankToyConfig) -> list[str]:
    """ShapesWorld Q/A as text (``base_scene_text``: with the scene in words, laid out as theta_V's image will be),
    one-step arithmetic facts, and (``base_direct_answers``) direct-answer arithmetic questions."""
    data = dataclasses.replace(data_config(cfg), seed=cfg.seed + 1, train_images=cfg.base_scenes)
    texts = []
    for s in ShapesWorld(data).split("train"):
        for it in s["items"]:
            question = it["question"]
            if cfg.base_scene_text:
                question = first_turn(question, data.image_first).replace(IMAGE_MARKER, scene_text(s["objects"]))
            texts.append(f"USER: {question} ASSISTANT: {it['answer']}")
    arith = Arithmetic(ArithmeticConfig(seed=cfg.seed + 1, train_size=cfg.base_arithmetic))
    texts += arith.statements(cfg.base_arithmetic)
    if cfg.base_direct_answers:
        texts += [f"USER: {p['items'][0]['question']} ASSISTANT: {p['answer']}" for p in arith.split("train")]
    return texts
