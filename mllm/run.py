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

from common.atomic import atomic_write
from mllm.config import ConfigError, RunConfig, load_config, save_config

log = logging.getLogger("mllm")


def build_tokenizer_for(cfg: RunConfig, train_data: Any = None) -> Any:
    """The configured local tokenizer folder, or a word-level one trained on the closed vocabulary of
    the run's evaluation task (``eval.task`` built from ``data``), its template and the texts of
    ``train_data`` when it can list them."""
    if cfg.model.tokenizer is not None:
        from transformers import AutoTokenizer

        path = Path(cfg.model.tokenizer)
        if not path.is_dir():
            raise ConfigError(f"model.tokenizer: {path} is not a folder")
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    from train.data.tokenizer import build_tokenizer
    from train.templates import get_template

    if cfg.model.template == "chat":
        raise ConfigError("model.template: chat reads the tokenizer's chat template; set model.tokenizer to its folder")
    if train_data is not None and not hasattr(train_data, "vocabulary_texts"):
        raise ConfigError("model.tokenizer: a streamed train_data cannot be scanned for a vocabulary; give a tokenizer folder")
    template = get_template("plain" if cfg.model.template == "auto" else cfg.model.template)
    data_texts = train_data.vocabulary_texts() if train_data is not None else []
    texts = [*eval_task(cfg).vocabulary_texts(), *template.vocabulary_texts(), *data_texts]
    return build_tokenizer(texts, numbers=cfg.model.tokenizer_numbers)


def eval_task(cfg: RunConfig, split: str = "test") -> Any:
    """The run's generated evaluation task (``eval.task``, e.g. ShapesWorld) on ``split`` of ``data``."""
    from mllm.registry import EVAL_TASKS

    return EVAL_TASKS.build(cfg.eval.task, cfg.data, split=split)


def build_model(cfg: RunConfig, tokenizer: Any) -> Any:
    """The run's model; trained on ShapesWorld, it records the data's prompt order (``data.image_first``)
    so that its own ``generate`` asks as training did."""
    import dataclasses

    from mllm.model import MLLM

    model_cfg = cfg.model if cfg.train_data is not None else dataclasses.replace(cfg.model, image_first=cfg.data.image_first)
    return MLLM(model_cfg, tokenizer)


def freeze(model: Any, cfg: RunConfig) -> dict[str, tuple[int, int]]:
    """Apply the run's stage (train/stages.py): LoRA adapters on the LLM when configured, then the
    trainable groups; ``MLLM.set_trainable`` logs the trainable / frozen table."""
    groups = cfg.train.groups()
    if "fusion" in groups and getattr(model.encoder, "fusion", None) is None:
        groups.remove("fusion")  # a stage trains "projector (+ fusion)": this encoder has no fusion
    if cfg.train.lora is not None:
        lora = cfg.train.lora
        model.add_lora(lora.r, lora.alpha, lora.dropout, lora.target_modules)
    return model.set_trainable(groups)


