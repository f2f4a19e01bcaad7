"""Merge YAML (mergekit 0.1.x's schema) -> a validated :class:`MergePlan`, checked before any tensor is read.

Accepted keys (mergekit's names and meaning where mergekit has them)::

    merge_method: ties                  # a name in mllm.registry.MERGE_METHODS
    base_model: /models/base            # required by task-vector methods
    models:                             # whole models ...
      - model: /models/a                # a local folder, org/name[@revision] from the local hub cache,
        parameters: {weight: 0.5}       # ... or MODEL+LORA_ADAPTER (peft folder, applied before merging)
    slices:                             # ... or, instead of models, output layers slice by slice
      - sources:
          - {model: /models/base, layer_range: [0, 16]}
          - {model: /models/a, layer_range: [0, 16], parameters: {weight: [0.2, 0.8]}}
        parameters: {density: 0.5}      # this slice's values (base_model: a slice's own base)
    parameters:                         # shared values, and defaults of per-model values
      weight: [{filter: self_attn, value: 0.7}, {value: 0.3}]   # filters are substrings of tensor names
      density: [0.3, 0.5, 0.9]          # a layer gradient, interpolated over each slice's layers
    dtype: bfloat16                     # output dtype (deltas are always computed in fp32)
    out_dtype: bfloat16                 # overrides dtype for the output, as in mergekit
    tokenizer_source: union             # 'base', 'union' or a model; or tokenizer: {source, tokens, pad_to_multiple_of}
    chat_template: chatml               # set in the output's tokenizer_config.json ('auto', a name, Jinja)
    # mllm extensions
    reference_model: /models/mllm       # output names, config, unmerged tensors (default per method)
    name_map: llava                     # preset or {regex: replacement}: reference name -> LLM name; without
                                        # it (and without layer_pattern) found from the reference's config
                                        # and weights (mllm.merge.families)
    include: ['^model\\.layers\\.']     # merge only tensors matching one of these (default: all)
    exclude: ['embed_tokens', 'lm_head']  # ...and none of these; the rest is copied from the reference
    layer_pattern: '^model\\.layers\\.(\\d+)\\.'   # decoder-layer index, matched on mapped names
    seed: 0                             # DARE masks: seeded per (seed, tensor name)
    shard_size: 5GB                     # bytes per output shard (KB/MB/GB decimal, KiB/MiB/GiB binary)

Parameter values (scalars, layer gradients, filter lists) are described in :mod:`mllm.merge.settings`;
a value is looked up, as in mergekit, under the model in its slice, then the slice, then the top
level, then the method's default. :func:`mllm.merge.layout.plan_tensors` then maps slices to tensors
from the safetensors headers and config.json files only.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mllm.merge.hub import ModelRef, parse_ref
from mllm.merge.methods.base import MergeMethod
from mllm.merge.settings import Conditional, Gradient, as_type, evaluate, parse_setting
from mllm.merge.tensors import DTYPES, MergeError
from mllm.merge.tokenizer import TokenizerSpec, parse_chat_template, parse_tokenizer
from mllm.schema import ConfigError, load_yaml, suggest

log = logging.getLogger(__name__)
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
    "merge_method", "base_model", "models", "slices", "parameters", "dtype", "out_dtype", "tokenizer_source",
    "tokenizer", "chat_template",
    "reference_model", "name_map", "include", "exclude", "layer_pattern", "seed", "shard_size",
)
_NOT_YET = {"modules": "per-module merges (mergekit's 'modules:') are not supported yet; use models: or slices:"}
_SIZE_UNITS = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}  # powers of 1000 (or of 1024 with "iB")
_MISSING = dataclasses.MISSING


@dataclass(frozen=True)
class ModelEntry:
    id: str  # the YAML string (MODEL[@REV][+LORA[@REV]])
    path: Path
    params: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # YAML key -> parsed setting
    lora: Path | None = None  # a peft LoRA adapter applied to the model before merging


@dataclass(frozen=True)
class SliceSource:
    model: ModelEntry  # its params: this source's parameters
    layer_range: tuple[int, int]  # [start, end) of the model's decoder layers


@dataclass(frozen=True)
class OutputSlice:
    sources: tuple[SliceSource, ...]  # in YAML order, the base (if listed) included
    base: ModelEntry | None  # the slice's base (a source), for methods that take one
    params: Mapping[str, Any]

    @property
    def merged(self) -> tuple[SliceSource, ...]:
        """The sources that are merged (every one but the base)."""
        return tuple(s for s in self.sources if self.base is None or s.model.id != self.base.id)

    @property
    def num_layers(self) -> int:
        return self.sources[0].layer_range[1] - self.sources[0].layer_range[0]


@dataclass(frozen=True)
class MergePlan:
    source: Path
    text: str
    method_name: str  # the merge_method key, its one name (mllm.registry.MERGE_METHODS)
    method: type[MergeMethod]
    models: tuple[ModelEntry, ...]  # merged models (the base is not one of them), in first-listed order
    base: ModelEntry | None
    reference: ModelEntry
    params: Mapping[str, Any]  # top-level parameters, YAML key -> parsed setting
    out_dtype: torch.dtype | None
    tokenizer_source: Path | None
    name_map: tuple[tuple[re.Pattern[str], str], ...]
    include: tuple[re.Pattern[str], ...]
    exclude: tuple[re.Pattern[str], ...]
    layer_pattern: re.Pattern[str]
    seed: int
    shard_bytes: int
    slices: tuple[OutputSlice, ...] | None = None  # None: whole models (the models: form)
    tokenizer: TokenizerSpec | None = None
    chat_template: str | None = None  # 'auto' or a Jinja template
    detect_names: bool = False  # neither name_map nor layer_pattern given: name_map from the reference's weights

    @property
    def inputs(self) -> tuple[ModelEntry, ...]:
        """Every model whose tensors a merge may read, once each (merged models, bases, slice sources)."""
        seen: dict[str, ModelEntry] = {}
        slice_models = [s.model for sl in self.slices or () for s in sl.sources]
        for m in (*self.models, *([self.base] if self.base else []), *slice_models):
            seen.setdefault(m.id, m)
        return tuple(seen.values())

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

    def params_for(self, name: str | None, t: float = 0.0, slice_: OutputSlice | None = None,
                   inputs: Mapping[str, str] | None = None) -> Any:
        """The method's params dataclass for output tensor ``name`` at layer position ``t`` of ``slice_``
        (None: the models: form). ``inputs`` names each model's own tensor, which per-model filters
        match, as mergekit's do. ``name=None``: the values without filters."""
        cls = self.method.config_cls
        hints = typing.get_type_hints(cls)
        models = [s.model for s in slice_.merged] if slice_ is not None else list(self.models)
        shared = (slice_.params if slice_ is not None else {}, self.params)
        kwargs: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            key = f.metadata.get("key", f.name)
            if f.metadata.get("per_model"):
                values = {}
                for m in models:
                    tname = (inputs or {}).get(m.id, name)
                    v = _lookup(key, (m.params, *shared), tname, t, hints[f.name], self.source)
                    v = f.metadata["model_default"] if v is _MISSING else v
                    if v is _MISSING:
                        raise MergeError(f"{self.source}: models: parameter {key!r} is required for model {m.id!r}")
                    values[m.id] = v
                kwargs[f.name] = values
            elif (v := _lookup(key, shared, name, t, hints[f.name], self.source)) is not _MISSING:
                kwargs[f.name] = v
            elif f.default is _MISSING and f.default_factory is _MISSING:
                raise MergeError(f"{self.source}: parameters.{key}: required by merge_method {self.method_name}")
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as err:
            at = f" (tensor {name})" if name else ""
            raise MergeError(f"{self.source}: parameters{at}: {err}") from err


