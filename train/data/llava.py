"""LLaVA conversation data: LLaVA's own JSON / JSONL read unchanged, and Hugging Face ``datasets``.

Every source yields the sample dict :class:`train.data.collate.Collator` takes::

    {"id": str, "image": PIL.Image | None, "conversations": [{"from": "human"|"gpt", "value": str}, ...]}

``image`` is ``None`` for a text-only sample. LLaVA records (``id``, ``image``, ``conversations``
with the ``<image>`` marker, multi-turn) are used as they are; ``datasets`` rows may instead carry
chat ``messages`` (``role`` user/assistant, ``content``), and an image as a decoded ``Image``
feature, ``{"bytes", "path"}`` or a path. Image paths are relative to ``image_root`` (LLaVA's
``--image_folder``); a path that leaves the root (absolute, or ``..`` climbing out) is refused with
an error naming the record. A missing or undecodable image is reported with its path and, by
``bad_images``, either skips the sample (``None``: the collator drops it and counts it) or stops
the run.
"""

from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from common.errors import UserError

log = logging.getLogger("mllm.data")

SOURCES = ("auto", "llava_json", "hf_disk", "hf_json", "hf_parquet")
ROLE_TO_FROM = {"user": "human", "human": "human", "assistant": "gpt", "gpt": "gpt"}
TURN_ROLES = ("human", "gpt")  # LLaVA's roles, alternating from human, as the templates (pair_turns) take them


class DataError(UserError, ValueError):
    """A data file, record or image is unusable; the message names the file / record / path."""


@dataclass
class LlavaDataConfig:
    path: str  # LLaVA JSON list / JSONL file, a datasets save_to_disk folder, or .json/.jsonl/.parquet file(s)
    image_root: str | None = None  # folder `image` paths are relative to; None = the data file's folder
    source: str = "auto"  # auto | llava_json | hf_disk | hf_json | hf_parquet
    split: str = "train"  # split of a DatasetDict (hf_disk) or of load_dataset (hf_json / hf_parquet)
    streaming: bool = False  # hf_json / hf_parquet read as a stream: no random access, read in file order
    bad_images: str = "skip"  # skip: log the path, count, drop the sample | error: stop the run
    limit: int | None = None  # the first N records only

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise DataError(f"source: expected one of {', '.join(SOURCES)}, got {self.source!r}")
        if self.bad_images not in ("skip", "error"):
            raise DataError(f"bad_images: expected skip or error, got {self.bad_images!r}")
        if self.streaming and self.source in ("llava_json", "hf_disk"):
            raise DataError(f"streaming: source {self.source} is read whole; use hf_json or hf_parquet")
        if self.limit is not None and self.limit <= 0:
            raise DataError(f"limit: expected a positive count, got {self.limit}")


def resolve_image_path(root: Path, relative: str, where: str) -> Path:
    """``root / relative``, refused when it leaves ``root`` (compared after normalising ``..``)."""
    if os.path.isabs(relative):
        raise DataError(f"{where}: image path {relative!r} is absolute; expected a path under {root}")
    base = os.path.normpath(os.path.abspath(root))
    full = os.path.normpath(os.path.join(base, relative))
    if os.path.commonpath([base, full]) != base:
        raise DataError(f"{where}: image path {relative!r} leaves the image root {root}")
    return Path(full)


def _conversations(record: Mapping[str, Any], where: str) -> list[dict[str, str]]:
    """LLaVA ``conversations`` as they are, or chat ``messages`` renamed to LLaVA's keys; the turns'
    roles are checked here (before training, for a random-access data set), not mid-run."""
    if "conversations" in record:
        turns = record["conversations"]
        if not isinstance(turns, list) or not all(isinstance(t, Mapping) and "from" in t and "value" in t for t in turns):
            raise DataError(f"{where}: 'conversations' must be a list of {{from, value}} turns")
        return _check_roles([{"from": str(t["from"]), "value": str(t["value"])} for t in turns], where)
    if "messages" in record:
        out = []
        for t in record["messages"]:
            role = t.get("role") if isinstance(t, Mapping) else None
            if role not in ROLE_TO_FROM or not isinstance(t.get("content"), str):
                raise DataError(f"{where}: 'messages' turns need role user/assistant and text content, got {t!r}")
            out.append({"from": ROLE_TO_FROM[role], "value": t["content"]})
        return _check_roles(out, where)
    raise DataError(f"{where}: expected a 'conversations' (LLaVA) or 'messages' (chat) field")


