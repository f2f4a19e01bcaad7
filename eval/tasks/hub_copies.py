"""What the MME / MMBench / SEED-Bench / MMMU / MathVista tasks share about their local hub copies.

* :func:`missing` — the empty cells of these tables: None, NaN, ``""`` and the string ``"nan"`` that
  pandas exports (MMBench's absent options and hints).
* :func:`lmms_eval_entry` — a task's number as lmms-eval reports it (its task and metric names, its
  scale), which each task's aggregate carries beside our fractions under ``"lmms_eval"``.
"""

from __future__ import annotations

import math
from typing import Any


def missing(value: Any) -> bool:
    """An empty cell: None, NaN, an empty or blank string, or the string "nan"."""
    if value is None:
        return True
    if isinstance(value, float):
        return math.isnan(value)
    return isinstance(value, str) and value.strip().lower() in ("", "nan")


def lmms_eval_entry(task: str, metric: str, value: float | None) -> dict[str, Any]:
    """``{"task", "metric", "value"}``: lmms-eval's task and metric names and its number (its scale)."""
    return {"task": task, "metric": metric, "value": value}
