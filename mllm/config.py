"""Dataclass configs, loaded from / saved to YAML; one schema, validated before any I/O.

Every config is a (nested) dataclass. ``from_dict`` checks unknown keys and value types and names
the offending dotted key in its error. Registry-named parts (encoder, projector, ...) are written in
YAML as ``{name: <registry name>, <that part's config fields>}`` and held as :class:`Part`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from common.atomic import atomic_write
from common.errors import UserError
from eval.runner import EvalConfig
from mllm.loss import LOSS_REDUCTIONS
from mllm.numbers import NUMBER_INITS
from mllm.object_heads import ObjectHeadsConfig
from train.data.llava import LlavaDataConfig
from train.data.shapesworld import ShapesWorldConfig
from train.data.tokenizer import NUMBER_MODES
from train.trainer import TrainConfig

RECIPES_DIR = Path(__file__).parent / "recipes"


class ConfigError(UserError, ValueError):
    """A config value or file is wrong; the message names the file and the dotted key."""


# --- generic dataclass <-> dict ----------------------------------------------------------------
def _check(tp: Any, value: Any, where: str) -> Any:
    """Validate ``value`` against annotation ``tp`` and return it (converted where lossless)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check(arg, value, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} matches none of {tp}")
    if origin is typing.Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{where}: expected one of {list(typing.get_args(tp))}, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        (arg,) = typing.get_args(tp)[:1] or (Any,)
        return [_check(arg, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        _, vt = typing.get_args(tp) or (Any, Any)
        return {str(k): _check(vt, v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(tp, type) and issubclass(tp, Part):
        return tp.from_value(value, where)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        return from_dict(tp, value, where)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise TypeError(f"{where}: unsupported annotation {tp!r}")


def from_dict(cls: type, data: Any, where: str = "config") -> Any:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys and wrong types."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping for {cls.__name__}, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"{where}.{unknown[0]}: unknown key for {cls.__name__}; expected one of: {', '.join(fields)}"
        )
    kwargs = {k: _check(hints[k], v, f"{where}.{k}") for k, v in data.items()}
    missing = [
        n for n, f in fields.items()
        if n not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{where}.{missing[0]}: required key is missing")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as err:  # __post_init__ checks
        raise ConfigError(f"{where}: {err}") from err


def to_dict(obj: Any) -> Any:
    """Plain-data view of a config (dataclasses, Parts, lists, dicts)."""
    if isinstance(obj, Part):
        return {"name": obj.name, **to_dict(obj.cfg)}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, Mapping):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


@dataclass
class Part:
    """A registry-named part: ``name`` picks the class, ``cfg`` is that class's config dataclass.

    Subclasses fix ``kind`` (the registry in ``mllm.registry.ALL_REGISTRIES``); a config field typed
    ``EncoderPart`` accepts ``{name: timm_vit, <TimmViTConfig fields>}`` or just ``timm_vit``.
    """

    kind: typing.ClassVar[str] = ""
    name: str
    cfg: Any

    @classmethod
    def from_value(cls, value: Any, where: str) -> Part:
        from mllm.registry import ALL_REGISTRIES, RegistryError

        if isinstance(value, cls):
            return value
        if isinstance(value, str):
            value = {"name": value}
        if not isinstance(value, Mapping) or "name" not in value:
            raise ConfigError(f"{where}: expected a mapping with a 'name' key (a registered {cls.kind})")
        params = {k: v for k, v in value.items() if k != "name"}
        try:
            cfg_cls = ALL_REGISTRIES[cls.kind].config_cls(value["name"])
        except RegistryError as err:
            raise ConfigError(f"{where}.name: {err}") from err
        return cls(value["name"], from_dict(cfg_cls, params, where))


class EncoderPart(Part):
    kind = "encoder"


class ProjectorPart(Part):
    kind = "projector"


class FusionPart(Part):
    kind = "encoder_fusion"  # a fused encoder's fusion: {name: concat | comm | ftz | dbfusion | convgate, ...}


class InjectorPart(Part):
    kind = "injector"  # LLM-side fusion (mllm/injection): {name: gated_xattn | ffn_embed | pyramid, ...}


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
    template: str = "plain"  # prompt template name (train/data/templates.py)
    max_length: int = 192  # tokens per training sample after image expansion
    splice: bool = True  # visual tokens spliced at <image>; false = the sequence holds text only
    injectors: list[InjectorPart] = field(default_factory=list)  # LLM-side fusion, hooked in this order
    loss_reduction: str = "token"  # token (mean over answer tokens) | sample (mean of per-sample means), mllm/loss.py
    # random | sincos: number tokens of a randomly initialised LLM start at a sinusoidal encoding of their value
    # (mllm/numbers.py), so nearby coordinates start nearby
    number_init: str = "random"
    # auxiliary per-patch object classifiers + box regressor on the encoder (mllm/object_heads.py); ShapesWorld
    # training with one encoder patch per grid cell only
    object_heads: ObjectHeadsConfig | None = None

    def __post_init__(self) -> None:
        if self.loss_reduction not in LOSS_REDUCTIONS:
            raise ValueError(f"loss_reduction: expected one of {list(LOSS_REDUCTIONS)}, got {self.loss_reduction!r}")
        if self.number_init not in NUMBER_INITS:
            raise ValueError(f"number_init: expected one of {list(NUMBER_INITS)}, got {self.number_init!r}")
        if self.tokenizer_numbers not in NUMBER_MODES:
            raise ValueError(f"tokenizer_numbers: expected one of {list(NUMBER_MODES)}, got {self.tokenizer_numbers!r}")
        fused_parts(self.encoder, "model.encoder")  # a fused encoder's towers/fusion are checked at load


def fused_parts(part: EncoderPart, where: str) -> tuple[list[EncoderPart], FusionPart] | None:
    """A fused encoder's validated tower and fusion parts (``None`` for a plain encoder).

    ``encoders/fused.py`` keeps them as plain mappings (it may not import this module), so the roof
    checks them here, at config load, and the model builds them from the result.
    """
    towers = getattr(part.cfg, "towers", None)
    if part.name != "fused" or towers is None:
        return None
    built = [EncoderPart.from_value(t, f"{where}.towers[{i}]") for i, t in enumerate(towers)]
    return built, FusionPart.from_value(part.cfg.fusion, f"{where}.fusion")


@dataclass
class RunConfig:
    model: ModelConfig
    data: ShapesWorldConfig = field(default_factory=ShapesWorldConfig)  # ShapesWorld: eval, and training by default
    train_data: LlavaDataConfig | None = None  # LLaVA JSON / datasets to train on instead (train/data/llava.py)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        if self.model.object_heads is not None and self.train_data is not None:
            raise ValueError("model.object_heads: its targets are ShapesWorld's per-cell objects; train_data "
                             "(LLaVA JSON) has none, so drop one of them")


# --- files -------------------------------------------------------------------------------------
def read_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Parse a YAML mapping; any parse error names the file, line and column."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise ConfigError(f"{path}: malformed YAML{at}: {getattr(err, 'problem', err)}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a YAML mapping at the top level, got {type(data).__name__}")
    return data


def recipe_names() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def resolve_recipe(name_or_path: str) -> Path:
    """A recipe name shipped in ``mllm/recipes`` or a path to a YAML file."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        return path
    candidate = RECIPES_DIR / f"{name_or_path}.yaml"
    if not candidate.is_file():
        raise ConfigError(f"unknown recipe {name_or_path!r}; expected one of: {', '.join(recipe_names())} or a YAML path")
    return candidate


def _parse_value(raw: str) -> Any:
    """YAML scalar parsing, plus the exponent floats YAML 1.1 leaves as strings ("1e-3")."""
    value = yaml.safe_load(raw)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Dotted ``key.sub=value`` overrides (values parsed as YAML), on a copy of ``data``."""
    out = json.loads(json.dumps(data))
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected key.sub=value")
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a mapping")
        node[parts[-1]] = _parse_value(raw)
    return out


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


def read_recipe(path: Path, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A recipe file's mapping with its ``base:`` chain resolved (:func:`merge_recipe`).

    ``base: tiny`` (a shipped recipe name, or a YAML path relative to this file) makes the recipe the
    base's configuration plus what it writes itself, so an ablation recipe states only its difference
    and follows every later change of the base.
    """
    chain = (*chain, path.resolve())
    data = read_yaml(path)
    if "base" not in data:
        return data
    base = data.pop("base")
    if not isinstance(base, str):
        raise ConfigError(f"{path}: base: expected a recipe name or a YAML path, got {base!r}")
    relative = path.parent / base
    base_path = resolve_recipe(str(relative) if relative.suffix in (".yaml", ".yml") else base)
    if base_path.resolve() in chain:
        raise ConfigError(f"{path}: base: {base} leads back to {base_path} (a cycle of bases)")
    return merge_recipe(read_recipe(base_path, chain), data)


def load_config(name_or_path: str, overrides: list[str] | None = None) -> RunConfig:
    """Load a recipe name or YAML path (with its ``base:`` chain) into a validated :class:`RunConfig`."""
    path = resolve_recipe(name_or_path)
    data = apply_overrides(read_recipe(path), overrides or [])
    try:
        return from_dict(RunConfig, data, where=str(path))
    except ConfigError as err:
        msg = str(err)
        raise ConfigError(msg if msg.startswith(str(path)) else f"{path}: {msg}") from err


def save_config(cfg: Any, directory: str | os.PathLike[str], stem: str = "config") -> None:
    """Write the resolved config as YAML and JSON into ``directory``."""
    data = to_dict(cfg)
    atomic_write(Path(directory) / f"{stem}.yaml", yaml.safe_dump(data, sort_keys=False))
    atomic_write(Path(directory) / f"{stem}.json", json.dumps(data, indent=2))