def _check_roles(turns: list[dict[str, str]], where: str) -> list[dict[str, str]]:
    """``turns``, if they alternate human, gpt, human, gpt, ... (what every template renders)."""
    for j, turn in enumerate(turns):
        role = turn["from"]
        if role not in TURN_ROLES:
            raise DataError(f"{where}: turn {j}: role {role!r}; expected 'human' or 'gpt' (no other role is trained)")
        if role != TURN_ROLES[j % 2]:
            raise DataError(f"{where}: turn {j}: role {role!r} out of order; expected alternating 'human', 'gpt' turns "
                            "starting with 'human'")
    if not turns or len(turns) % 2:
        raise DataError(f"{where}: {len(turns)} turns; expected pairs of 'human', 'gpt' turns")
    return turns


class _Images:
    """Opens a record's image under the root, applying the ``bad_images`` policy."""

    def __init__(self, root: Path, bad_images: str) -> None:
        self.root, self.bad_images = root, bad_images
        self.skipped = 0  # samples this process skipped for a bad image

    def check(self, image: Any, where: str) -> None:
        if isinstance(image, list):
            raise DataError(f"{where}: {len(image)} images in one sample; one image per sample is supported")
        if isinstance(image, str) and image:
            resolve_image_path(self.root, image, where)

    def open(self, image: Any, where: str) -> tuple[Image.Image | None, bool]:
        """``(image or None, ok)``: ``ok`` is false for a bad image under ``bad_images=skip``."""
        self.check(image, where)
        if image is None or image == "":
            return None, True
        if isinstance(image, Image.Image):
            return image.convert("RGB"), True
        if isinstance(image, Mapping) and image.get("bytes") is not None:
            source: Any = io.BytesIO(image["bytes"])
            label = image.get("path") or "<bytes>"
        elif isinstance(image, Mapping) and image.get("path"):
            source = label = resolve_image_path(self.root, str(image["path"]), where)
        elif isinstance(image, str):
            source = label = resolve_image_path(self.root, image, where)
        else:
            raise DataError(f"{where}: 'image' must be a path, an image or {{bytes, path}}, got {type(image).__name__}")
        try:
            with Image.open(source) as im:
                return im.convert("RGB"), True  # convert decodes the whole file: truncation fails here
        except (OSError, SyntaxError, ValueError) as err:  # missing, unreadable or corrupt
            if self.bad_images == "error":
                raise DataError(f"{where}: image {label}: {err}") from err
            self.skipped += 1
            log.warning("%s: image %s unreadable (%s); sample skipped (bad_images=skip, %d so far)",
                        where, label, err, self.skipped)
            return None, False


def _sample(record: Mapping[str, Any], index: int, images: _Images, origin: str) -> dict[str, Any] | None:
    sid = str(record.get("id", index))
    where = f"{origin}: record {index} (id {sid})"
    conversations = _conversations(record, where)
    image, ok = images.open(record.get("image"), where)
    return {"id": sid, "image": image, "conversations": conversations} if ok else None


def _words(conversations: Sequence[Mapping[str, str]]) -> int:
    return sum(len(turn["value"].split()) for turn in conversations)


class LlavaDataset(Sequence[Any]):
    """Random-access samples over records (a list, or a ``datasets.Dataset``); ``None`` = skipped."""

    def __init__(self, records: Sequence[Mapping[str, Any]], image_root: Path, bad_images: str, origin: str) -> None:
        self.records, self.origin = records, origin
        self.images = _Images(image_root, bad_images)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any] | None:  # type: ignore[override]
        return _sample(self.records[index], index, self.images, self.origin)

    @property
    def skipped(self) -> int:
        return self.images.skipped

    def _text_records(self) -> Iterator[Mapping[str, Any]]:
        """Records without their image column, so a ``datasets`` table does not decode images."""
        if "image" in (getattr(self.records, "column_names", None) or []):
            yield from self.records.remove_columns("image")  # type: ignore[attr-defined]
        else:
            yield from self.records

    def _image_refs(self) -> list[Any]:
        """Each record's image value, undecoded: a path as it is, an embedded image as ``True``."""
        cols = getattr(self.records, "column_names", None)
        if cols is None:
            return [r.get("image") for r in self.records]
        if "image" not in cols:
            return [None] * len(self)
        column = self.records.select_columns(["image"]).with_format("arrow")[:]["image"]  # type: ignore[attr-defined]
        if getattr(self.records.features["image"], "dtype", None) in ("string", "large_string"):  # type: ignore[attr-defined]
            return column.to_pylist()
        return [True if valid else None for valid in column.is_valid().to_pylist()]

    def validate(self) -> None:
        """Check every record's turns and image path (no image is opened): bad records stop the run
        before training starts, naming the record."""
        for i, (record, image) in enumerate(zip(self._text_records(), self._image_refs(), strict=True)):
            where = f"{self.origin}: record {i} (id {record.get('id', i)})"
            _conversations(record, where)
            self.images.check(image, where)

    def lengths(self, image_tokens: int = 0) -> list[int]:
        """Approximate length of each sample (words, + ``image_tokens`` with an image), for
        length-grouped batching; no image is opened."""
        return [
            _words(_conversations(r, f"{self.origin}: record {i}")) + (image_tokens if image else 0)
            for i, (r, image) in enumerate(zip(self._text_records(), self._image_refs(), strict=True))
        ]

    def vocabulary_texts(self) -> list[str]:
        """Every turn's text, for building a word-level tokenizer on this data."""
        return [t["value"] for i, r in enumerate(self._text_records()) for t in _conversations(r, f"record {i}")]