def _lookup(key: str, scopes: tuple[Mapping[str, Any], ...], name: str | None, t: float, tp: Any,
            src: Path) -> Any:
    """The first scope's value of ``key`` whose filters match ``name`` (mergekit's precedence)."""
    for scope in scopes:
        if key in scope:
            value = evaluate(scope[key], name or "", t)
            if value is not None:
                return as_type(tp, value, f"{src}: parameters.{key}")
    return _MISSING


# --- YAML -> plan -------------------------------------------------------------------------------
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


def _params(cls: type, raw: Any, where: str, scope: str) -> dict[str, Any]:
    """``parameters`` of one scope: 'model' (per-model keys only), 'slice' or 'top' (any key)."""
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
        if scope == "model" and not fields[key].metadata.get("per_model"):
            raise MergeError(f"{where}.{key}: a shared parameter; set it under the top-level (or the slice's) "
                             f"'parameters'")
        out[key] = parse_setting(hints[fields[key].name], value, f"{where}.{key}")
        why = fields[key].metadata.get("single")
        if why and isinstance(out[key], (Gradient, Conditional)):
            kind = "layer gradient" if isinstance(out[key], Gradient) else "{filter, value} list"
            raise MergeError(f"{where}.{key}: a {kind} is not supported here, give one value ({why})")
    return out


def _entry(text: Any, method: type[MergeMethod], where: str, params: Any = None, params_at: str = "") -> ModelEntry:
    if not isinstance(text, str) or not text:
        raise MergeError(f"{where}: expected a model folder, org/name[@revision] or MODEL+LORA, got {text!r}")
    ref: ModelRef = parse_ref(text, where)
    return ModelEntry(text, ref.path, _params(method.config_cls, params, params_at, "model"), ref.lora)


