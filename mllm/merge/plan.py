"""Merge YAML (mergekit style) -> a validated :class:`MergePlan`, checked before any tensor is read.

Accepted keys (mergekit's names where mergekit has them)::

    merge_method: ties                  # a name in mllm.registry.MERGE_METHODS
    base_model: /models/base            # required by task-vector methods
    models:
      - model: /models/a                # local HF folder (safetensors); the string is the model id
        parameters: {weight: 0.5, density: 0.5}
      - model: /models/b
        parameters:
          weight: [{filter: "self_attn", value: 0.7}, {value: 0.3}]   # per-module values, regex filter
    parameters: {normalize: true, lambda: 1.0, int8_mask: true}       # shared values / model defaults
    dtype: bfloat16                     # output dtype (deltas are always computed in fp32)
    out_dtype: bfloat16                 # overrides dtype for the output, as in mergekit
    tokenizer_source: base              # 'base', or a folder; default: the reference model's tokenizer
    # mllm extensions
    reference_model: /models/mllm       # output names, config, unmerged tensors (default per method)
    name_map: llava                     # preset or {regex: replacement}: reference name -> LLM name
    include: ['^model\\.layers\\.']     # merge only tensors matching one of these (default: all)
    exclude: ['embed_tokens', 'lm_head']  # ...and none of these; the rest is copied from the reference
    layer_pattern: '^model\\.layers\\.(\\d+)\\.'   # decoder-layer index, matched on mapped names
    seed: 0                             # DARE masks: seeded per (seed, tensor name)
    shard_size: 5GB                     # bytes per output shard (KB/MB/GB decimal, KiB/MiB/GiB binary)

:func:`plan_tensors` then checks, from the safetensors headers and config.json files only, that the
models are of one architecture family and that every tensor to merge exists in every input with the
reference shape, naming the first offending tensor / file / field.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mllm.merge.methods.base import MergeMethod, TensorInfo, tensor_seed
from mllm.merge.tensors import DTYPES, MergeError, ModelReader, TensorSpec, tokenizer_files
from mllm.schema import ConfigError, check_value, load_yaml, suggest

NAME_MAP_PRESETS: dict[str, dict[str, str]] = {
    # LLaVA checkpoints as on the hub and as transformers' save_pretrained writes them:
    # language_model.model.layers.* / language_model.lm_head.*
    "llava": {r"^language_model\.": ""},
    # transformers' in-memory LLaVA names (save_original_format=False): model.language_model.* / lm_head.*
    "llava_nested": {r"^model\.language_model\.": "model."},
    # this package's MLLM.save_pretrained: llm.model.layers.* / llm.lm_head.* (encoder.*, projector.* stay)
    "mllm": {r"^llm\.": ""},
}
DEFAULT_LAYER_PATTERN = r"^model\.layers\.(\d+)\."
_TOP_KEYS = (
    "merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "tokenizer_source",
    "reference_model", "name_map", "include", "exclude", "layer_pattern", "seed", "shard_size",
)
_SIZE_UNITS = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}  # powers of 1000 (or of 1024 with "iB")


@dataclass(frozen=True)
class ModelEntry:
    id: str  # the YAML string
    path: Path
    params: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # YAML key -> raw value


@dataclass(frozen=True)
class MergePlan:
    source: Path
    text: str
    method_name: str  # the merge_method key, its one name (mllm.registry.MERGE_METHODS)
    method: type[MergeMethod]
    models: tuple[ModelEntry, ...]  # merged models (the base is not one of them)
    base: ModelEntry | None
    reference: ModelEntry
    params: Mapping[str, Any]  # top-level parameters, YAML key -> raw value
    out_dtype: torch.dtype | None
    tokenizer_source: Path | None
    name_map: tuple[tuple[re.Pattern[str], str], ...]
    include: tuple[re.Pattern[str], ...]
    exclude: tuple[re.Pattern[str], ...]
    layer_pattern: re.Pattern[str]
    seed: int
    shard_bytes: int

    @property
    def inputs(self) -> tuple[ModelEntry, ...]:
        """Models whose tensors a merge reads: the merged models, then the base (if any)."""
        return self.models + ((self.base,) if self.base is not None else ())

    def canonical(self, name: str) -> str:
        """``name`` after the first matching name_map rule (the LLM-side name)."""
        for pattern, repl in self.name_map:
            if pattern.search(name):
                return pattern.sub(repl, name, count=1)
        return name

    def selected(self, name: str) -> bool:
        return (not self.include or any(p.search(name) for p in self.include)) and not any(
            p.search(name) for p in self.exclude
        )

    def params_for(self, name: str | None) -> Any:
        """The method's params dataclass for tensor ``name`` (None: the values without filters)."""
        cls = self.method.config_cls
        kwargs: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            key = f.metadata.get("key", f.name)
            if f.metadata.get("per_model"):
                values = {m.id: m.params.get(key, self.params.get(key, f.metadata["model_default"])) for m in self.models}
                missing = [mid for mid, v in values.items() if v is dataclasses.MISSING]
                if missing:
                    raise MergeError(f"{self.source}: models: parameter {key!r} is required for model {missing[0]!r}")
                kwargs[f.name] = {mid: _pick(v, name) for mid, v in values.items()}
            elif key in self.params:
                kwargs[f.name] = _pick(self.params[key], name)
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise MergeError(f"{self.source}: parameters.{key}: required by merge_method {self.method_name}")
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as err:
            at = f" (tensor {name})" if name else ""
            raise MergeError(f"{self.source}: parameters{at}: {err}") from err


