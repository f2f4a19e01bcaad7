"""The run schema (model, data, training, evaluation), read from recipe YAML and ``--set`` overrides.

Every config is a (nested) dataclass checked by the one validator, :mod:`mllm.schema`, before any
I/O. Registry-named parts (encoder, projector, ...) are written in YAML as ``{name: <registry name>,
<that part's config fields>}`` and held as typed :class:`~mllm.schema.Part` subclasses. An error says
where the bad value came from: the recipe file that wrote the key (through its ``base:`` chain) or
the ``--set`` argument, with the dotted key and, for a mistyped key, the closest valid one.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from common.atomic import atomic_write
from eval.runner import EvalConfig
from mllm.loss import LOSS_REDUCTIONS
from mllm.numbers import NUMBER_INITS
from mllm.registry import AUX_HEADS, ENCODER_FUSIONS, ENCODERS, EVAL_TASKS, INJECTORS, PROJECTORS
from mllm.schema import ConfigError, Part, from_dict, load_yaml, read_yaml, suggest, to_dict
from train.data.llava import LlavaDataConfig
from train.data.shapesworld import ShapesWorldConfig
from train.data.tokenizer import NUMBER_MODES
from train.trainer import TrainConfig

RECIPES_DIR = Path(__file__).parent / "recipes"


class EncoderPart(Part):
    table = ENCODERS


class ProjectorPart(Part):
    table = PROJECTORS


class FusionPart(Part):
    table = ENCODER_FUSIONS  # a fused encoder's fusion: {name: concat | comm | ftz | dbfusion | convgate, ...}


class InjectorPart(Part):
    table = INJECTORS  # LLM-side fusion (mllm/injection): {name: gated_xattn | ffn_embed | pyramid, ...}


class AuxHeadPart(Part):
    table = AUX_HEADS  # a training-only auxiliary loss (mllm/heads): {name: object_heads, ...}


# --- the run schema ----------------------------------------------------------------------------
@dataclass
class LLMConfig:
    path: str | None = None  # local HF folder (config + safetensors); None = random init from `arch`
    model_type: str = "llama"  # transformers model_type used with `arch` when path is None
    arch: dict[str, Any] = field(default_factory=dict)  # AutoConfig.for_model(model_type, **arch)
    attn_implementation: str = "auto"  # auto (flash_attention_2 if flash-attn and CUDA, else sdpa) | sdpa | eager | flash_attention_2
    dtype: str = "float32"


@dataclass
class ModelConfig:
    encoder: EncoderPart
    projector: ProjectorPart
    llm: LLMConfig = field(default_factory=LLMConfig)
    tokenizer: str | None = None  # local tokenizer folder; None = the one trained for the data
    # the trained tokenizer's numbers: digits (a token per digit) | whole (a token per number: a box
    # is four coordinate tokens, train/data/tokenizer.py); ignored with a tokenizer folder
    tokenizer_numbers: str = "digits"
    image_token: str = "<image>"
    template: str = "plain"  # prompt template name (train/templates.py)
    # where a prompt without an <image> marker gets it: before the question (LLaVA) or after it; set from
    # data.image_first when the run trains on ShapesWorld, and saved with the model, so Python prompts match training
    image_first: bool = True
    max_length: int = 192  # tokens per training sample after image expansion
    splice: bool = True  # visual tokens spliced at <image>; false = the sequence holds text only
    injectors: list[InjectorPart] = field(default_factory=list)  # LLM-side fusion, hooked in this order
    loss_reduction: str = "token"  # token (mean over answer tokens) | sample (mean of per-sample means), mllm/loss.py
    # random | sincos: number tokens of a randomly initialised LLM start at a sinusoidal encoding of their value
    # (mllm/numbers.py), so nearby coordinates start nearby
    number_init: str = "random"
    # training-only auxiliary losses, e.g. [{name: object_heads, weight: 1.0}] (mllm/heads): each reads the encoder
    # features it asks for and the batch keys it declares
    aux_heads: list[AuxHeadPart] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.loss_reduction not in LOSS_REDUCTIONS:
            raise ValueError(f"loss_reduction: expected one of {list(LOSS_REDUCTIONS)}, got {self.loss_reduction!r}")
        if self.number_init not in NUMBER_INITS:
            raise ValueError(f"number_init: expected one of {list(NUMBER_INITS)}, got {self.number_init!r}")
        if self.tokenizer_numbers not in NUMBER_MODES:
            raise ValueError(f"tokenizer_numbers: expected one of {list(NUMBER_MODES)}, got {self.tokenizer_numbers!r}")


@dataclass
class RunEvalConfig(EvalConfig):
    """The run's evaluation: the batched runner's settings plus which generated task scores the model
    (built from the run's ``data``) and which of its metrics the periodic evaluation logs."""

    task: str = "shapesworld"  # a generated task of mllm.registry.EVAL_TASKS, built from `data`
    log_metrics: list[str] = field(default_factory=lambda: ["vqa_accuracy", "grounding_accuracy", "per_type"])


@dataclass
class RunConfig:
    model: ModelConfig
    data: ShapesWorldConfig = field(default_factory=ShapesWorldConfig)  # ShapesWorld: eval, and training by default
    train_data: LlavaDataConfig | None = None  # LLaVA JSON / datasets to train on instead (train/data/llava.py)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: RunEvalConfig = field(default_factory=RunEvalConfig)

    def __post_init__(self) -> None:
        for i, head in enumerate(self.model.aux_heads):
            data = AUX_HEADS.get(head.name).data
            if data is not None and self.train_data is not None:
                raise ValueError(f"model.aux_heads[{i}] ({head.name}): its targets come from {data} samples; "
                                 "train_data (LLaVA JSON) has none, so drop one of them")
        fits = [n for n in EVAL_TASKS.names() if EVAL_TASKS.get(n).generated and EVAL_TASKS.config_cls(n) is type(self.data)]
        if self.eval.task not in fits:
            raise ValueError(f"eval.task: expected a task generated from `data` ({', '.join(fits)}), "
                             f"got {self.eval.task!r}")
        for i, spec in enumerate(self.train.eval_tasks):  # refused before any model is built
            if spec.task not in EVAL_TASKS:
                raise ValueError(f"train.eval_tasks[{i}].task: unknown eval task {spec.task!r}"
                                 f"{suggest(spec.task, EVAL_TASKS.names())} (expected one of: "
                                 f"{', '.join(EVAL_TASKS.names())})")


# --- files -------------------------------------------------------------------------------------
def recipe_names() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def resolve_recipe(name_or_path: str) -> Path:
    """A recipe name shipped in ``mllm/recipes`` or a path to a YAML file."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.is_file():  # a folder named like a recipe (a run) is not a config
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        return path
    candidate = RECIPES_DIR / f"{name_or_path}.yaml"
    if not candidate.is_file():
        raise ConfigError(f"unknown recipe {name_or_path!r}{suggest(name_or_path, recipe_names())} "
                          f"(expected one of: {', '.join(recipe_names())}, or a YAML path)")
    return candidate


def apply_overrides(
    data: dict[str, Any], overrides: list[str], origins: dict[str, str] | None = None
) -> dict[str, Any]:
    """Dotted ``key.sub=value`` overrides (values parsed as YAML, :func:`mllm.schema.load_yaml`), on a copy
    of ``data``; ``key[i]`` (or ``key.i``) steps into item ``i`` of a list, e.g.
    ``model.aux_heads[0].weight=0.5``. Each key set is recorded in ``origins`` with its ``--set`` argument."""
    out = json.loads(json.dumps(data))
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item}: expected KEY=VALUE with a dotted key, e.g. train.steps=100")
        parts = re.sub(r"\[(\d+)\]", r".\1", key).split(".")
        node: Any = out
        for depth, part in enumerate(parts):
            last = depth == len(parts) - 1
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(f"--set {item}: {'.'.join(parts[:depth]) or key} is a list of {len(node)}; "
                                      f"expected an index below {len(node)}, got {part!r}")
                index: Any = int(part)
            elif isinstance(node, dict):
                index = part
                if not last:
                    node.setdefault(part, {})
            else:
                raise ConfigError(f"--set {item}: {'.'.join(parts[:depth])} is not a mapping in the config")
            if last:
                node[index] = load_yaml(raw, f"--set {item}")
            else:
                node = node[index]
        if origins is not None:
            dotted = ".".join(p for p in parts if not p.isdigit())
            origins.update(dict.fromkeys(_paths(load_yaml(raw, f"--set {item}"), dotted), f"--set {item}"))
    return out


def _paths(value: Any, prefix: str) -> list[str]:
    """The dotted paths of every leaf under ``value`` (a list is one leaf)."""
    if isinstance(value, Mapping) and value:
        return [p for k, v in value.items() for p in _paths(v, f"{prefix}.{k}" if prefix else str(k))]
    return [prefix]


def blame(key: str | None, origins: Mapping[str, str], default: str) -> str:
    """Where the value at dotted ``key`` came from (list indices dropped): the ``--set`` arguments that
    wrote into it, else the source recorded for its longest prefix, else ``default`` (a key no file
    wrote, e.g. a missing required one)."""
    if not key:
        return default
    parts = re.sub(r"\[\d+\]", "", key).split(".")
    dotted = ".".join(parts)
    overrides = sorted({s for k, s in origins.items() if k.startswith(f"{dotted}.") and s.startswith("--set ")})
    if overrides:
        return ", ".join(overrides)
    for n in range(len(parts), 0, -1):
        if (source := origins.get(".".join(parts[:n]))) is not None:
            return source
    return default


def merge_recipe(base: dict[str, Any], child: dict[str, Any]) -> dict[str, Any]:
    """``child`` over ``base``: mappings merge key by key; lists and scalars replace. A part mapping
    whose ``name`` differs from the base's is another part (say ``fused`` for ``timm_vit``), so it
    replaces the base's mapping whole instead of inheriting keys that part does not have."""
    out = dict(base)
    for key, value in child.items():
        old = out.get(key)
        same_part = isinstance(old, dict) and isinstance(value, dict) and value.get("name", old.get("name")) == old.get("name")
        out[key] = merge_recipe(old, value) if same_part else value  # type: ignore[arg-type]
    return out


def read_recipe(
    path: Path, chain: tuple[Path, ...] = (), origins: dict[str, str] | None = None
) -> dict[str, Any]:
    """A recipe file's mapping with its ``base:`` chain resolved (:func:`merge_recipe`).

    ``base: tiny`` (a shipped recipe name, or a YAML path relative to this file) makes the recipe the
    base's configuration plus what it writes itself, so an ablation recipe states only its difference
    and follows every later change of the base. ``origins`` collects, for every dotted key, the file
    that wrote it last (for :func:`blame`).
    """
    chain = (*chain, path.resolve())
    data = read_yaml(path)
    if "base" not in data:
        if origins is not None:
            origins.update(dict.fromkeys(_paths(data, ""), str(path)))
        return data
    base = data.pop("base")
    if not isinstance(base, str):
        raise ConfigError(f"{path}: base: expected a recipe name or a YAML path, got {base!r}")
    relative = path.parent / base
    base_path = resolve_recipe(str(relative) if relative.suffix in (".yaml", ".yml") else base)
    if base_path.resolve() in chain:
        raise ConfigError(f"{path}: base: {base} leads back to {base_path} (a cycle of bases)")
    merged = merge_recipe(read_recipe(base_path, chain, origins), data)
    if origins is not None:
        origins.update(dict.fromkeys(_paths(data, ""), str(path)))
    return merged


def load_config(name_or_path: str, overrides: list[str] | None = None) -> RunConfig:
    """Load a recipe name or YAML path (with its ``base:`` chain) into a validated :class:`RunConfig`."""
    path = resolve_recipe(name_or_path)
    origins: dict[str, str] = {}
    data = apply_overrides(read_recipe(path, origins=origins), overrides or [], origins)
    try:
        return from_dict(RunConfig, data)
    except ConfigError as err:
        raise ConfigError(f"{blame(err.key, origins, str(path))}: {err}", err.key) from err


def save_config(cfg: Any, directory: str | os.PathLike[str], stem: str = "config") -> None:
    """Write the resolved config as YAML and JSON into ``directory``."""
    data = to_dict(cfg)
    atomic_write(Path(directory) / f"{stem}.yaml", yaml.safe_dump(data, sort_keys=False))
    atomic_write(Path(directory) / f"{stem}.json", json.dumps(data, indent=2))
