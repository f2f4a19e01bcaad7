"""The one validator: plain data (YAML / JSON / ``--set``) <-> typed dataclasses, for every file we read.

Run configs (:mod:`mllm.config`), merge plans (:mod:`mllm.merge.plan`) and every registered part's
config go through :func:`from_dict` / :func:`check_value`, so one set of rules holds everywhere:

* unknown keys are refused, with the closest valid key suggested (``train.stpes`` -> ``steps``);
* values are checked against the field's annotation (``bool``, ``int``, ``float``, ``str``,
  ``Literal``, ``list``, ``dict``, ``X | None``, nested dataclasses, registry-named :class:`Part`);
* YAML numbers such as ``2e-5`` or ``1e-0`` are numbers (:func:`load_yaml`; PyYAML's YAML 1.1
  resolver reads a float without a dot as a string);
* every error is a :class:`ConfigError` carrying the dotted ``key`` it is about, so the caller can
  say where the bad value came from (the file, or the ``--set`` argument).

This module imports nothing of the roof but the registry idiom's error type, so both
:mod:`mllm.config` and :mod:`mllm.registry` can import it (no import circle).
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Union

import yaml

from common.errors import UserError


class ConfigError(UserError, ValueError):
    """A config value or file is wrong; ``key`` is the dotted key it is about (``None``: the whole file)."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


# --- YAML --------------------------------------------------------------------------------------
class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's float rule: ``1e-3`` and ``2E+5`` are floats, not strings."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                    |[-+]?\.(?:inf|Inf|INF)
                    |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def load_yaml(text: str, source: str) -> Any:
    """Parse YAML text (numbers as YAML 1.2 reads them); a syntax error names ``source``, line and column."""
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise ConfigError(f"{source}: malformed YAML{at}: {getattr(err, 'problem', err)}") from err


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML file holding a mapping at the top level."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    data = load_yaml(path.read_text(), str(path))
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a YAML mapping at the top level, got {type(data).__name__}")
    return data


# --- typed values --------------------------------------------------------------------------------
def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def suggest(key: str, valid: list[str]) -> str:
    """``"; did you mean 'steps'?"`` when a valid key is close to ``key``, else ``""``."""
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def check_value(tp: Any, value: Any, where: str) -> Any:
    """``value`` checked against annotation ``tp`` and returned (ints widened to float where a float is asked)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None and len(args) < len(typing.get_args(tp)):
            return None
        errors = []
        for arg in args:  # the first member that accepts the value (LiNeS' alpha: a number or 'auto')
            try:
                return check_value(arg, value, where)
            except ConfigError as err:
                errors.append(err)
        if len(errors) == 1:
            raise errors[0]
        raise ConfigError(f"{where}: expected {' or '.join(_expected(a) for a in args)}, got {value!r}", where)
    if origin is typing.Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{where}: expected {_expected(tp)}, got {value!r}", where)
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {value!r}", where)
        (arg,) = typing.get_args(tp)[:1] or (Any,)
        return [check_value(arg, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}", where)
        _, vt = typing.get_args(tp) or (Any, Any)
        return {str(k): check_value(vt, v, _join(where, str(k))) for k, v in value.items()}
    if isinstance(tp, type) and issubclass(tp, Part):
        return tp.from_value(value, where)
    if dataclasses.is_dataclass(tp):
        return value if isinstance(value, tp) else from_dict(tp, value, where)
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
    }.get(tp)
    if ok is None:
        raise TypeError(f"{where}: unsupported annotation {tp!r}")  # a bug in a config class, not user input
    if not ok:
        raise ConfigError(f"{where}: expected {_expected(tp)}, got {value!r}", where)
    return float(value) if tp is float else value


def _expected(tp: Any) -> str:
    """How an error message names type ``tp``."""
    if typing.get_origin(tp) is typing.Literal:
        return f"one of {list(typing.get_args(tp))}"
    names = {bool: "true/false", int: "an integer", float: "a number", str: "a string"}
    return names.get(tp, getattr(tp, "__name__", str(tp)))


def from_dict(cls: type, data: Any, where: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys and wrong types.

    ``where`` is the dotted key of ``data`` in its file (``""`` at the top). A ``ValueError`` from the
    class's ``__post_init__`` (a check across fields) becomes a :class:`ConfigError` about ``where``.
    """
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where or 'config'}: expected a mapping for {cls.__name__}, got {type(data).__name__}",
                          where or None)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in fields:
            raise ConfigError(
                f"{_join(where, str(key))}: unknown key for {cls.__name__}{suggest(str(key), list(fields))} "
                f"(expected one of: {', '.join(fields)})", _join(where, str(key)),
            )
    kwargs = {k: check_value(hints[k], v, _join(where, k)) for k, v in data.items()}
    for name, f in fields.items():
        if name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{_join(where, name)}: required key is missing", _join(where, name))
    try:
        return cls(**kwargs)
    except ValueError as err:  # __post_init__ checks; a message that starts with a field's (dotted) key is about it
        msg = str(err)
        path = re.match(r"(\w+)[\w.\[\]]*", msg)
        if path and path.group(1) in fields and msg[path.end():].startswith(":"):
            key = _join(where, path.group())
            raise ConfigError(f"{key}{msg[path.end():]}", key) from err
        raise ConfigError(f"{where or cls.__name__}: {msg}", where or None) from err


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


@dataclasses.dataclass
class Part:
    """A registry-named part: ``name`` picks the class, ``cfg`` is that class's config dataclass.

    Subclasses name their table in ``table`` (a ``mllm.registry.Registry``); a field typed
    ``EncoderPart`` accepts ``{name: timm_vit, <TimmViTConfig fields>}`` or just ``timm_vit``.
    """

    table: ClassVar[Any] = None
    name: str
    cfg: Any

    @classmethod
    def from_value(cls, value: Any, where: str) -> Part:
        if isinstance(value, cls):
            return value
        if isinstance(value, str):
            value = {"name": value}
        kind = cls.table.kind
        if not isinstance(value, Mapping) or "name" not in value:
            raise ConfigError(f"{where}: expected a mapping with a 'name' key (a registered {kind})", where)
        name = value["name"]
        if name not in cls.table:
            names = cls.table.names()
            raise ConfigError(f"{where}.name: unknown {kind} {name!r}{suggest(str(name), names)} "
                              f"(expected one of: {', '.join(names)})", f"{where}.name")
        params = {k: v for k, v in value.items() if k != "name"}
        return cls(name, from_dict(cls.table.config_cls(name), params, where))
