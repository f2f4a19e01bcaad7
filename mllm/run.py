"""What the CLI runs: wire a config to data, model, trainer and evaluation.

``train/`` and ``eval/`` know nothing of :class:`mllm.model.MLLM`; this module is where the roof
hands the model to the trainer (as a loss module) and to the eval runner (as a generator).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from mllm.config import RunConfig, atomic_write_text, load_config, save_config

log = logging.getLogger("mllm")


def build_tokenizer_for(cfg: RunConfig) -> Any:
    """The configured local tokenizer folder, or one trained on ShapesWorld's closed vocabulary."""
    if cfg.model.tokenizer is not None:
        from transformers import AutoTokenizer

        path = Path(cfg.model.tokenizer)
        if not path.is_dir():
            raise FileNotFoundError(f"model.tokenizer: {path} is not a folder")
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    from train.data.shapesworld import ShapesWorld
    from train.data.templates import get_template
    from train.data.tokenizer import build_tokenizer

    texts = [*ShapesWorld(cfg.data).vocabulary_texts(), *get_template(cfg.model.template).vocabulary_texts()]
    return build_tokenizer(texts)


def build_model(cfg: RunConfig, tokenizer: Any) -> Any:
    from mllm.model import MLLM

    return MLLM(cfg.model, tokenizer)


def make_collator(model: Any, cfg: RunConfig) -> Any:
    from train.data.collate import Collator

    m = cfg.model
    return Collator(model.tokenizer, m.template, m.image_token, model.num_image_tokens, model.preprocess, m.max_length)


def train(
    recipe: str, out_dir: Path, overrides: list[str], resume: str | None = None, evaluate: bool = True
) -> dict[str, Any]:
    """Train ``recipe`` into ``out_dir`` (config, tensorboard, checkpoints, final ``model/``)."""
    from train.data.shapesworld import ShapesWorld
    from train.trainer import Trainer

    cfg = load_config(recipe, overrides)  # validated before any I/O
    out_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out_dir)
    tokenizer = build_tokenizer_for(cfg)
    model = build_model(cfg, tokenizer)
    model.set_trainable(cfg.train.trainable)
    world = ShapesWorld(cfg.data)
    eval_fn = _periodic_eval(model, cfg, out_dir) if cfg.train.eval_every else None
    trainer = Trainer(model, world.split("train"), make_collator(model, cfg), cfg.train, out_dir, eval_fn=eval_fn)
    t0 = time.perf_counter()
    history = trainer.fit(resume=resume)
    train_seconds = time.perf_counter() - t0
    model = trainer.unwrapped()
    model.save_pretrained(out_dir / "model")
    result: dict[str, Any] = {"train_seconds": train_seconds, "history": history}
    if evaluate:
        result["eval"] = evaluate_model(model, cfg, out_dir / "eval")
    atomic_write_text(out_dir / "train_summary.json", json.dumps(result, indent=2))
    return result


def _periodic_eval(model: Any, cfg: RunConfig, out_dir: Path) -> Any:
    """Trainer callback: the val split (``data.val_images`` scenes), flattened to scalars."""
    def eval_fn(step: int) -> dict[str, float]:
        metrics = evaluate_model(model, cfg, out_dir / "val" / f"step-{step:07d}", split="val")
        flat = {"vqa_accuracy": metrics["vqa_accuracy"], "grounding_accuracy": metrics["grounding_accuracy"]}
        flat.update({f"{k}_accuracy": v for k, v in metrics["per_type"].items()})
        return flat

    return eval_fn


def evaluate_model(
    model: Any, cfg: RunConfig, out_dir: Path, resume: bool = False, split: str = "test"
) -> dict[str, Any]:
    """A ShapesWorld split through the batched runner; returns the metrics dict."""
    from eval.runner import run_task
    from eval.tasks.shapesworld import ShapesWorldTask

    task = ShapesWorldTask(cfg.data, split=split)
    model.eval()
    return run_task(model, task, cfg.eval, out_dir, resume=resume, progress=False)


def evaluate_checkpoint(
    checkpoint: Path, task: str, out_dir: Path, batch_size: int | None = None, limit: int | None = None,
    resume: bool = False, overrides: list[str] | None = None,
) -> dict[str, Any]:
    from mllm.model import MLLM

    if task != "shapesworld":
        raise ValueError(f"--task: unknown task {task!r}; expected one of: shapesworld")
    model = MLLM.from_pretrained(checkpoint)
    run_cfg = checkpoint.parent / "config.yaml"
    cfg = load_config(str(run_cfg), overrides or []) if run_cfg.is_file() else None
    if cfg is None:
        raise FileNotFoundError(f"{run_cfg}: the run config next to the checkpoint is needed for the data settings")
    if batch_size is not None:
        cfg.eval.batch_size = batch_size
    if limit is not None:
        cfg.eval.limit = limit
    return evaluate_model(model, cfg, out_dir, resume=resume)


def demo(recipe: str, out_dir: Path, overrides: list[str]) -> dict[str, Any]:
    """Train the tiny recipe, evaluate on the test split, print the table, write metrics.json."""
    from train.data.shapesworld import ShapesWorld, majority_baseline, split_items

    t0 = time.perf_counter()
    result = train(recipe, out_dir, overrides, evaluate=True)
    cfg = load_config(str(out_dir / "config.yaml"))
    world = ShapesWorld(cfg.data)
    metrics = dict(result["eval"])
    metrics["majority_baseline"] = majority_baseline(
        split_items(world.split("train"), 2000), split_items(world.split("test"))
    )
    metrics["train_seconds"] = result["train_seconds"]
    metrics["wall_seconds"] = time.perf_counter() - t0
    atomic_write_text(out_dir / "metrics.json", json.dumps(metrics, indent=2))
    print(json.dumps({k: v for k, v in metrics.items() if k != "per_type"}, indent=2))
    return metrics
