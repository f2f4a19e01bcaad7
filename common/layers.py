"""Layer-index resolution: a config's layer list (negative indices count from the end) -> 0-based indices.

It lives on floor 0 (``common/``) because two packages that may not import each other both need it:
``encoders/`` (which blocks a vision tower taps; floor 1, it imports nothing of ours but ``common/``)
and ``mllm/injection/`` (which decoder layers an injector hooks; the roof). One implementation here
replaces the copy each kept.
"""

from __future__ import annotations

from collections.abc import Iterable

from common.errors import UserError


class LayerError(UserError, ValueError):
    """A layer index out of range, or no layer at all; the message names the field."""


def resolve_layers(layers: Iterable[int], depth: int, where: str = "layers", *, stack: str = "layer stack",
                   unique: bool = False, error: type[UserError] = LayerError) -> list[int]:
    """Map every index of ``layers`` into ``0..depth-1`` (``-1`` is the last layer, as in Python).

    The two callers want different shapes of result, both kept: by default the indices keep the
    config's order and repeats (a vision encoder returns its tapped layers in config order, see
    ``encoders/base.py``); with ``unique`` they come back sorted without repeats (the set of decoder
    layers an injector hooks, see ``mllm/injection/base.py``). An index outside ``-depth..depth-1``
    raises ``error`` -- the caller's own error type -- as ``"{where}: layer {idx} is out of range for
    a {depth}-{stack}"`` (``stack`` e.g. ``"block encoder"``, ``"layer LLM"``); so does an empty list.
    """
    out = []
    for idx in layers:
        resolved = idx + depth if idx < 0 else idx
        if not 0 <= resolved < depth:
            raise error(f"{where}: layer {idx} is out of range for a {depth}-{stack}")
        out.append(resolved)
    if not out:
        raise error(f"{where}: choose at least one layer of the {depth}-{stack}")
    return sorted(set(out)) if unique else out
