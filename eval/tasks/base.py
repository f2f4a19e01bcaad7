"""What every evaluation task is: data + a prompt + a parser + a metric.

A task turns its benchmark files into :class:`EvalSample` objects, builds one prompt per sample, parses
the model's text into an answer, scores it, and aggregates per-sample records into metrics. The runner
(`eval/runner.py`) owns batching, files and resume; a task never sees the model.

Records are the JSON lines the runner writes, one per sample:
``{"id", "index", "type", "prompt", "prediction", "answer", "chain", "parsed", "reference", "score", "meta"}``
where ``prediction`` is the model's raw text and ``answer`` what :meth:`Task.parse` was given: the text
after any ``<think> … </think>`` reasoning chain (``chain``: none, closed or unterminated; see
``eval/reasoning.py``), so a task's parser never sees a chain. :meth:`Task.aggregate` reads only these
records, so metrics can be recomputed from the JSONL alone.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar, runtime_checkable

from PIL import Image

from common.errors import UserError

IMAGE_MARKER = "<image>"  # where the image goes in a prompt (LLaVA's first user turn: "<image>\n...")
LLAVA_SHORT_ANSWER = "Answer the question using a single word or phrase."  # LLaVA-1.5 VQA suffix


class EvalDataError(UserError, ValueError):
    """A benchmark file is missing or malformed; the message names the file and the field."""


# Set while the runner plans a ``skip_bad`` run: a task building its samples then leaves a missing image to
# the sample's batch, which skips it, instead of failing the whole task before any generation.
_MISSING_DEFERRED: ContextVar[bool] = ContextVar("missing_images_deferred", default=False)


@contextmanager
def missing_images_deferred() -> Iterator[None]:
    """Samples built inside keep a missing image (:func:`image_file`, :func:`missing_image`) and fail when
    their batch loads it."""
    token = _MISSING_DEFERRED.set(True)
    try:
        yield
    finally:
        _MISSING_DEFERRED.reset(token)


@dataclass(frozen=True)
class MissingImage:
    """The image of a sample built under :func:`missing_images_deferred` that is not there: ``reason``
    names the file and the record."""

    reason: str

    def __str__(self) -> str:
        return self.reason

    def read(self) -> bytes:
        raise EvalDataError(self.reason)


def missing_image(reason: str) -> MissingImage:
    """A missing image: an error naming the file and record, or under :func:`missing_images_deferred` a
    :class:`MissingImage` that fails when its batch loads it."""
    if not _MISSING_DEFERRED.get():
        raise EvalDataError(reason)
    return MissingImage(reason)


@runtime_checkable
class StoredImage(Protocol):
    """An encoded image left in a data file (a row of a local HF copy), read when its sample's batch runs;
    ``str()`` names where it lies."""

    def read(self) -> bytes: ...


@dataclass(frozen=True)
class EvalSample:
    """One question about one image. ``reference`` and ``meta`` must be JSON-serialisable."""

    id: str
    image: Image.Image | Path | bytes | StoredImage  # in memory, a file, encoded bytes or a stored image
    question: str
    reference: Any
    type: str = "all"  # the row of the per-type table this sample counts in
    meta: dict[str, Any] = field(default_factory=dict)

    def load_image(self, stored: bytes | None = None) -> Image.Image:
        """The image, decoded to RGB. ``stored``: the bytes of a stored image when its batch has read them
        already; else it is read now. A missing or unreadable image raises naming the file and the sample."""
        if isinstance(self.image, Image.Image):
            return self.image.convert("RGB")
        if isinstance(self.image, (bytes, Path)):
            data, where = self.image, "embedded image" if isinstance(self.image, bytes) else str(self.image)
        else:
            where = str(self.image)
            try:
                data = stored if stored is not None else self.image.read()
            except EvalDataError as err:
                raise EvalDataError(f"{err} (sample {self.id!r})") from err
        try:
            with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as img:
                return img.convert("RGB")
        except (OSError, ValueError) as err:
            raise EvalDataError(f"{where}: cannot read the image of sample {self.id!r}: {err}") from err


@runtime_checkable
class Task(Protocol):
    """The interface the runner drives."""

    name: str

    def samples(self) -> Iterator[EvalSample]: ...

    def build_prompt(self, sample: EvalSample) -> str: ...

    def parse(self, sample: EvalSample, text: str) -> Any: ...

    def score(self, sample: EvalSample, parsed: Any) -> float: ...

    def aggregate(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        """The metrics of ``records``; the first entry is the task's headline metric (the one the summary
        of several tasks shows)."""
        ...

    def protocol(self) -> dict[str, Any]: ...

    def generation_kwargs(self) -> dict[str, Any]: ...


class BaseTask:
    """Defaults shared by the tasks: a format-string prompt, stripped answers, accuracy by type.

    Subclasses set ``name``, ``prompt_version`` and ``self.prompt`` (a template with ``{question}``),
    and implement :meth:`samples` and :meth:`score`.
    """

    name = "base"
    prompt_version = "v1"
    prompt: str = IMAGE_MARKER + "\n{question}"
    generated = False  # True: samples come from a seeded generator (its config), not from benchmark files

    def samples(self) -> Iterator[EvalSample]:
        raise NotImplementedError

    def build_prompt(self, sample: EvalSample) -> str:
        return self.prompt.format(question=sample.question)

    def parse(self, sample: EvalSample, text: str) -> Any:
        return text.strip()

    def score(self, sample: EvalSample, parsed: Any) -> float:
        raise NotImplementedError

    def aggregate(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        return {"accuracy": mean_score(records), **per_type(records), "n": len(records)}

    def protocol_extra(self) -> dict[str, Any]:
        """Task-specific protocol flags (coordinate convention, OCR tokens in prompt, ...)."""
        return {}

    def protocol(self) -> dict[str, Any]:
        return {
            "task": self.name, "prompt_version": self.prompt_version, "prompt_template": self.prompt,
            **self.protocol_extra(),
        }

    def generation_kwargs(self) -> dict[str, Any]:
        """Extra keyword arguments for ``generate`` beyond ``max_new_tokens`` (none: greedy decoding)."""
        return {}


# --- helpers for aggregation ---------------------------------------------------------------------
def mean_score(records: Iterable[Mapping[str, Any]]) -> float | None:
    """Mean per-sample score; None for no records (a metric over nothing is not 0)."""
    scores = [float(r["score"]) for r in records]
    return sum(scores) / len(scores) if scores else None


def group_by(records: Iterable[Mapping[str, Any]], key: Any) -> dict[str, list[Mapping[str, Any]]]:
    """Records grouped by ``key(record)``, groups in first-seen order."""
    groups: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for r in records:
        groups[key(r)].append(r)
    return dict(groups)


def per_meta(records: Iterable[Mapping[str, Any]], key: str) -> dict[str, float | None]:
    """``{value: mean score}`` over the records grouped by ``record["meta"][key]``, values sorted."""
    return {t: mean_score(rs) for t, rs in sorted(group_by(records, lambda r: r["meta"][key]).items())}


def per_type(records: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """``{"per_type": {type: mean score}, "n_per_type": {type: count}}``, types sorted by name."""
    groups = group_by(records, lambda r: r["type"])
    names = sorted(groups)
    return {
        "per_type": {t: mean_score(groups[t]) for t in names},
        "n_per_type": {t: len(groups[t]) for t in names},
    }


# --- helpers for reading benchmark files -----------------------------------------------------------
def read_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise EvalDataError(f"{path}: file not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise EvalDataError(f"{path}: not valid JSON: {err}") from err


def read_jsonl(path: str | Path) -> list[Any]:
    path = Path(path)
    if not path.is_file():
        raise EvalDataError(f"{path}: file not found")
    rows = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise EvalDataError(f"{path}:{lineno}: not valid JSON: {err}") from err
    return rows


def field_of(row: Any, key: str, kind: type | tuple[type, ...], where: str) -> Any:
    """``row[key]``, checked to be of ``kind``; errors name ``where`` (file + record) and the field."""
    if not isinstance(row, Mapping):
        raise EvalDataError(f"{where}: expected an object, got {type(row).__name__}")
    if key not in row:
        raise EvalDataError(f"{where}: missing field {key!r}")
    value = row[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        expected = " or ".join(k.__name__ for k in kinds)
        raise EvalDataError(f"{where}: field {key!r} should be {expected}, got {value!r}")
    return value


def image_dir(images: str | None, default: str | Path, what: str) -> Path:
    """The image folder (``images``, or ``default`` when None); must exist."""
    folder = Path(images) if images else Path(default)
    if not folder.is_dir():
        raise EvalDataError(f"{folder}: image folder for {what} not found (set `images`)")
    return folder


def image_file(folder: Path, name: str, where: str) -> Path:
    """``folder / name``, which must exist: a missing image fails before any generation starts (under
    :func:`missing_images_deferred`, when its batch loads it)."""
    path = folder / name
    if not path.is_file():
        missing_image(f"{where}: image {path} not found")
    return path


def read_json_object(path: Path, shape: str) -> Mapping[str, Any]:
    """A JSON file holding one object; ``shape`` (e.g. ``"{pid: problem}"``) names it in the error."""
    data = read_json(path)
    if not isinstance(data, Mapping):
        raise EvalDataError(f"{path}: expected a JSON object {shape}")
    return data


def list_field(data: Any, key: str, path: str | Path) -> list[Any]:
    """``data[key]`` of a loaded JSON file, which must be a list."""
    if not isinstance(data, Mapping) or not isinstance(data.get(key), list):
        raise EvalDataError(f"{path}: expected a JSON object with a list under {key!r}")
    return data[key]


@dataclass
class FileTaskConfig:
    """Fields every benchmark task reads: its data file and image folder, and its prompt template."""

    data: str  # the benchmark's annotation/question file (see each task)
    images: str | None = None  # image folder; None = the task's default next to ``data``
    prompt: str = IMAGE_MARKER + "\n{question}\n" + LLAVA_SHORT_ANSWER  # ``{question}`` is filled in


def file_revision(path: str | Path) -> dict[str, Any]:
    """A data file's identity for the protocol record: name, size and SHA-256 prefix."""
    path = Path(path)
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return {"file": path.name, "bytes": path.stat().st_size, "sha256": digest.hexdigest()[:16]}