def _pick(value: Any, name: str | None) -> Any:
    """Resolve a conditional value (tuple of (regex | None, value)) for tensor ``name``."""
    if not isinstance(value, tuple):
        return value
    for pattern, v in value:
        if pattern is None or (name is not None and pattern.search(name)):
            return v
    raise AssertionError("conditional values always end with an unfiltered entry")  # checked in _param


# --- YAML -> plan -------------------------------------------------------------------------------
def _coerce(tp: Any, value: Any, where: str) -> Any:
    """``value`` checked against a parameter's annotation by the one validator (:mod:`mllm.schema`); a
    per-model field (``dict[model id, T]``) takes one model's ``T``."""
    if typing.get_origin(tp) is dict:
        tp = typing.get_args(tp)[1]
    try:
        return check_value(tp, value, where)
    except ConfigError as err:
        raise MergeError(str(err)) from err


def _param(tp: Any, value: Any, where: str) -> Any:
    """A scalar, or mergekit's conditional list [{filter: regex, value: x}, ..., {value: default}]."""
    if not isinstance(value, list):
        return _coerce(tp, value, where)
    entries = []
    for i, item in enumerate(value):
        if not isinstance(item, Mapping) or "value" not in item or set(item) - {"filter", "value"}:
            raise MergeError(
                f"{where}[{i}]: expected {{filter: <regex>, value: <x>}} (a list of plain numbers, "
                f"mergekit's layer gradient, is not supported)"
            )
        pattern = _regex(item["filter"], f"{where}[{i}].filter") if "filter" in item else None
        entries.append((pattern, _coerce(tp, item["value"], f"{where}[{i}].value")))
    if not entries or entries[-1][0] is not None:
        raise MergeError(f"{where}: the last entry must have no filter (the value for all other tensors)")
    return tuple(entries)


def _regex(value: Any, where: str) -> re.Pattern[str]:
    if not isinstance(value, str):
        raise MergeError(f"{where}: expected a regex string, got {value!r}")
    try:
        return re.compile(value)
    except re.error as err:
        raise MergeError(f"{where}: invalid regex {value!r}: {err}") from err