class LlavaStream:
    """Samples of an iterable (a streaming ``datasets.IterableDataset``), in order; ``None`` = skipped."""

    def __init__(self, records: Any, image_root: Path, bad_images: str, origin: str) -> None:
        self.records, self.origin = records, origin
        self.images = _Images(image_root, bad_images)

    def __iter__(self) -> Iterator[dict[str, Any] | None]:
        for index, record in enumerate(self.records):
            yield _sample(record, index, self.images, self.origin)


def read_llava_json(path: Path, limit: int | None = None) -> list[dict[str, Any]]:
    """LLaVA's JSON (a list of records) or JSONL (one record per line), unchanged."""
    if not path.is_file():
        raise DataError(f"{path}: data file not found")
    text = path.read_text(encoding="utf-8")
    if path.suffix != ".jsonl":
        try:
            records = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}: malformed JSON: {err}") from err
    else:
        records = []
        for n, line in enumerate(text.splitlines(), 1):
            if limit is not None and len(records) >= limit:
                break
            try:
                if line.strip():
                    records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise DataError(f"{path}: line {n}: malformed JSON: {err}") from err
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise DataError(f"{path}: expected a list of records (LLaVA JSON) or one object per line (JSONL)")
    return records[:limit] if limit is not None else records


def _source(cfg: LlavaDataConfig, path: Path) -> str:
    if cfg.source != "auto":
        return cfg.source
    if path.is_dir():
        return "hf_disk"
    if path.suffix == ".parquet":
        return "hf_parquet"
    if path.suffix in (".json", ".jsonl"):
        return "hf_json" if cfg.streaming else "llava_json"
    raise DataError(f"data.path: cannot tell the format of {path}; set data.source to one of {', '.join(SOURCES[1:])}")


def load_llava(cfg: LlavaDataConfig) -> LlavaDataset | LlavaStream:
    """The configured data as samples: a :class:`LlavaDataset`, or a :class:`LlavaStream` when streaming.

    Every record's conversation and image path are checked here (escaping paths are refused before
    training starts), except for streams, which are checked as they are read.
    """
    path = Path(cfg.path)
    source = _source(cfg, path)
    root = Path(cfg.image_root) if cfg.image_root is not None else (path if path.is_dir() else path.parent)
    if source == "llava_json":
        records: Any = read_llava_json(path, cfg.limit)
    else:
        records = _load_hf(cfg, path, source)
    if cfg.streaming:
        return LlavaStream(records, root, cfg.bad_images, str(path))
    data = LlavaDataset(records, root, cfg.bad_images, str(path))
    if not len(data):
        raise DataError(f"{path}: no records")
    data.validate()
    return data


def _load_hf(cfg: LlavaDataConfig, path: Path, source: str) -> Any:
    import datasets

    try:
        if source == "hf_disk":
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                if cfg.split not in ds:
                    raise DataError(f"{path}: no split {cfg.split!r}; it has {', '.join(ds)}")
                ds = ds[cfg.split]
        else:
            builder = "json" if source == "hf_json" else "parquet"
            ds = datasets.load_dataset(builder, data_files={cfg.split: str(path)}, split=cfg.split,
                                       streaming=cfg.streaming)
    except (FileNotFoundError, ValueError) as err:
        if isinstance(err, DataError):
            raise
        raise DataError(f"{path}: cannot be read as {source}: {err}") from err
    if cfg.limit is not None:
        ds = ds.take(cfg.limit) if cfg.streaming else ds.select(range(min(cfg.limit, len(ds))))
    return ds