ConfigT = TypeVar("ConfigT", bound=FileTaskConfig)


class FileTask(BaseTask, Generic[ConfigT]):
    """A benchmark read from files: ``cfg`` is a :class:`FileTaskConfig` (sub)class instance."""

    def __init__(self, cfg: ConfigT) -> None:
        if "{question}" not in cfg.prompt:
            raise EvalDataError(f"{self.name}.prompt: the template must contain '{{question}}', got {cfg.prompt!r}")
        self.cfg: ConfigT = cfg
        self.prompt = cfg.prompt

    def image_folder(self, default: Path) -> Path:
        """The task's image folder: ``cfg.images``, else ``default``; must exist."""
        return image_dir(self.cfg.images, default, self.name)

    def data_files(self) -> list[str]:
        """The files whose revision goes into the protocol record."""
        return [self.cfg.data]

    def protocol(self) -> dict[str, Any]:
        return {**super().protocol(), "dataset_revision": [file_revision(p) for p in self.data_files()]}


def str_list(row: Any, key: str, where: str) -> list[str]:
    """``row[key]``, a list of strings."""
    values = field_of(row, key, list, where)
    bad = next((j for j, v in enumerate(values) if not isinstance(v, str)), None)
    if bad is not None:
        raise EvalDataError(f"{where}: field {key!r}[{bad}] should be str, got {values[bad]!r}")
    return values