def _same(a: ModelEntry, b: ModelEntry | None) -> bool:
    return b is not None and (a.path.resolve(), a.lora) == (b.path.resolve(), b.lora)


def _model(item: Any, method: type[MergeMethod], where: str) -> ModelEntry:
    if isinstance(item, str):
        item = {"model": item}
    if not isinstance(item, Mapping) or "model" not in item:
        raise MergeError(f"{where}: expected {{model: <folder>, parameters: {{...}}}}")
    if set(item) - {"model", "parameters"}:
        raise MergeError(f"{where}.{sorted(set(item) - {'model', 'parameters'})[0]}: unknown key "
                         f"(expected model, parameters)")
    return _entry(item["model"], method, f"{where}.model", item.get("parameters"), f"{where}.parameters")


def _count(method: type[MergeMethod], name: str, n: int, where: str) -> None:
    if n < method.min_models or (method.max_models is not None and n > method.max_models):
        want = method.min_models if method.max_models == method.min_models else f">= {method.min_models}"
        if method.max_models is not None and method.max_models != method.min_models:
            want = f"{method.min_models} to {method.max_models}"
        raise MergeError(f"{where}: {name} merges {want} model{'' if want == 1 else 's'} (besides the base), got {n}")


def _source(item: Any, method: type[MergeMethod], where: str) -> SliceSource:
    if not isinstance(item, Mapping) or "model" not in item or "layer_range" not in item:
        raise MergeError(f"{where}: expected {{model: <folder>, layer_range: [start, end], parameters: {{...}}}}")
    extra = sorted(set(item) - {"model", "layer_range", "parameters"})
    if extra:
        raise MergeError(f"{where}.{extra[0]}: unknown key (expected model, layer_range, parameters)")
    lr = item["layer_range"]
    if (not isinstance(lr, list) or len(lr) != 2 or any(isinstance(x, bool) or not isinstance(x, int) for x in lr)
            or not 0 <= lr[0] < lr[1]):
        raise MergeError(f"{where}.layer_range: expected [start, end] with 0 <= start < end, got {lr!r}")
    return SliceSource(_entry(item["model"], method, f"{where}.model", item.get("parameters"), f"{where}.parameters"),
                       (lr[0], lr[1]))


def _slice(item: Any, method: type[MergeMethod], name: str, base: ModelEntry | None, where: str) -> OutputSlice:
    if not isinstance(item, Mapping) or not isinstance(item.get("sources"), list) or not item["sources"]:
        raise MergeError(f"{where}.sources: expected a non-empty list of {{model, layer_range}}")
    extra = sorted(set(item) - {"sources", "base_model", "parameters", "residual_weight"})
    if extra:
        raise MergeError(f"{where}.{extra[0]}: unknown key (expected sources, base_model, parameters, residual_weight)")
    if item.get("residual_weight") is not None:  # in mergekit 0.1.x's schema, but read by no merge method
        as_type(float, item["residual_weight"], f"{where}.residual_weight")
        log.warning("%s.residual_weight: mergekit ignores it, and so does this merge", where)
    sources = tuple(_source(s, method, f"{where}.sources[{j}]") for j, s in enumerate(item["sources"]))
    n0 = sources[0].layer_range[1] - sources[0].layer_range[0]
    for j, s in enumerate(sources):
        if s.layer_range[1] - s.layer_range[0] != n0:
            raise MergeError(f"{where}.sources[{j}].layer_range: {list(s.layer_range)} spans "
                             f"{s.layer_range[1] - s.layer_range[0]} layers, sources[0] spans {n0} "
                             f"(every source of a slice gives the same number of layers)")
        if any(_same(s.model, o.model) for o in sources[:j]):
            raise MergeError(f"{where}.sources[{j}].model: {s.model.id!r} is listed twice in this slice")
    if item.get("base_model") is not None:
        base = _entry(item["base_model"], method, f"{where}.base_model")
    slice_base = None
    if method.base == "none" and item.get("base_model") is not None:
        raise MergeError(f"{where}.base_model: {name} takes no base model")
    if method.base == "required" and base is None:
        raise MergeError(f"{where}: base_model: required by merge_method {name} (top level or per slice)")
    if base is not None and method.base in ("required", "optional"):
        slice_base = next((s.model for s in sources if _same(s.model, base)), None)
        if slice_base is None:
            raise MergeError(f"{where}.sources: base_model {base.id!r} must be one of the sources "
                             f"(the base's layers come from the slice, as in mergekit)")
    sl = OutputSlice(sources, slice_base, _params(method.config_cls, item.get("parameters"), f"{where}.parameters",
                                                  "slice"))
    _count(method, name, len(sl.merged), f"{where}.sources")
    return sl