def _size(value: Any, where: str) -> int:
    """Bytes from an int or a string such as 500MB, 5GB, 2GiB (not mergekit's parameter counts)."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(?:([KMGT])(i?)B)?\s*", str(value))  # no bare "B": mergekit means params
    if not m or float(m.group(1)) <= 0:
        raise MergeError(f"{where}: expected a size in bytes such as 5GB, 500MB or 2GiB, got {value!r}")
    base = 1024 if m.group(3) else 1000
    return int(float(m.group(1)) * base ** _SIZE_UNITS[m.group(2) or ""])


def _params(cls: type, raw: Any, where: str, per_model: bool) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise MergeError(f"{where}: expected a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.metadata.get("key", f.name): f for f in dataclasses.fields(cls)}
    out = {}
    for key, value in raw.items():
        if key not in fields:
            raise MergeError(f"{where}.{key}: unknown parameter{suggest(str(key), list(fields))} "
                             f"(expected one of: {', '.join(fields)})")
        if per_model and not fields[key].metadata.get("per_model"):
            raise MergeError(f"{where}.{key}: a shared parameter; set it under the top-level 'parameters'")
        out[key] = _param(hints[fields[key].name], value, f"{where}.{key}")
    return out


def _model(item: Any, method: type[MergeMethod], where: str) -> ModelEntry:
    if isinstance(item, str):
        item = {"model": item}
    if not isinstance(item, Mapping) or not isinstance(item.get("model"), str):
        raise MergeError(f"{where}: expected {{model: <folder>, parameters: {{...}}}}")
    if set(item) - {"model", "parameters"}:
        raise MergeError(f"{where}.{sorted(set(item) - {'model', 'parameters'})[0]}: unknown key")
    params = _params(method.config_cls, item.get("parameters"), f"{where}.parameters", per_model=True)
    return ModelEntry(item["model"], Path(item["model"]).expanduser(), params)


def load_plan(path: str | Path) -> MergePlan:
    """Read and validate a merge YAML (no model file is opened)."""
    from mllm.registry import MERGE_METHODS, RegistryError

    src = Path(path)
    if not src.is_file():
        raise MergeError(f"{src}: merge config not found")
    text = src.read_text()
    try:
        data = load_yaml(text, str(src))
    except ConfigError as err:
        raise MergeError(str(err)) from err
    if not isinstance(data, dict):
        raise MergeError(f"{src}: expected a YAML mapping at the top level")
    unknown = sorted(set(data) - set(_TOP_KEYS))
    if unknown:
        raise MergeError(f"{src}: {unknown[0]}: unknown key{suggest(unknown[0], list(_TOP_KEYS))} "
                         f"(expected one of: {', '.join(_TOP_KEYS)})")
    name = str(data.get("merge_method"))
    try:
        method = MERGE_METHODS.get(name)
    except RegistryError as err:
        raise MergeError(f"{src}: merge_method: {err}") from err
    raw_models = data.get("models")
    if not isinstance(raw_models, list) or not raw_models:
        raise MergeError(f"{src}: models: expected a non-empty list of {{model: <folder>}}")
    models = [_model(m, method, f"{src}: models[{i}]") for i, m in enumerate(raw_models)]
    ids = [m.id for m in models]
    if len(set(ids)) != len(ids):
        raise MergeError(f"{src}: models: {next(i for i in ids if ids.count(i) > 1)!r} is listed twice")
    base_id = data.get("base_model")
    if base_id is not None and not isinstance(base_id, str):
        raise MergeError(f"{src}: base_model: expected a folder path string")
    base = ModelEntry(base_id, Path(base_id).expanduser()) if base_id else None
    if method.base == "none" and base is not None:
        raise MergeError(f"{src}: base_model: {name} takes no base model (list it under models, "
                         f"or set reference_model to take names, config and tokenizer from it)")
    if method.base == "required" and base is None:
        raise MergeError(f"{src}: base_model: required by merge_method {name}")
    if base is not None:  # mergekit: the base is no delta, nor listed twice among the inputs
        models = [m for m in models if m.path.resolve() != base.path.resolve()]
    n = len(models)
    if n < method.min_models or (method.max_models is not None and n > method.max_models):
        want = method.min_models if method.max_models == method.min_models else f">= {method.min_models}"
        raise MergeError(f"{src}: models: {name} merges {want} models (besides the base), got {n}")
    ref_id = data.get("reference_model")
    if ref_id is None:
        ref = base if (method.reference == "base" and base is not None) else models[0]
    else:
        ref = next((m for m in (*models, base) if m is not None and m.id == ref_id),
                   ModelEntry(str(ref_id), Path(str(ref_id)).expanduser()))
    dtype_key = "out_dtype" if data.get("out_dtype") is not None else "dtype"
    out_dtype = data.get(dtype_key)
    if out_dtype is not None and out_dtype not in DTYPES:
        raise MergeError(f"{src}: {dtype_key}: expected one of {list(DTYPES)}, got {out_dtype!r}")
    tok = data.get("tokenizer_source")
    if tok == "base":
        if base is None:
            raise MergeError(f"{src}: tokenizer_source: 'base' needs base_model")
        tok = base.id
    name_map = data.get("name_map") or {}
    if isinstance(name_map, str):
        if name_map not in NAME_MAP_PRESETS:
            raise MergeError(f"{src}: name_map: unknown preset {name_map!r}; expected one of {list(NAME_MAP_PRESETS)} or a mapping")
        name_map = NAME_MAP_PRESETS[name_map]
    if not isinstance(name_map, Mapping):
        raise MergeError(f"{src}: name_map: expected a preset name or a mapping {{regex: replacement}}")
    seed = data.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise MergeError(f"{src}: seed: expected an integer, got {seed!r}")
    lists = {}
    for key in ("include", "exclude"):
        val = data.get(key) or []
        if not isinstance(val, list):
            raise MergeError(f"{src}: {key}: expected a list of regexes")
        lists[key] = tuple(_regex(v, f"{src}: {key}[{i}]") for i, v in enumerate(val))
    layer_pattern = _regex(data.get("layer_pattern", DEFAULT_LAYER_PATTERN), f"{src}: layer_pattern")
    if layer_pattern.groups < 1:
        raise MergeError(f"{src}: layer_pattern: needs one capture group for the layer index")
    plan = MergePlan(
        source=src, text=text, method_name=name, method=method, models=tuple(models), base=base, reference=ref,
        params=_params(method.config_cls, data.get("parameters"), f"{src}: parameters", per_model=False),
        out_dtype=DTYPES[out_dtype] if out_dtype else None,
        tokenizer_source=Path(tok).expanduser() if tok else None,
        name_map=tuple((_regex(k, f"{src}: name_map"), str(v)) for k, v in name_map.items()),
        include=lists["include"], exclude=lists["exclude"], layer_pattern=layer_pattern, seed=seed,
        shard_bytes=_size(data.get("shard_size", "5GB"), f"{src}: shard_size"),
    )
    plan.params_for(None)  # required parameters and __post_init__ checks, before any I/O
    return plan


# --- compatibility checks on headers -> per-tensor jobs -----------------------------------------
@dataclass(frozen=True)
class TensorJob:
    spec: TensorSpec  # output name, shape, dtype
    info: TensorInfo
    params: Any | None  # None: copied from the reference model
    sources: Mapping[str, str]  # model id -> that model's tensor name (merged tensors only)


def _text_config(cfg: Mapping[str, Any]) -> Mapping[str, Any]:
    """The language-model part of a config.json (``text_config`` of an MLLM, else the config)."""
    text = cfg.get("text_config")
    return text if isinstance(text, Mapping) else cfg


def _locate(reader: ModelReader, name: str, canonical: str) -> str | None:
    return name if name in reader else canonical if canonical in reader else None


def plan_tensors(plan: MergePlan, readers: Mapping[str, ModelReader]) -> list[TensorJob]:
    """One job per reference tensor; raises MergeError at the first incompatibility."""
    ref = readers[plan.reference.id]
    if plan.tokenizer_source is not None:
        if not plan.tokenizer_source.is_dir():
            raise MergeError(f"{plan.source}: tokenizer_source: folder {plan.tokenizer_source} not found")
        tokenizer_files(plan.tokenizer_source)
    ref_family = _text_config(ref.config).get("model_type")
    for m in plan.inputs:
        fam = _text_config(readers[m.id].config).get("model_type")
        if ref_family and fam and fam != ref_family:
            raise MergeError(
                f"{m.path / 'config.json'}: model_type {fam!r} differs from {ref_family!r} of "
                f"{plan.reference.path / 'config.json'} (models must be of one architecture family)"
            )
    names = ref.names()
    canon = {n: plan.canonical(n) for n in names}
    layer_of = {n: (int(mt.group(1)) if (mt := plan.layer_pattern.search(canon[n])) else None) for n in names}
    num_layers = max((x for x in layer_of.values() if x is not None), default=-1) + 1
    plan.method.validate(plan.params_for(None), [m.id for m in plan.models], num_layers)
    jobs = []
    for n in names:
        shape = ref.shape(n)
        sources = {m.id: _locate(readers[m.id], n, canon[n]) for m in plan.inputs}
        info = TensorInfo(n, layer_of[n], num_layers, tensor_seed(plan.seed, n),
                          complete=all(s is not None for s in sources.values()), shape=shape)
        params = plan.params_for(n)
        floating = ref.dtype(n).is_floating_point
        merged = floating and plan.selected(n) and plan.method.selects(info, params)
        if merged:
            for m in plan.inputs:
                _check_input(plan, readers, m.id, n, canon[n], sources[m.id], shape)
        out_dtype = plan.out_dtype if (plan.out_dtype is not None and floating) else ref.dtype(n)
        jobs.append(TensorJob(TensorSpec(n, shape, out_dtype), info, params if merged else None,
                              {k: v for k, v in sources.items() if v is not None} if merged else {}))
    return jobs


def _check_input(plan: MergePlan, readers: Mapping[str, ModelReader], mid: str, name: str,
                 canonical: str, found: str | None, shape: tuple[int, ...]) -> None:
    reader = readers[mid]
    if found is None:
        also = f" or {canonical!r}" if canonical != name else ""
        raise MergeError(
            f"{reader.path}: tensor {name!r}{also} to merge is missing (model {mid!r}); "
            f"exclude it, or map names with name_map"
        )
    if reader.shape(found) != shape:
        msg = (f"{reader.file_of(found)}: tensor {found!r} has shape {list(reader.shape(found))}, "
               f"the reference {plan.reference.path} has {list(shape)}")
        v_ref = _text_config(readers[plan.reference.id].config).get("vocab_size")
        v_in = _text_config(reader.config).get("vocab_size")
        if v_ref and v_in and v_ref != v_in and shape and shape[0] == v_ref:
            msg += (f"; vocab sizes differ ({v_in} vs {v_ref}): exclude the embedding/lm_head tensors "
                    f"to keep the reference model's, with its tokenizer")
        raise MergeError(msg)
