"""What the MME / MMBench / SEED-Bench / MMMU / MathVista tasks share about their local hub copies.

* :func:`split_rows` — the rows of one split: a snapshot folder holding several splits (``dev-*.parquet``
  and ``test-*.parquet``, or one folder per subject as MMMU keeps them) is narrowed to the files of that
  split; a file, a split folder or a ``save_to_disk`` folder is read whole (:func:`eval.tasks.hf_files.read_rows`).
* :func:`missing` — the empty cells of these tables: None, NaN, ``""`` and the string ``"nan"`` that
  pandas exports (MMBench's absent options).
* :func:`lmms_eval_entry` — a task's number as lmms-eval reports it, beside our fractions.
* :class:`HubTask` — a file task whose ``data`` may be a folder: its protocol records a folder's
  revision as one digest (:func:`data_revision`).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from eval.tasks.base import BaseTask, ConfigT, FileTask, file_revision
from eval.tasks.hf_files import read_rows

# Files whose content goes into a folder's digest; the others (images) by name and size only.
_HASHED = (".json", ".jsonl", ".tsv", ".txt", ".parquet", ".arrow")


def split_rows(path: str | Path, split: str) -> Iterator[dict[str, Any]]:
    """Rows of ``split``: its ``<split>-*.parquet`` shards under a folder (sorted paths), else all of ``path``."""
    path = Path(path)
    if path.is_dir() and not (path / "state.json").is_file():
        shards = sorted(path.rglob(f"{split}-*.parquet"))
        if shards:
            return (row for shard in shards for row in read_rows(shard))
    return read_rows(path)


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


def data_revision(path: str | Path) -> dict[str, Any]:
    """A data file's :func:`file_revision`; for a folder, one SHA-256 over its files' relative paths and
    sizes and the content of its annotation, parquet and Arrow files (images by name and size only)."""
    path = Path(path)
    if not path.is_dir():
        return file_revision(path)
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        digest.update(f"{f.relative_to(path)}\0{f.stat().st_size}\0".encode())
        if f.suffix in _HASHED:
            with f.open("rb") as handle:
                while chunk := handle.read(1 << 20):
                    digest.update(chunk)
    return {"folder": path.name, "files": len(files), "bytes": sum(f.stat().st_size for f in files),
            "sha256": digest.hexdigest()[:16]}


class HubTask(FileTask[ConfigT]):
    """A benchmark read from its release files or a local hub copy, either of which may be a folder."""

    def protocol(self) -> dict[str, Any]:
        return {**BaseTask.protocol(self), "dataset_revision": [data_revision(p) for p in self.data_files()]}