def _read(path: str | Path) -> tuple[Path, str, dict[str, Any]]:
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
    refused = next((k for k in data if k in _NOT_YET), None)
    if refused:
        raise MergeError(f"{src}: {refused}: {_NOT_YET[refused]}")
    unknown = sorted(set(data) - set(_TOP_KEYS), key=str)
    if unknown:
        raise MergeError(f"{src}: {unknown[0]}: unknown key{suggest(str(unknown[0]), list(_TOP_KEYS))} "
                         f"(expected one of: {', '.join(_TOP_KEYS)})")
    if (data.get("models") is None) == (data.get("slices") is None):
        raise MergeError(f"{src}: models / slices: give exactly one of them (models: whole models; "
                         f"slices: layer ranges)")
    return src, text, data


def load_plan(path: str | Path) -> MergePlan:
    """Read and validate a merge YAML (no weights file is opened; hub ids are looked up in the local cache)."""
    from mllm.registry import MERGE_METHODS, RegistryError

    src, text, data = _read(path)
    name = str(data.get("merge_method"))
    try:
        method = MERGE_METHODS.get(name)
    except RegistryError as err:
        raise MergeError(f"{src}: merge_method: {err}") from err
    base_id = data.get("base_model")
    base = _entry(base_id, method, f"{src}: base_model") if base_id is not None else None
    if method.base == "none" and base is not None:
        raise MergeError(f"{src}: base_model: {name} takes no base model (list it under models, "
                         f"or set reference_model to take names, config and tokenizer from it)")
    slices = None
    if data.get("models") is not None:
        raw_models = data["models"]
        if not isinstance(raw_models, list) or not raw_models:
            raise MergeError(f"{src}: models: expected a non-empty list of {{model: <folder>}}")
        models = [_model(m, method, f"{src}: models[{i}]") for i, m in enumerate(raw_models)]
        ids = [m.id for m in models]
        if len(set(ids)) != len(ids):
            raise MergeError(f"{src}: models: {next(i for i in ids if ids.count(i) > 1)!r} is listed twice")
        if method.base == "required" and base is None:
            raise MergeError(f"{src}: base_model: required by merge_method {name}")
        if base is not None and method.base in ("required", "optional"):  # mergekit: the base is no delta,
            models = [m for m in models if not _same(m, base)]  # nor listed twice
        elif base is not None and method.base == "input" and not any(_same(m, base) for m in models):
            models.append(base)  # one more input; its values come from the top-level parameters
        _count(method, name, len(models), f"{src}: models")
    else:
        if method.no_slices:
            raise MergeError(f"{src}: slices: not supported by merge_method {name} ({method.no_slices}); use models:")
        raw = data["slices"]
        if not isinstance(raw, list) or not raw:
            raise MergeError(f"{src}: slices: expected a non-empty list of {{sources: [...]}}")
        slices = tuple(_slice(s, method, name, base, f"{src}: slices[{i}]") for i, s in enumerate(raw))
        first: dict[str, ModelEntry] = {}
        for sl in slices:
            for s in sl.merged:
                first.setdefault(s.model.id, dataclasses.replace(s.model, params={}))
        models = list(first.values())
    ref_id = data.get("reference_model")
    candidates = [m for m in (*models, base, *(s.model for sl in slices or () for s in sl.sources)) if m is not None]
    if ref_id is None:
        ref = base if (method.reference == "base" and base is not None) else candidates[0]
    else:
        ref = next((m for m in candidates if m.id == ref_id), None) or _entry(ref_id, method, f"{src}: reference_model")
    dtype_key = "out_dtype" if data.get("out_dtype") is not None else "dtype"
    out_dtype = data.get(dtype_key)
    if out_dtype is not None and out_dtype not in DTYPES:
        raise MergeError(f"{src}: {dtype_key}: expected one of {list(DTYPES)}, got {out_dtype!r}")
    tokenizer = parse_tokenizer(data, src, base.path if base else None)
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
        params=_params(method.config_cls, data.get("parameters"), f"{src}: parameters", "top"),
        out_dtype=DTYPES[out_dtype] if out_dtype else None,
        tokenizer_source=tokenizer.path if tokenizer else None,
        name_map=tuple((_regex(k, f"{src}: name_map"), str(v)) for k, v in name_map.items()),
        include=lists["include"], exclude=lists["exclude"], layer_pattern=layer_pattern, seed=seed,
        shard_bytes=_size(data.get("shard_size", "5GB"), f"{src}: shard_size"),
        slices=slices, tokenizer=tokenizer, chat_template=parse_chat_template(data.get("chat_template"), src),
        detect_names=data.get("name_map") is None and data.get("layer_pattern") is None,
    )
    for sl in slices or (None,):
        plan.params_for(None, 0.0, sl)  # required parameters and __post_init__ checks, before any I/O
    return plan
