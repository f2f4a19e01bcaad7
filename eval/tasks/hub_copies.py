"""What the MME / MMBench / SEED-Bench / MMMU / MathVista tasks share about their local hub copies.

* :func:`missing` — the empty cells of these tables: None, NaN, ``""`` and the strings ``"nan"`` and
  ``"none"`` (MMBench's absent options and hints as pandas exports them; LLaVA's ``is_none`` and pandas'
  reading of the release .tsv both take "None" for an empty cell too).
* :func:`int_field` — an integer column that some copies store as text (MMBench's ``index``).
* :func:`lmms_eval_entry` — a task's number as lmms-eval reports it (its task and metric names, its
  scale), which each task's aggregate carries beside our fractions under ``"lmms_eval"``.
* :class:`SelfContainedTask` — a task whose files carry their images.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from eval.tasks.base import ConfigT, EvalDataError, field_of
from eval.tasks.hf_files import HFCopyTask


def missing(value: Any) -> bool:
    """An empty cell: None, NaN, an empty or blank string, or the string "nan" or "none" (any case)."""
    if value is None:
        return True
    if isinstance(value, float):
        return math.isnan(value)
    return isinstance(value, str) and value.strip().lower() in ("", "nan", "none")


def lmms_eval_entry(task: str, metric: str, value: float | None) -> dict[str, Any]:
    """``{"task", "metric", "value"}``: lmms-eval's task and metric names and its number (its scale)."""
    return {"task": task, "metric": metric, "value": value}


def int_field(row: Mapping[str, Any], key: str, where: str) -> int:
    """``row[key]`` as an integer: an int, or a string holding one."""
    value = field_of(row, key, (int, str), where)
    try:
        return int(value)
    except ValueError:
        raise EvalDataError(f"{where}: field {key!r} should be an integer, got {value!r}") from None


class SelfContainedTask(HFCopyTask[ConfigT]):
    """A benchmark whose files carry their images (embedded, or inside its release folder): ``images``
    must stay unset. A config with a ``split`` names the hub copy's split to read and record."""

    def __init__(self, cfg: ConfigT) -> None:
        super().__init__(cfg)
        if cfg.images is not None:
            raise EvalDataError(f"{self.name}.images: not used (the images are embedded or in the release "
                                f"folder), got {cfg.images!r}")
        self.hf_split = getattr(cfg, "split", self.hf_split)