def load_weights(model: Any, folder: Path) -> None:
    """Every tensor of a saved model (``save_pretrained``'s folder: one file or shards) into ``model``: how a
    stage starts from the previous one. The architectures must match exactly; LoRA is added after this."""
    from safetensors.torch import _remove_duplicate_names, load_file

    from mllm.model import INDEX_FILE, WEIGHTS_FILE

    index = folder / INDEX_FILE
    files = [folder / WEIGHTS_FILE]
    if index.is_file():
        try:
            files = [folder / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise ConfigError(f"train.init_from: {index}: malformed index (expected a 'weight_map' mapping)") from err
    for file in files:
        if not file.is_file():
            raise ConfigError(f"train.init_from: {file} not found (expected a folder written by save_pretrained)")
    state: dict[str, Any] = {}
    for file in files:
        state.update(load_file(str(file)))
    # as safetensors' load_model: a tied duplicate stored once (lm_head = embeddings) is not missing
    tied = _remove_duplicate_names(model.state_dict(), preferred_names=list(state))
    aliases = {name for group in tied.values() for name in group}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # a shape mismatch
        raise ConfigError(f"train.init_from: {folder} does not fit this model's architecture: {err}") from err
    missing = [k for k in missing if k not in aliases]
    if missing or unexpected:
        raise ConfigError(f"train.init_from: {folder} does not fit this model's architecture: "
                          f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    log.info("initialised from %s (%d file%s)", folder, len(files), "" if len(files) == 1 else "s")


def load_train_data(cfg: RunConfig) -> Any:
    """``train_data`` (LLaVA JSON / datasets) when configured, else ShapesWorld's train split."""
    if cfg.train_data is not None:
        from train.data.llava import load_llava

        return load_llava(cfg.train_data)
    from train.data.shapesworld import ShapesWorld

    return ShapesWorld(cfg.data).split("train")


def make_collator(model: Any, cfg: RunConfig) -> Any:
    """The training collator, also collating each auxiliary head's targets from the run's data."""
    from train.data.collate import Collator

    m = cfg.model
    targets = [head.sample_targets(cfg.data) for head in model.aux_heads]
    return Collator(model.tokenizer, m.template, m.image_token, model.num_image_tokens, model.preprocess, m.max_length,
                    image_targets=targets)


def train(
    recipe: str, out_dir: Path, overrides: list[str], resume: str | None = None, evaluate: bool = True
) -> dict[str, Any]:
    """Train ``recipe`` into ``out_dir`` (config, tensorboard, checkpoints, final ``model/``)."""
    from accelerate.utils import set_seed

    from mllm.evaluation import with_eval_tasks
    from train.trainer import Trainer

    cfg = load_config(recipe, overrides)  # validated before any I/O
    data = load_train_data(cfg)
    tokenizer = build_tokenizer_for(cfg, data if cfg.train_data is not None else None)
    set_seed(cfg.train.seed)  # the random init is a function of the config, in every process and run
    model = build_model(cfg, tokenizer)
    if cfg.train.init_from is not None:
        load_weights(model, Path(cfg.train.init_from))
    freeze(model, cfg)
    if cfg.train.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    lengths = data.lengths(model.num_image_tokens) if cfg.train.group_by_length and hasattr(data, "lengths") else None
    eval_fn = with_eval_tasks(model, cfg, out_dir, _periodic_eval(model, cfg, out_dir) if cfg.train.eval_every else None)
    collator = make_collator(model, cfg)
    trainer = Trainer(model, data, collator, cfg.train, out_dir, eval_fn=eval_fn, lengths=lengths)
    # Written only now: a run that fails while its data, model or trainer are set up leaves no config
    # behind that would make --out look like a started run.
    out_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out_dir)
    t0 = time.perf_counter()
    history = trainer.fit(resume=resume)
    train_seconds = time.perf_counter() - t0
    result: dict[str, Any] = {"train_seconds": train_seconds, "history": history,
                              "skipped_samples": collator.skipped}
    model = _full_model(trainer, cfg, tokenizer)
    if not trainer.accelerator.is_main_process:  # one process writes the model and evaluates
        return result
    model.save_pretrained(out_dir / "model")  # LoRA adapters are merged into the weights here
    if evaluate:
        result["eval"] = evaluate_model(model, cfg, out_dir / "eval")
    atomic_write(out_dir / "train_summary.json", json.dumps(result, indent=2))
    return result


def _full_model(trainer: Any, cfg: RunConfig, tokenizer: Any) -> Any:
    """The trained model, whole: under FSDP every process holds a shard, so the full state dict is
    gathered (a collective: all processes call this) into a fresh copy on the main process."""
    from accelerate.utils import DistributedType

    acc = trainer.accelerator
    if acc.distributed_type != DistributedType.FSDP:
        return trainer.unwrapped()
    state = acc.get_state_dict(trainer.model)
    if not acc.is_main_process:
        return None
    model = build_model(cfg, tokenizer)
    freeze(model, cfg)  # the same LoRA wrapping, so the parameter names match
    model.load_state_dict(state)
    return model


def _periodic_eval(model: Any, cfg: RunConfig, out_dir: Path) -> Any:
    """Trainer callback: the evaluation task on the val split, its ``eval.log_metrics`` as scalars."""
    def eval_fn(step: int) -> dict[str, float]:
        metrics = evaluate_model(model, cfg, out_dir / "val" / f"step-{step:07d}", split="val")
        flat = {}
        for key in cfg.eval.log_metrics:  # a mapping of scores (per question type) logs one scalar each
            value = metrics[key]
            flat.update({f"{k}_accuracy": v for k, v in value.items()} if isinstance(value, dict) else {key: value})
        return flat

    return eval_fn


def evaluate_model(
    model: Any, cfg: RunConfig, out_dir: Path, resume: bool = False, split: str = "test"
) -> dict[str, Any]:
    """The run's evaluation task on ``split`` through the batched runner; returns the metrics dict."""
    from eval.runner import run_task

    model.eval()
    return run_task(model, eval_task(cfg, split), cfg.eval, out_dir, resume=resume, progress=False)


def evaluate_checkpoint(
    checkpoint: Path, task: str, out_dir: Path, *, data: str | None = None, images: str | None = None,
    options: list[str] | None = None, batch_size: int | None = None, max_new_tokens: int | None = None,
    limit: int | None = None, resume: bool = False, skip_bad: bool = False, device: str | None = None,
    dtype: str | None = None, device_map: str | None = None,
) -> dict[str, Any]:
    """``mllm eval --task NAME``: a saved checkpoint on one registered task, resumable, written to ``out_dir``.

    The model is loaded onto ``device`` in ``dtype`` (defaults: CUDA when available, else CPU; the
    checkpoint's dtype), or spread over devices with ``device_map="auto"``; the device type and dtype used
    are recorded in ``protocol.json`` and the metrics' ``protocol`` (see :class:`_Placed`), so a resumed run
    must use the same.

    ``checkpoint`` is one of our folders or any transformers image-text-to-text folder
    (:func:`mllm.hf_native.load_generator` picks by what it holds). The task is built by
    :func:`mllm.evaluation.build_eval_task` from ``data``, ``images`` and ``options`` (``key=value``).
    """
    from eval.runner import run_task
    from mllm.config import apply_overrides
    from mllm.evaluation import build_eval_task, checkpoint_scenes
    from mllm.hf_native import load_generator

    _check_model_folder(checkpoint)
    built = build_eval_task(task, data, images, apply_overrides({}, options or []),
                            lambda: checkpoint_scenes(checkpoint, task))
    cfg = _eval_config(batch_size, max_new_tokens, limit)
    model = load_generator(checkpoint, device=device, dtype=dtype, device_map=device_map)
    return run_task(model, _Placed(built, placement(model)), cfg, out_dir, resume=resume, skip_bad=skip_bad)


def evaluate_tasks(
    checkpoint: Path, tasks: list[str], out_dir: Path, *, data: list[str] | None = None,
    images: list[str] | None = None, options: list[str] | None = None, batch_size: int | None = None,
    max_new_tokens: int | None = None, limit: int | None = None, resume: bool = False, skip_bad: bool = False,
    device: str | None = None, dtype: str | None = None, device_map: str | None = None,
) -> dict[str, Any]:
    """``mllm eval --tasks a,b``: every task with one model load, each into ``out_dir/NAME`` (resumable as
    :func:`evaluate_checkpoint`), then ``out_dir/results.json`` and ``results.md`` (:mod:`eval.suite`).

    Per-task inputs name their task: ``data`` and ``images`` hold ``TASK=PATH`` items, ``options``
    ``TASK.KEY=VALUE`` items. Every task is built, so every file checked, before the model loads.
    """
    from eval.suite import run_tasks
    from mllm.evaluation import build_eval_task, checkpoint_scenes, per_task_inputs
    from mllm.hf_native import load_generator

    _check_model_folder(checkpoint)
    inputs = per_task_inputs(tasks, data or [], images or [], options or [])
    built = {name: build_eval_task(name, *inputs[name], lambda name=name: checkpoint_scenes(checkpoint, name))
             for name in tasks}
    cfg = _eval_config(batch_size, max_new_tokens, limit)
    model = load_generator(checkpoint, device=device, dtype=dtype, device_map=device_map)
    where = placement(model)
    return run_tasks(model, {name: (_Placed(task, where), cfg) for name, task in built.items()}, out_dir, resume=resume,
                     skip_bad=skip_bad)


def load_run(run_dir: Path) -> tuple[Any, RunConfig]:
    """A trained run folder's model (``RUN/model``, eval mode) and the config it trained with (``RUN/config.yaml``)."""
    from mllm.model import MLLM

    return MLLM.from_pretrained(run_dir / "model").eval(), load_config(str(run_dir / "config.yaml"))


def _check_model_folder(checkpoint: Path) -> None:
    from mllm.hf_native import is_native

    if not (checkpoint / "mllm_config.yaml").is_file() and not is_native(checkpoint):
        raise ConfigError(f"{checkpoint}: not a model folder (no mllm_config.yaml, ours, nor a transformers "
                          "config.json); pass RUN/model")


def _eval_config(batch_size: int | None, max_new_tokens: int | None, limit: int | None) -> Any:
    """The runner's settings: the flags given, :class:`eval.runner.EvalConfig`'s defaults for the rest."""
    from eval.runner import EvalConfig
    from mllm.config import from_dict

    defaults = EvalConfig()
    return from_dict(EvalConfig, {
        "batch_size": batch_size or defaults.batch_size,
        "max_new_tokens": max_new_tokens or defaults.max_new_tokens,
        "limit": limit,
    }, where="eval")


def placement(model: Any) -> dict[str, str]:
    """``{"device": "cuda" | "cpu" | ..., "dtype": "bfloat16" | ...}`` of a loaded model (the LLM's dtype for
    ours, whose encoder may be kept in another)."""
    dtype = getattr(model, "dtype", None) or model.llm.dtype
    return {"device": model.device.type, "dtype": str(dtype).removeprefix("torch.")}


class _Placed:
    """An eval task whose protocol also names where the model ran: ``eval/`` knows no devices, so the roof
    adds them to what ``protocol.json`` and ``metrics.json`` record. Everything else is the task's."""

    def __init__(self, task: Any, where: dict[str, str]) -> None:
        self._task, self._where = task, where

    def __getattr__(self, name: str) -> Any:
        return getattr(self._task, name)

    def protocol(self) -> dict[str, Any]:
        return {**self._task.protocol(), **self._where}


def chat(checkpoint: Path, image: Path, question: str, max_new_tokens: int = 64, device: str | None = None,
         dtype: str | None = None, device_map: str | None = None) -> str:
    """``mllm chat``: one greedy answer of the model in ``checkpoint`` (ours or a transformers folder)
    to ``question`` about ``image``. The image is read before the model loads, so a missing or corrupt
    file costs no load time."""
    from mllm.hf_native import IMAGE_MARKER, load_generator, read_image

    picture = read_image(image)
    model = load_generator(checkpoint, device=device, dtype=dtype, device_map=device_map)
    return model.generate([picture], [f"{IMAGE_MARKER}\n{question}"], max_new_tokens=max_new_tokens)[0]


def demo(recipe: str, out_dir: Path, overrides: list[str]) -> dict[str, Any]:
    """Train the tiny recipe, evaluate on the test split, print the table, write metrics.json."""
    from train.data.shapesworld import ShapesWorld, majority_baseline, split_items

    t0 = time.perf_counter()
    if out_dir.exists() and any(out_dir.iterdir()):
        # Keep the earlier demo (never delete results): it moves aside, this run starts fresh.
        archived = out_dir.with_name(f"{out_dir.name}-{time.strftime('%Y%m%d-%H%M%S')}")
        out_dir.rename(archived)
        log.info("moved the earlier run in %s to %s", out_dir, archived)
    result = train(recipe, out_dir, overrides, evaluate=True)
    cfg = load_config(str(out_dir / "config.yaml"))
    world = ShapesWorld(cfg.data)
    metrics = dict(result["eval"])
    metrics["majority_baseline"] = majority_baseline(
        split_items(world.split("train"), 2000), split_items(world.split("test"))
    )
    metrics["train_seconds"] = result["train_seconds"]
    metrics["wall_seconds"] = time.perf_counter() - t0
    atomic_write(out_dir / "metrics.json", json.dumps(metrics, indent=2))
    print(json.dumps({k: v for k, v in metrics.items() if k != "per_type"}, indent=2))
    return metrics


def probe(
    checkpoint: Path, data: str | None, out_dir: Path, images: str | None = None, limit: int = 256,
    batch_size: int = 16, device: str | None = None, dtype: str | None = None, prompt: str | None = None,
    device_map: str | None = None,
) -> dict[str, Any]:
    """``mllm probe``: per-layer visual attention share of a model over a probe set (FRANK, Wei & Chen 2025,
    arXiv 2505.16151, §3.2.3 and Appendix A.9; :mod:`mllm.merge.probe`).

    Image-only protocol (``images`` a folder and no ``data``), for our checkpoints and transformers'
    image-text-to-text folders alike: the first ``limit`` image files of the folder by name, each with
    the one ``prompt`` (default :data:`mllm.merge.probe.DEFAULT_PROMPT`; the paper probes ~1000 MSCOCO
    val images and does not publish its prompt). Ours builds the prompt as its ``generate`` does (its
    template, the image's token slots spliced as in training); a transformers model through its
    processor's chat template, left-padded (:meth:`mllm.hf_native.NativeMLLM.inputs`).

    Conversations (our checkpoints): ``data`` is ``shapesworld`` (the val split of the run's generator
    settings; the default without ``images``) or a LLaVA JSON file whose image root is ``images``.

    The model is loaded onto ``device`` in ``dtype`` (default: CUDA when available, the checkpoint's
    dtype); ``probe.json`` records the model folder, its kind, the images or data, the prompt, the
    device, the dtype and the batch size beside the shares.
    """
    from mllm.hf_native import image_prompt_batch, load_generator, one_image_prompt, read_image
    from mllm.merge.probe import DEFAULT_PROMPT, image_files, run_probe
    from mllm.model import MLLM

    if data is None and images is not None:
        text = one_image_prompt(DEFAULT_PROMPT if prompt is None else prompt)
        files = image_files(Path(images), limit)  # every image read before the model loads
        model = load_generator(checkpoint, device=device, dtype=dtype, device_map=device_map)
        batches: Any = (image_prompt_batch(model, [read_image(f) for f in files[i:i + batch_size]], text)
                        for i in range(0, len(files), batch_size))
        source = f"{images} ({len(files)} images)"
        protocol: dict[str, Any] = {"images": {"dir": str(images), "count": len(files)}, "prompt": text}
    else:
        if prompt is not None:
            raise ConfigError("--prompt: belongs to the image-only protocol (--images DIR without --data)")
        model, batches, n = _conversation_batches(checkpoint, data or "shapesworld", images, limit, batch_size,
                                                  device, dtype, device_map)
        source = f"{data or 'shapesworld'} ({n} samples)"
        protocol = {"data": data or "shapesworld", "image_root": images, "prompt": None}
    kind = "ours" if isinstance(model, MLLM) else type(model.model).__name__
    protocol = {"model": str(checkpoint), "kind": kind, **protocol, "device": str(model.device),
                "dtype": str(model.llm.dtype).removeprefix("torch."), "batch_size": batch_size}
    return run_probe(model, batches, out_dir, source=source, protocol=protocol)


def _conversation_batches(
    checkpoint: Path, data: str, images: str | None, limit: int, batch_size: int, device: str | None,
    dtype: str | None, device_map: str | None = None,
) -> tuple[Any, Any, int]:
    """Our model in ``checkpoint``, its collated batches of the first ``limit`` samples of ``data``
    (``shapesworld`` or a LLaVA JSON file with image root ``images``) on its device, and their count."""
    from mllm.model import MLLM
    from train.data.collate import Collator

    if not (checkpoint / "mllm_config.yaml").is_file():
        raise ConfigError(f"{checkpoint}: not our checkpoint folder (no mllm_config.yaml; pass RUN/model): "
                          "conversation data probes ours; a transformers folder is probed with --images DIR")
    if data == "shapesworld":
        run_cfg = checkpoint.parent / "config.yaml"
        if not run_cfg.is_file():
            raise ConfigError(f"{run_cfg}: --data shapesworld needs the run config saved next to the checkpoint")
        from train.data.shapesworld import ShapesWorld

        samples: Any = ShapesWorld(load_config(str(run_cfg)).data).split("val")
    else:
        from train.data.llava import LlavaDataConfig, load_llava

        samples = load_llava(LlavaDataConfig(path=data, image_root=images, limit=limit))
    model = MLLM.from_pretrained(checkpoint, device=device, dtype=dtype, device_map=device_map).eval()
    collate = Collator(model.tokenizer, model.template, model.cfg.image_token, model.num_image_tokens,
                       model.preprocess, model.cfg.max_length)
    n = min(limit, len(samples))
    batches = ({k: v.to(model.device) if hasattr(v, "to") else v
                for k, v in collate([samples[i] for i in range(start, min(start + batch_size, n))]).items()}
               for start in range(0, n, batch_size))
    return model, batches, n
