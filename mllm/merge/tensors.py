"""Streaming safetensors I/O for merging: lazy readers, a streaming sharded writer, atomic output.

* :class:`ModelReader` opens a local Hugging Face folder (``model.safetensors`` or sharded with
  ``model.safetensors.index.json``), learns every tensor's name, shape, dtype and byte offset from
  the file headers, and reads one tensor -- or one block of its rows, which is one contiguous byte
  range -- at a time with a single positioned read into a fresh buffer. Nothing is memory-mapped:
  pages of a mapped file count in the process' RSS while mapped, and faulting them in page by page
  made ``safe_open`` reads (a map per read, sliced and copied) about 5x slower than one ``readinto``
  (benchmarks/bench_merge.py); the page cache still serves repeated reads.
* :class:`ShardWriter` writes size-capped shards plus ``model.safetensors.index.json``. Every output
  tensor's shape and dtype is known before merging starts (merging preserves shapes), so each shard's
  header is written first and tensor bytes -- whole tensors or row blocks -- are streamed after it:
  the writer holds no tensor of its own, and memory does not grow with the shard or tensor size. The format written is the safetensors format
  (8-byte little-endian header length, JSON header with ``data_offsets``, header padded with spaces
  to 8 bytes); the safetensors library only offers one-shot ``save_file``, hence this small writer.
* :func:`ensure_output_free` refuses an existing output folder before any reading; the engine then
  builds the output with :func:`common.atomic.atomic_folder` (hidden temp folder, renamed into place
  only when everything succeeded): a failed merge leaves no folder that looks complete.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from common.errors import UserError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "vocab.txt", "merges.txt", "added_tokens.json", "spiece.model",
    "chat_template.jinja", "chat_template.json",
)
# Weight files and cards are never copied as side files: weights are re-written, the card is ours.
_NOT_SIDE_FILES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".index.json", "README.md")

_ST_TO_TORCH = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_TORCH_TO_ST = {v: k for k, v in _ST_TO_TORCH.items()}
DTYPES = {
    "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64,
}


class MergeError(UserError, ValueError):
    """Bad merge input (config, folder, tensor); the message names the file/field/tensor."""


class ModelReader:
    """Lazy view of the safetensors weights of one local model folder."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise MergeError(f"{self.path}: model folder not found")
        self._where: dict[str, str] = {}
        self._start: dict[str, int] = {}  # byte offset of the tensor's data in its file
        self._shape: dict[str, tuple[int, ...]] = {}
        self._dtype: dict[str, torch.dtype] = {}
        for fname in self._weight_files():
            data_start, header = read_header(self.path / fname)
            for name in sorted(header):  # sorted within a file, as safe_open's keys()
                self._where[name] = fname
                self._start[name] = data_start + header[name]["data_offsets"][0]
                self._shape[name] = tuple(int(d) for d in header[name]["shape"])
                self._dtype[name] = _ST_TO_TORCH[header[name]["dtype"]]
        self._check_index()

    def _weight_files(self) -> list[str]:
        index = self.path / INDEX_FILE
        if index.is_file():
            try:
                self._index = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise MergeError(f"{index}: malformed index (expected a 'weight_map' mapping): {err}") from err
            files = sorted(set(self._index.values()))
            missing = [f for f in files if not (self.path / f).is_file()]
            if missing:
                raise MergeError(f"{index}: shard {missing[0]!r} listed in weight_map does not exist")
            return files
        self._index = None
        if (self.path / SINGLE_FILE).is_file():
            return [SINGLE_FILE]
        raise MergeError(f"{self.path}: no {SINGLE_FILE} or {INDEX_FILE} (safetensors weights expected)")

    def _check_index(self) -> None:
        if self._index is None:
            return
        for name, fname in self._index.items():
            if self._where.get(name) != fname:
                raise MergeError(f"{self.path / INDEX_FILE}: tensor {name!r} is not in shard {fname!r}")

    @property
    def config(self) -> dict[str, Any]:
        """``config.json`` as a dict -- for an ``mllm`` MLLM folder its LLM's ``llm/config.json`` --,
        {} when there is none."""
        cfg = self.path / "config.json"
        if not cfg.is_file():
            cfg = self.path / "llm" / "config.json"
        if not cfg.is_file():
            return {}
        try:
            return json.loads(cfg.read_text())
        except json.JSONDecodeError as err:
            raise MergeError(f"{cfg}: malformed JSON: {err}") from err

    def names(self) -> list[str]:
        """Tensor names in file order (shard by shard)."""
        return list(self._where)

    def __contains__(self, name: object) -> bool:
        return name in self._where

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shape[name]

    def dtype(self, name: str) -> torch.dtype:
        return self._dtype[name]

    def file_of(self, name: str) -> Path:
        return self.path / self._where[name]

    def get(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Read one tensor, or only its rows ``[start, stop)`` along dim 0, from disk (a fresh CPU tensor)."""
        shape, dtype = self._shape[name], self._dtype[name]
        row_bytes = math.prod(shape[1:]) * dtype.itemsize
        first, stop = rows if rows is not None else (0, shape[0] if shape else 1)
        if rows is not None:
            shape = (stop - first, *shape[1:])
        buf = torch.empty((stop - first) * row_bytes, dtype=torch.uint8)
        read_exactly(self.file_of(name), self._start[name] + first * row_bytes, buf.numpy())
        return buf.view(dtype).reshape(shape)


def read_header(path: Path) -> tuple[int, dict[str, dict[str, Any]]]:
    """(offset of the data section, {name: {dtype, shape, data_offsets}}) of one safetensors file.

    Checked as the safetensors library checks it -- known dtype, size = elements x item size, data
    inside the file -- since reads go by these offsets; a bad header is a MergeError naming the file.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little") if size >= 8 else -1
            raw = fh.read(n) if 0 <= n <= size - 8 else None
    except OSError as err:
        raise MergeError(f"{path}: cannot read safetensors header: {err}") from err
    if raw is None:
        raise MergeError(f"{path}: not a safetensors file (header length {n}, file size {size})")
    try:
        header = json.loads(raw)
    except ValueError as err:  # JSONDecodeError and UnicodeDecodeError
        raise MergeError(f"{path}: cannot read safetensors header: {err}") from err
    if not isinstance(header, dict):
        raise MergeError(f"{path}: safetensors header is not a JSON object")
    header.pop("__metadata__", None)
    for name, entry in header.items():
        try:
            dtype = _ST_TO_TORCH[entry["dtype"]]
            begin, end = (int(x) for x in entry["data_offsets"])
            elems = math.prod(int(d) for d in entry["shape"])
        except (KeyError, TypeError, ValueError) as err:
            raise MergeError(f"{path}: tensor {name!r}: unsupported dtype or malformed header entry {entry!r}") from err
        if end - begin != elems * dtype.itemsize or begin < 0 or end > size - 8 - n:
            raise MergeError(f"{path}: tensor {name!r}: data_offsets {[begin, end]} do not fit its shape and dtype "
                             f"or lie outside the file")
    return 8 + n, header


def read_exactly(path: Path, offset: int, out: Any) -> None:
    """Fill the writable buffer ``out`` with the bytes of ``path`` from ``offset`` on."""
    view = memoryview(out).cast("B")
    with open(path, "rb", buffering=0) as fh:
        fh.seek(offset)
        done = 0
        while done < len(view):
            got = fh.readinto(view[done:])
            if not got:
                raise MergeError(f"{path}: file ends inside a tensor (truncated?)")
            done += got


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape and dtype of one output tensor, known before it is computed."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * torch.empty((), dtype=self.dtype).element_size()


class ShardWriter:
    """Stream tensors, in ``specs`` order, into shards of at most ``max_shard_bytes`` each.

    A tensor larger than the cap gets a shard of its own. One shard is written as ``model.safetensors``
    (no index, as ``save_pretrained`` does); several as ``model-0000i-of-0000n.safetensors`` plus the
    index. ``write`` must be called once per spec, in order; ``close`` checks that all were written.
    """

    def __init__(self, directory: Path, specs: Sequence[TensorSpec], max_shard_bytes: int) -> None:
        self.directory = Path(directory)
        self._specs = list(specs)
        self._shards: list[list[TensorSpec]] = []
        size = 0
        for spec in self._specs:
            if not self._shards or (size + spec.nbytes > max_shard_bytes and self._shards[-1]):
                self._shards.append([])
                size = 0
            self._shards[-1].append(spec)
            size += spec.nbytes
        n = len(self._shards)
        self._files = [SINGLE_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self._next = 0  # index into self._specs
        self._shard = -1
        self._left_in_shard = 0
        self._fh: Any = None

    def _open_next_shard(self) -> None:
        self._shard += 1
        specs = self._shards[self._shard]
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for spec in specs:
            header[spec.name] = {
                "dtype": _TORCH_TO_ST[spec.dtype], "shape": list(spec.shape),
                "data_offsets": [offset, offset + spec.nbytes],
            }
            offset += spec.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self._fh = open(self.directory / self._files[self._shard], "wb")  # noqa: SIM115 (closed per shard)
        self._fh.write(len(raw).to_bytes(8, "little"))
        self._fh.write(raw)
        self._left_in_shard = len(specs)

    def write(self, name: str, data: torch.Tensor | Iterable[torch.Tensor]) -> None:
        """Write tensor ``name``: the whole tensor, or its consecutive row blocks (along dim 0) in order."""
        if self._next >= len(self._specs):
            raise RuntimeError(f"ShardWriter: unexpected extra tensor {name!r}")
        spec = self._specs[self._next]
        if name != spec.name:
            raise RuntimeError(f"ShardWriter: got {name!r}, expected {spec.name!r} (tensors are written in order)")
        if self._left_in_shard == 0:
            self._open_next_shard()
        rows = 0
        for chunk in [data] if isinstance(data, torch.Tensor) else data:
            if chunk.dtype != spec.dtype or tuple(chunk.shape[1:]) != spec.shape[1:] or (not spec.shape and chunk.dim()):
                raise RuntimeError(
                    f"ShardWriter: got {name!r} {tuple(chunk.shape)} {chunk.dtype}, expected {spec.shape} {spec.dtype}"
                )
            flat = chunk.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
            self._fh.write(memoryview(flat.numpy()))
            rows += chunk.shape[0] if spec.shape else 1
        if rows != (spec.shape[0] if spec.shape else 1):
            raise RuntimeError(f"ShardWriter: {name!r} got {rows} rows, expected shape {spec.shape}")
        self._next += 1
        self._left_in_shard -= 1
        if self._left_in_shard == 0:
            self._fh.close()
            self._fh = None

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fh is not None:  # an error mid-shard: release the file; the temp folder is discarded
            self._fh.close()
            self._fh = None

    def close(self) -> list[str]:
        """Finish: check completeness, write the index when sharded; returns the shard file names."""
        if self._next != len(self._specs):
            raise RuntimeError(f"ShardWriter: {len(self._specs) - self._next} tensors were never written")
        if len(self._files) > 1:
            weight_map = {s.name: f for f, shard in zip(self._files, self._shards, strict=True) for s in shard}
            total = sum(s.nbytes for s in self._specs)
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (self.directory / INDEX_FILE).write_text(json.dumps(index, indent=2))
        return list(self._files)


def ensure_output_free(out_dir: Path, overwrite: bool) -> None:
    """Fail early (before any reading) when ``out_dir`` exists and may not be replaced."""
    if out_dir.exists() and not overwrite:
        raise MergeError(f"{out_dir}: output folder already exists (pass overwrite to replace it)")
    if out_dir.exists() and not out_dir.is_dir():
        raise MergeError(f"{out_dir}: exists and is not a folder")


def tokenizer_files(folder: Path) -> list[str]:
    """The tokenizer files present in ``folder``; MergeError when there are none."""
    found = [n for n in TOKENIZER_FILES if (folder / n).is_file()]
    if not found:
        raise MergeError(f"{folder}: tokenizer_source has no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...)")
    return found


def copy_side_files(src: Path, dst: Path, tokenizer_src: Path | None = None) -> list[str]:
    """Copy ``src``'s non-weight files (config, generation config, tokenizer, a transformers MLLM's processor
    and chat-template files, our MLLM's ``llm/`` and ``tokenizer/`` folders, ...) into ``dst``; weight files
    are skipped at every depth.

    With ``tokenizer_src`` the tokenizer files at its top level are copied instead of ``src``'s
    (those of ``src`` are left out, so the two tokenizers never mix).
    """
    copied = []
    skip = shutil.ignore_patterns(*(f"*{suffix}" for suffix in _NOT_SIDE_FILES))
    for f in sorted(src.iterdir()):
        if f.name.endswith(_NOT_SIDE_FILES) or (tokenizer_src is not None and f.name in TOKENIZER_FILES):
            continue
        if f.is_dir():
            shutil.copytree(f, dst / f.name, ignore=skip)
        elif f.is_file():
            shutil.copy2(f, dst / f.name)
        copied.append(f.name)
    if tokenizer_src is not None:
        for n in tokenizer_files(tokenizer_src):
            shutil.copy2(tokenizer_src / n, dst / n)
            copied.append(n)
    return copied


def set_config_dtype(out: Path, dtype: torch.dtype) -> None:
    """Record the output dtype in ``config.json`` (top level and ``text_config``) where it is stated."""
    path = out / "config.json"
    if not path.is_file():
        return
    cfg = json.loads(path.read_text())
    name = str(dtype).removeprefix("torch.")
    for node in (cfg, cfg.get("text_config")):
        if isinstance(node, dict):
            for key in ("dtype", "torch_dtype"):
                if key in node:
                    node[key] = name
    path.write_text(json.dumps(cfg, indent=2) + "\n")
