"""Rows of the Hugging Face copies of benchmarks that users keep locally (the lmms-lab dataset layouts).

Three layouts, all read with pyarrow (a dependency of ``datasets``), one record batch at a time so a
large image column is never held whole:

* one ``.parquet`` file (a hub snapshot's ``data/<split>-00000-of-0000N.parquet``);
* a folder of parquet shards, read in sorted path order (``<split>-00000-of-00002`` before ``-00001``),
  searched recursively, so a split folder or a snapshot with one split both work;
* a ``Dataset.save_to_disk`` folder (``state.json`` naming its Arrow stream files in order).

A hub snapshot's ``data/`` folder holds every split (``val-*`` and ``test-*``): :func:`split_files` picks
one split's shards by that file-name prefix. An ``Image`` column arrives undecoded, as
``{"bytes": ..., "path": ...}``, and its bytes stay in the file: each row holds an :class:`ImageRef` in their
place (file, row group or record batch, row, column), which :func:`image_bytes` takes out and the runner
reads with the sample's batch (:class:`ImageReader`), so a benchmark's sample list holds no image.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path
from typing import Any

from eval.tasks.base import ConfigT, EvalDataError, EvalSample, FileTask, MissingImage, missing_image

_BATCH_ROWS = 64  # rows decoded from Arrow at a time
KEEP_BYTES = 256 << 20  # images read early that a run keeps for its later batches (see ImageReader)


@dataclass(frozen=True)
class ImageRef:
    """Where one embedded image lies in a local HF copy: read when its batch runs, not when its sample is built.

    ``chunk`` is the parquet row group, or the record batch of a ``save_to_disk`` Arrow stream; ``row`` the
    row within it; ``item`` the position in a list-of-images column (SEED-Bench's ``image``), else None.
    """

    file: str
    layout: str  # "parquet" or "arrow"
    chunk: int
    row: int
    column: str
    item: int | None = None

    def __str__(self) -> str:
        unit = "row group" if self.layout == "parquet" else "record batch"
        item = "" if self.item is None else f"[{self.item}]"
        return f"{self.file}: {unit} {self.chunk} row {self.row} column {self.column}{item}"

    @property
    def chunk_key(self) -> tuple[str, str, int, str]:
        """What one read decodes: the column of one row group (record batch) of one file."""
        return self.file, self.layout, self.chunk, self.column

    def read(self) -> bytes:
        got = ImageReader(budget=0).read([self])[self]
        if isinstance(got, EvalDataError):
            raise got
        return got


class ImageReader:
    """Reads a run's stored images batch by batch, knowing every image the run will read (``planned``).

    Parquet decodes a row group's column whole (``datasets`` writes image sets in groups of 100 rows) and
    a run's batches follow its schedule, not the file, so a chunk read for one batch also holds images that
    later batches need: those are kept, up to ``budget`` bytes, and dropped when their last batch has read
    them. A chunk is read again only for the images the budget left out.
    """

    def __init__(self, planned: Iterable[ImageRef] = (), budget: int = KEEP_BYTES) -> None:
        self._uses: dict[tuple[str, str, int, str], Counter[ImageRef]] = defaultdict(Counter)  # reads to come
        for ref in planned:
            self._uses[ref.chunk_key][ref] += 1
        self._kept: dict[ImageRef, bytes] = {}
        self._room = budget

    def read(self, refs: Iterable[ImageRef]) -> dict[ImageRef, bytes | EvalDataError]:
        """The encoded bytes of each reference, or the error naming why it cannot be read."""
        wanted = Counter(refs)
        out: dict[ImageRef, bytes | EvalDataError] = {r: self._kept[r] for r in wanted if r in self._kept}
        chunks: dict[tuple[str, str, int, str], list[ImageRef]] = defaultdict(list)
        for ref in wanted.keys() - out.keys():
            chunks[ref.chunk_key].append(ref)
        for key, group in chunks.items():
            try:
                values = _read_chunk(*key)
            except EvalDataError as err:
                out.update((ref, err) for ref in group)
                continue
            out.update((ref, _image_at(values, ref)) for ref in group)
            for ref in self._uses[key].keys() - wanted.keys() - self._kept.keys():  # for later batches
                self._keep(ref, _image_at(values, ref))
        for ref, n in wanted.items():
            uses = self._uses[ref.chunk_key]
            uses[ref] -= n
            if uses[ref] > 0:  # a later batch reads it again (a row several samples share)
                self._keep(ref, out[ref])
            else:
                del uses[ref]
                self._room += len(self._kept.pop(ref, b""))
        return out

    def _keep(self, ref: ImageRef, data: bytes | EvalDataError) -> None:
        if ref not in self._kept and isinstance(data, bytes) and len(data) <= self._room:
            self._kept[ref] = data
            self._room -= len(data)


def _image_at(values: Any, ref: ImageRef) -> bytes | EvalDataError:
    """The image bytes ``ref`` names in its chunk's column ``values``."""
    value = values[ref.row].as_py() if ref.row < len(values) else None
    if ref.item is not None:
        value = value[ref.item] if isinstance(value, list) and ref.item < len(value) else None
    data = value.get("bytes") if isinstance(value, Mapping) else None
    return data if isinstance(data, bytes) and data else EvalDataError(f"{ref}: no embedded image there")


def _read_chunk(file: str, layout: str, chunk: int, column: str) -> Any:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        if layout == "parquet":
            parquet = pq.ParquetFile(file, memory_map=True)
            return parquet.read_row_group(chunk, columns=[column]).column(0).combine_chunks()
        with pa.memory_map(file) as source:
            for k, batch in enumerate(pa.ipc.open_stream(source)):
                if k == chunk:
                    return batch.column(column)
    except (pa.ArrowException, OSError, KeyError) as err:
        raise EvalDataError(f"{file}: cannot read {column!r} of chunk {chunk}: {err}") from err
    raise EvalDataError(f"{file}: no record batch {chunk}")


def _is_image(kind: Any) -> bool:
    """An HF ``Image`` column's storage: ``struct<bytes: binary, path: string>``."""
    import pyarrow as pa

    names = {kind.field(i).name for i in range(kind.num_fields)} if pa.types.is_struct(kind) else set()
    return names == {"bytes", "path"} and (pa.types.is_binary(kind.field("bytes").type)
                                           or pa.types.is_large_binary(kind.field("bytes").type))


def _image_values(images: Any, places: list[tuple[int, int | None]], column: str, ref: Any) -> list[Any]:
    """``{"bytes": ImageRef | None, "path": ...}`` per value of a struct image array (None where null);
    ``places[j]`` is value ``j``'s (row, item). Only sizes and paths are read, never the bytes."""
    import pyarrow.compute as pc

    names = [images.type.field(i).name for i in range(images.type.num_fields)]
    fields = dict(zip(names, images.flatten(), strict=True))
    sizes = pc.binary_length(fields["bytes"]).to_pylist()
    paths = fields["path"].to_pylist()
    valid = images.is_valid().to_pylist()
    return [{"bytes": ref(row, column, item) if size else None, "path": path} if ok else None
            for (row, item), size, path, ok in zip(places, sizes, paths, valid, strict=True)]


def _lazy_rows(batch: Any, ref: Any) -> list[dict[str, Any]]:
    """``batch.to_pylist()`` with every image column's bytes left in the file: each HF ``Image`` value
    (also inside a list column) becomes ``{"bytes": ImageRef, "path": ...}``, ``ref(row, column, item)``
    making the reference, so building a benchmark's samples holds no encoded image."""
    import pyarrow as pa
    import pyarrow.compute as pc

    lazy = {}
    for name, col in zip(batch.schema.names, batch.columns, strict=True):
        if _is_image(col.type):
            lazy[name] = _image_values(col, [(j, None) for j in range(len(col))], name, ref)
        elif pa.types.is_list(col.type) and _is_image(col.type.value_type):
            lengths = pc.list_value_length(col).to_pylist()
            places = [(j, k) for j, n in enumerate(lengths) for k in range(n or 0)]
            flat = _image_values(col.flatten(), places, name, ref)
            starts = [0, *accumulate(n or 0 for n in lengths)]
            lazy[name] = [None if n is None else flat[starts[j]:starts[j] + n] for j, n in enumerate(lengths)]
    rows = batch.drop_columns(list(lazy)).to_pylist() if lazy else batch.to_pylist()
    return [{k: lazy[k][j] if k in lazy else row[k] for k in batch.schema.names} for j, row in enumerate(rows)]


def _parquet_rows(path: Path) -> Iterator[dict[str, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
        for group in range(parquet.num_row_groups):
            start = 0
            for batch in parquet.iter_batches(batch_size=_BATCH_ROWS, row_groups=[group]):
                yield from _lazy_rows(batch, lambda j, col, item, g=group, s=start: ImageRef(
                    str(path), "parquet", g, s + j, col, item))
                start += batch.num_rows
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
            for k, batch in enumerate(pa.ipc.open_stream(source)):
                for start in range(0, batch.num_rows, _BATCH_ROWS):
                    yield from _lazy_rows(batch.slice(start, _BATCH_ROWS), lambda j, col, item, k=k, s=start: ImageRef(
                        str(path), "arrow", k, s + j, col, item))
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


def image_bytes(value: Any, where: str) -> bytes | ImageRef | MissingImage:
    """The encoded image of an HF ``Image`` column value: ``{"bytes": ..., "path": ...}`` or raw bytes. Read
    by :func:`read_rows`, the bytes are an :class:`ImageRef`, read when the sample's batch runs. No embedded
    image is a missing image (:func:`eval.tasks.base.missing_image`)."""
    if isinstance(value, Mapping) and isinstance(value.get("bytes"), (bytes, ImageRef)) and value["bytes"]:
        return value["bytes"]
    if isinstance(value, bytes) and value:
        return value
    if isinstance(value, Mapping) and value.get("path"):
        return missing_image(f"{where}: the image is stored by path only ({value['path']!r}), not embedded")
    return missing_image(f"{where}: expected an embedded image ({{'bytes': ...}} or bytes), got {type(value).__name__}")


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
