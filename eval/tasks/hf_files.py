"""Rows of the Hugging Face copies of benchmarks that users keep locally (the lmms-lab dataset layouts).

Three layouts, all read with pyarrow (a dependency of ``datasets``), one record batch at a time so a
large image column is never held whole:

* one ``.parquet`` file (a hub snapshot's ``data/<split>-00000-of-0000N.parquet``);
* a folder of parquet shards, read in sorted path order (``<split>-00000-of-00002`` before ``-00001``),
  searched recursively, so a split folder or a snapshot with one split both work;
* a ``Dataset.save_to_disk`` folder (``state.json`` naming its Arrow stream files in order).

A hub snapshot's ``data/`` folder holds every split (``val-*`` and ``test-*``): :func:`split_files` picks
one split's shards by that file-name prefix. An ``Image`` column arrives undecoded, as
``{"bytes": ..., "path": ...}``; :func:`image_bytes` takes the encoded bytes out of it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from eval.tasks.base import ConfigT, EvalDataError, EvalSample, FileTask

_BATCH_ROWS = 64  # rows decoded from Arrow at a time


def _parquet_rows(path: Path) -> Iterator[dict[str, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=_BATCH_ROWS):
            yield from batch.to_pylist()
    except (pa.ArrowException, OSError) as err:
        raise EvalDataError(f"{path}: not a readable parquet file: {err}") from err


def _saved_files(folder: Path) -> list[Path]:
    """The Arrow files of a ``save_to_disk`` folder, in the order its ``state.json`` lists them."""
    state_path = folder / "state.json"
    try:
        files = json.loads(state_path.read_text(encoding="utf-8"))["_data_files"]
        names = [f["filename"] for f in files]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise EvalDataError(f"{state_path}: not a datasets save_to_disk state file: {err}") from err
    return [folder / name for name in names]


def _arrow_rows(path: Path) -> Iterator[dict[str, Any]]:
    import pyarrow as pa

    try:
        with pa.memory_map(str(path)) as source:
            for batch in pa.ipc.open_stream(source):
                for start in range(0, batch.num_rows, _BATCH_ROWS):
                    yield from batch.slice(start, _BATCH_ROWS).to_pylist()
    except (pa.ArrowException, OSError) as err:
        raise EvalDataError(f"{path}: not a readable Arrow file of a save_to_disk folder: {err}") from err


def read_rows(path: Path) -> Iterator[dict[str, Any]]:
    """The rows of a ``.parquet`` file, a folder of parquet shards, or a ``save_to_disk`` folder.

    The layout is checked when called; the rows are read as they are consumed.
    """
    path = Path(path)
    if path.is_file() and path.suffix == ".parquet":
        return _parquet_rows(path)
    if path.is_dir() and (path / "dataset_dict.json").is_file():
        raise EvalDataError(f"{path}: a DatasetDict folder; name one split's folder inside it")
    if path.is_dir() and (path / "state.json").is_file():
        files = _saved_files(path)
        return (row for f in files for row in _arrow_rows(f))
    if path.is_dir():
        shards = sorted(path.rglob("*.parquet"))
        if shards:
            return (row for shard in shards for row in _parquet_rows(shard))
        raise EvalDataError(f"{path}: no .parquet files and no save_to_disk state.json in this folder")
    if path.exists():
        raise EvalDataError(f"{path}: expected a .parquet file or a folder of them (or a save_to_disk folder)")
    raise EvalDataError(f"{path}: file not found")


def is_hf_copy(path: Path) -> bool:
    """Whether ``path`` is one of the layouts above (not a benchmark's own release files)."""
    path = Path(path)
    if path.is_file():
        return path.suffix == ".parquet"
    return path.is_dir() and ((path / "state.json").is_file() or next(path.rglob("*.parquet"), None) is not None)


def split_files(path: Path, split: str) -> list[Path]:
    """The files holding ``split``: a ``.parquet`` file or ``save_to_disk`` folder as given; in a shard
    folder the ``<split>-*.parquet`` files, or every shard when none is named after a split."""
    path = Path(path)
    if path.is_file() or (path / "state.json").is_file():
        return [path]
    named = sorted(path.rglob(f"{split}-*.parquet"))
    return named or [path]


def read_split(path: Path, split: str) -> Iterator[dict[str, Any]]:
    """The rows of ``split`` (see :func:`split_files`), in order."""
    return (row for f in split_files(path, split) for row in read_rows(f))


def revision_files(path: Path, split: str) -> list[str]:
    """The data files of ``split`` for the protocol record (every shard / Arrow file hashed)."""
    files: list[str] = []
    for f in split_files(path, split):
        if f.is_file():
            files.append(str(f))
        elif (f / "state.json").is_file():
            files += [str(a) for a in _saved_files(f)]
        else:
            files += [str(p) for p in sorted(f.rglob("*.parquet"))]
    return files


def image_bytes(value: Any, where: str) -> bytes:
    """The encoded image of an HF ``Image`` column value: ``{"bytes": ..., "path": ...}`` or raw bytes."""
    if isinstance(value, Mapping) and isinstance(value.get("bytes"), bytes) and value["bytes"]:
        return value["bytes"]
    if isinstance(value, bytes) and value:
        return value
    if isinstance(value, Mapping) and value.get("path"):
        raise EvalDataError(f"{where}: the image is stored by path only ({value['path']!r}), not embedded")
    raise EvalDataError(f"{where}: expected an embedded image ({{'bytes': ...}} or bytes), got {type(value).__name__}")


class HFCopyTask(FileTask[ConfigT]):
    """A benchmark read from its release files, or from a local HF copy when ``cfg.data`` is one.

    Subclasses set ``hf_split`` (the split's name in the lmms-lab copy) and implement
    :meth:`release_samples` and :meth:`hf_sample` so that both give the same samples in the same order.
    """

    hf_split = "test"

    def release_samples(self) -> Iterator[EvalSample]:
        raise NotImplementedError

    def release_files(self) -> list[str]:
        return [self.cfg.data]

    def hf_sample(self, row: dict[str, Any], index: int, where: str) -> EvalSample:
        raise NotImplementedError

    def samples(self) -> Iterator[EvalSample]:
        path = Path(self.cfg.data)
        if not is_hf_copy(path):
            yield from self.release_samples()
            return
        for i, row in enumerate(read_split(path, self.hf_split)):
            yield self.hf_sample(row, i, f"{path}: {self.hf_split} row {i}")

    def data_files(self) -> list[str]:
        path = Path(self.cfg.data)
        return revision_files(path, self.hf_split) if is_hf_copy(path) else self.release_files()
