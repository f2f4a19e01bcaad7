"""Parameter settings as mergekit's YAML writes them: a scalar, a layer gradient, or a filter list.

Every merge parameter, at the top level, in a slice or under one model, may be

* a scalar (checked against the parameter's type by :func:`mllm.schema.check_value`). A quoted string
  given for a number or a boolean is read as mergekit reads it -- pydantic's lax mode, mergekit's
  ``ParameterSpec.validate`` -- and accepted exactly when that accepts it (:func:`from_string`): a float
  from Python's float syntax in ASCII ("0.5", "1e-3", "inf", "1_000"), an integer from digits with an
  optional all-zero fraction ("3", "3.0"), a boolean from true/false, yes/no, on/off, t/f, y/n, 1/0;
* a **layer gradient**: a list of scalars interpolated over the decoder layers of the slice. With
  ``t = i / (n - 1)`` for the slice's i-th of n layers (``t = 1`` when the slice has one layer; tensors
  outside the layers take ``t = 0``) and ``k`` values ``v``, the position ``s = t (k - 1)`` picks
  ``i0 = floor(s)``, ``i1 = min(k - 1, i0 + 1)`` and gives ``(1 - f) v[i0] + f v[i1]`` with
  ``f = s - i0`` -- mergekit's ``evaluate_setting``, same arithmetic in the same order, so the same
  floats. Booleans and strings are not interpolated: ``v[floor(t (k - 1))]``;
* a list of ``{filter, value}`` entries (or one such mapping): the first entry whose ``filter`` is a
  **substring** of the tensor name (mergekit does not use regexes), or that has no filter or ``"*"``,
  gives the value (itself a scalar or a gradient). When none matches, the parameter falls through to the
  next scope (slice, then top level, then the method's default), as in mergekit.
"""

from __future__ import annotations

import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from mllm.merge.tensors import MergeError
from mllm.schema import ConfigError, check_value


class Gradient(tuple):  # type: ignore[type-arg]
    """A layer gradient: the values interpolated over a slice's layers."""


@dataclass(frozen=True)
class Conditional:
    """``[{filter, value}, ...]``: (filter substring or None, setting) pairs, first match wins."""

    entries: tuple[tuple[str | None, Any], ...]


_INT = re.compile(r"[+-]?[0-9]+(?:_[0-9]+)*(?:\.0+)?")  # pydantic's int from str: no exponent, zero fraction
_BOOL = {"true": True, "yes": True, "on": True, "t": True, "y": True, "1": True,
         "false": False, "no": False, "off": False, "f": False, "n": False, "0": False}


def from_string(tp: Any, text: str) -> Any:
    """``text`` as a value of scalar type ``tp`` (float, int or bool) the way pydantic's lax mode reads a
    string, which is how mergekit validates its parameters; None where pydantic refuses it."""
    stripped = text.strip()
    if tp is float and stripped.isascii():
        try:
            return float(stripped)
        except ValueError:
            return None
    if tp is int and _INT.fullmatch(stripped):
        return int(stripped.partition(".")[0])
    if tp is bool:
        return _BOOL.get(text.lower())
    return None


def _scalar(tp: Any, value: Any, where: str) -> Any:
    try:
        return check_value(tp, value, where)
    except ConfigError as err:
        if isinstance(value, str):  # a quoted number or boolean: accepted iff mergekit accepts it
            union = typing.get_origin(tp) in (typing.Union, types.UnionType)
            for member in typing.get_args(tp) if union else (tp,):
                if (parsed := from_string(member, value)) is not None:
                    return parsed
        raise MergeError(str(err)) from err


def _scalar_or_gradient(tp: Any, value: Any, where: str) -> Any:
    if not isinstance(value, list):
        if isinstance(value, Mapping):
            raise MergeError(f"{where}: expected a number/value or a list of them, got a mapping")
        return _scalar(tp, value, where)
    if not value:
        raise MergeError(f"{where}: an empty list (a layer gradient needs at least one value)")
    bad = next((i for i, v in enumerate(value) if isinstance(v, (list, Mapping))), None)
    if bad is not None:
        raise MergeError(f"{where}[{bad}]: a layer gradient holds plain values, got {value[bad]!r}")
    return Gradient(_scalar(tp, v, f"{where}[{i}]") for i, v in enumerate(value))


def parse_setting(tp: Any, value: Any, where: str) -> Any:
    """A YAML parameter value -> scalar, :class:`Gradient` or :class:`Conditional`, each value checked
    against the parameter's annotation ``tp`` (a per-model ``dict[model id, T]`` field takes ``T``)."""
    if typing.get_origin(tp) is dict:
        tp = typing.get_args(tp)[1]
    if isinstance(value, Mapping):
        value = [value]
    if not (isinstance(value, list) and value and any(isinstance(v, Mapping) for v in value)):
        return _scalar_or_gradient(tp, value, where)
    entries = []
    for i, item in enumerate(value):
        at = f"{where}[{i}]"
        if not isinstance(item, Mapping) or "value" not in item or set(item) - {"filter", "value"}:
            raise MergeError(f"{at}: expected {{filter: <substring of tensor names>, value: <x>}} "
                             f"(a list of filter entries cannot mix with plain values)")
        flt = item.get("filter")
        if flt is not None and not isinstance(flt, str):
            raise MergeError(f"{at}.filter: expected a string (a substring of tensor names), got {flt!r}")
        entries.append((flt, _scalar_or_gradient(tp, item["value"], f"{at}.value")))
    return Conditional(tuple(entries))


def evaluate(setting: Any, name: str, t: float) -> Any:
    """The value of ``setting`` for tensor ``name`` at layer position ``t``; None: no filter matched."""
    if isinstance(setting, Conditional):
        for flt, value in setting.entries:
            if flt is None or flt == "*" or (name and flt in name):
                return evaluate(value, name, t)
        return None
    if isinstance(setting, Gradient):
        values = list(setting)
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            return values[int(t * (len(values) - 1))]
        scaled = t * (len(values) - 1)
        i0 = int(scaled)
        i1 = min(len(values) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * values[i0] + frac * values[i1]
    return setting


def as_type(tp: Any, value: Any, where: str) -> Any:
    """An interpolated value checked against the parameter's type again (an int parameter takes a whole
    number only, as pydantic's lax mode does in mergekit)."""
    if typing.get_origin(tp) is dict:
        tp = typing.get_args(tp)[1]
    if tp is int and isinstance(value, float) and value.is_integer():
        value = int(value)
    return _scalar(tp, value, where)


def describe(setting: Any) -> Any:
    """Plain data for a setting (YAML-like), for plan printouts."""
    if isinstance(setting, Conditional):
        return [{"filter": f, "value": describe(v)} if f is not None else {"value": describe(v)}
                for f, v in setting.entries]
    if isinstance(setting, Gradient):
        return list(setting)
    return setting
