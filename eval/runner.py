"""One batched, resumable, data-parallel generation runner for every task.

``run_task(generator, task, cfg, out_dir, resume)`` writes into ``out_dir``:

* ``predictions.jsonl`` — one record per sample, appended and flushed batch by batch, so an
  interrupted run resumes where it stopped and never recomputes or loses a finished sample (flushed
  records survive the process; ``fsync`` every ``SYNC_EVERY_S`` seconds and at the end bounds what a
  machine crash can take to that much work, which resume then recomputes);
* ``protocol.json`` — prompt version and template, generation kwargs, coordinate convention, ...;
  resuming under a different protocol is refused;
* ``metrics.json`` (atomic) — the task's metrics, ``main_metric`` (the name of the first, its headline),
  the reasoning chains counted (``n_chain``, ``n_unterminated``: see ``eval/reasoning.py``), ``skipped``
  and ``"protocol"``; ``results.md`` — the table;
* ``skipped.jsonl`` — with ``skip_bad``, one ``{"id", "index", "reason"}`` per sample whose image is missing
  or unreadable: not generated, not scored, counted as ``skipped``. Without it the first such image stops
  the run with one error naming the file and the sample; the batches before it stay for resume.

Images are read when their batch runs (a stored image of a local HF copy is a reference into its data
file: :class:`eval.tasks.hf_files.ImageRef`), so planning holds no image in memory.

Under ``accelerate launch`` each process takes a strided shard of the unfinished samples and appends
to its own ``predictions.rank{r}.jsonl``; rank 0 then gathers all files (shared file system),
de-duplicates by sample id, writes ``predictions.jsonl`` and the metrics. One process = one shard:
the same code path with no launcher.

Batches do not run in dataset order but as :func:`schedule` groups them (samples of one type together,
longest prompt first): a batch pads to its longest prompt and decodes until its longest answer ends, so
mixing one-word answers with boxes makes the whole batch wait for the box. Every record carries its
dataset ``index`` and the final ``predictions.jsonl`` is written in dataset order.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from collections.abc import Set as AbstractSet
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from PIL import Image
from tqdm.auto import tqdm

from common.atomic import atomic_write
from common.errors import UserError
from eval.reasoning import EXTRACTION, chain_counts, split_reasoning
from eval.tasks.base import EvalDataError, EvalSample, Task, missing_images_deferred
from eval.tasks.hf_files import ImageReader, ImageRef

PREDICTIONS = "predictions.jsonl"
SKIPPED = "skipped.jsonl"
RESUMABLE = ("skip_bad",)  # recorded in protocol.json, yet a resumed run may change them (skip what stopped it)
SYNC_EVERY_S = 10.0  # fsync the predictions at most this often (and at the end); flushed every batch
SCHEDULE = "by type, longest prompt first"  # the batch order of :func:`schedule`, recorded with the metrics


class EvalError(UserError, RuntimeError):
    """The evaluation cannot go on (mismatched protocol on resume, corrupt predictions file, ...)."""


@dataclass
class EvalConfig:
    batch_size: int = 32  # samples per generate call (per process)
    max_new_tokens: int = 24  # generation budget per answer
    limit: int | None = None  # evaluate the first N samples of the task only

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size: expected >= 1, got {self.batch_size}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens: expected >= 1, got {self.max_new_tokens}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit: expected >= 1 or null, got {self.limit}")


class Generator(Protocol):
    """Any model that answers prompts about images. Decoding is greedy unless ``kw`` says otherwise.

    Each prompt is the full user turn with the ``<image>`` marker where its image goes.
    """

    def generate(self, images: list[Image.Image], prompts: list[str], **kw: Any) -> list[str]: ...


@dataclass(frozen=True)
class Dist:
    """This process's place in a data-parallel run, and a barrier across all processes."""

    rank: int = 0
    world: int = 1
    barrier: Callable[[], None] = field(default=lambda: None, compare=False)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_accelerate(cls) -> Dist:
        """The current accelerate process state (a single process when not launched)."""
        from accelerate import PartialState
        from accelerate.utils import parse_flag_from_env

        # As Accelerator does: without the flag a CPU-only launch (`accelerate launch --cpu`) would see one process.
        state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
        return cls(state.process_index, state.num_processes, state.wait_for_everyone)


@dataclass
class Shard:
    """The unfinished samples one process will generate, and where it appends them."""

    samples: list[tuple[int, EvalSample]]  # (position in the task's order, sample)
    path: Path
    n_total: int  # samples in the evaluation (after ``limit``), all processes together
    skipped_path: Path  # where this process records the samples it skips (``skip_bad``)


def predictions_path(out_dir: Path, dist: Dist, name: str = PREDICTIONS) -> Path:
    """``out_dir/name``, or its ``.rank{r}`` twin when several processes append."""
    return out_dir / (name if dist.world == 1 else name.replace(".jsonl", f".rank{dist.rank}.jsonl"))


def run_protocol(task: Task, cfg: EvalConfig) -> dict[str, Any]:
    """What must not change between a run and its resumption (batch size and limit may). The answer
    extraction is part of it: a file written before reasoning chains were split off (no such key) is
    refused on resume rather than scored under two rules."""
    return {**task.protocol(), "generation_kwargs": generation_kwargs(task, cfg), "answer_extraction": EXTRACTION}


def generation_kwargs(task: Task, cfg: EvalConfig) -> dict[str, Any]:
    return {"max_new_tokens": cfg.max_new_tokens, **task.generation_kwargs()}


# --- the predictions files ----------------------------------------------------------------------
def read_records(path: Path) -> list[dict[str, Any]]:
    """Records of one predictions file. A last line without newline is a torn write and is skipped."""
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    complete = lines[:-1]  # the part after the last newline is empty or torn
    records = []
    for lineno, line in enumerate(complete, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise EvalError(f"{path}:{lineno}: corrupt prediction record: {err}") from err
    return records


def _drop_torn_tail(path: Path) -> None:
    """Cut a torn last line (a write interrupted mid-record) so appends start on a fresh line."""
    if not path.exists():
        return
    data = path.read_bytes()
    keep = data.rfind(b"\n") + 1
    if keep != len(data):
        with path.open("r+b") as f:
            f.truncate(keep)


def existing_predictions(out_dir: Path) -> list[Path]:
    return sorted(out_dir.glob("predictions*.jsonl"))


def _check_protocol(out_dir: Path, protocol: dict[str, Any], resume: bool) -> None:
    """Refuse to overwrite finished predictions, or to resume them under another protocol (the
    :data:`RESUMABLE` settings aside)."""
    found = existing_predictions(out_dir)
    if found and not resume:
        raise EvalError(f"{found[0]}: predictions exist; resume them (--resume) or choose another output dir")
    path = out_dir / "protocol.json"
    if found and path.is_file():
        old = json.loads(path.read_text(encoding="utf-8"))
        changed = sorted(k for k in {*old, *protocol} if old.get(k) != protocol.get(k) and k not in RESUMABLE)
        if changed:
            raise EvalError(
                f"{path}: cannot resume under a different protocol; changed: "
                + ", ".join(f"{k} ({old.get(k)!r} -> {protocol.get(k)!r})" for k in changed)
            )
    atomic_write(path, json.dumps(protocol, indent=2) + "\n")


# --- the three steps ----------------------------------------------------------------------------
def plan_shard(task: Task, cfg: EvalConfig, out_dir: Path, dist: Dist, skip_bad: bool = False) -> Shard:
    """This process's unfinished samples: skip ids recorded in any predictions file, take every
    ``world``-th of the rest. Every process must plan before any process writes (see run_task). With
    ``skip_bad`` a missing image is left for its batch to skip (:func:`missing_images_deferred`)."""
    done = {r["id"] for p in existing_predictions(out_dir) for r in read_records(p)}
    todo: list[tuple[int, EvalSample]] = []
    seen: set[str] = set()
    n_total = 0
    with missing_images_deferred() if skip_bad else nullcontext():
        for index, sample in enumerate(task.samples()):
            if cfg.limit is not None and index >= cfg.limit:
                break
            if sample.id in seen:
                raise EvalError(f"task {task.name}: duplicate sample id {sample.id!r}")
            seen.add(sample.id)
            n_total += 1
            if sample.id not in done:
                todo.append((index, sample))
    if n_total == 0:
        raise EvalError(f"task {task.name}: no samples to evaluate (empty data file or split?)")
    return Shard(todo[dist.rank :: dist.world], predictions_path(out_dir, dist), n_total,
                 predictions_path(out_dir, dist, SKIPPED))


Batch = list[tuple[int, EvalSample, str]]  # (position in the task's order, sample, prompt)


def schedule(task: Task, samples: list[tuple[int, EvalSample]], batch_size: int) -> list[Batch]:
    """The batches of ``samples`` in the order they run: as many as in dataset order, fuller of alike work.

    A batched ``generate`` pads every prompt to the batch's longest and decodes until its longest answer
    ends. Samples of one ``type`` share an answer format (a box, a yes/no, a count) and so about its
    length, so each type forms a bucket, sorted longest prompt first (lmms-eval's order; prompt
    characters stand in for tokens, which the runner does not see). Full batches are cut from each
    bucket; the leftovers of all buckets, in the same order, fill the last batches. Left padding keeps
    each row's greedy answer its one-by-one answer whichever rows share its batch, so the order changes
    the speed, not the predictions.
    """
    buckets: dict[str, Batch] = {}
    for index, sample in samples:  # buckets in first-seen order
        buckets.setdefault(sample.type, []).append((index, sample, task.build_prompt(sample)))
    full: list[Batch] = []
    rest: Batch = []
    for bucket in buckets.values():
        bucket.sort(key=lambda item: -len(item[2]))  # stable: equal lengths keep dataset order
        cut = len(bucket) - len(bucket) % batch_size
        full += [bucket[i : i + batch_size] for i in range(0, cut, batch_size)]
        rest += bucket[cut:]
    return full + [rest[i : i + batch_size] for i in range(0, len(rest), batch_size)]


def generate_shard(
    generator: Generator, task: Task, cfg: EvalConfig, shard: Shard, progress: bool = True, skip_bad: bool = False
) -> int:
    """Generate, parse and score the shard batch by batch (:func:`schedule`), appending each batch to
    ``shard.path``; with ``skip_bad`` a sample whose image cannot be read goes to ``shard.skipped_path``
    instead. Returns the number of ``generate`` calls made.
    """
    kwargs = generation_kwargs(task, cfg)
    reader = ImageReader(s.image for _, s in shard.samples if isinstance(s.image, ImageRef))
    _drop_torn_tail(shard.path)
    calls = 0
    bar = tqdm(total=len(shard.samples), desc=task.name, unit="sample", disable=not progress)
    with bar, shard.path.open("a", encoding="utf-8") as f:  # the bar closes before an error leaves: it is the last line
        synced = time.monotonic()
        try:
            for scheduled in schedule(task, shard.samples, cfg.batch_size):
                batch, images, skips = batch_images(scheduled, skip_bad, reader)
                if skips:
                    _append(shard.skipped_path, skips)
                    bar.update(len(skips))
                if not batch:
                    continue
                outputs = generator.generate(images, [prompt for _, _, prompt in batch], **kwargs)
                calls += 1
                if len(outputs) != len(batch):
                    raise EvalError(f"generate returned {len(outputs)} texts for a batch of {len(batch)}")
                lines = [
                    json.dumps(_record(task, index, sample, prompt, text), ensure_ascii=False)
                    for (index, sample, prompt), text in zip(batch, outputs, strict=True)
                ]
                f.write("\n".join(lines) + "\n")  # one write per batch: a crash tears at most the last record
                f.flush()
                if time.monotonic() - synced >= SYNC_EVERY_S:
                    os.fsync(f.fileno())
                    synced = time.monotonic()
                bar.update(len(batch))
        finally:
            os.fsync(f.fileno())
    return calls


def batch_images(
    batch: Batch, skip_bad: bool, reader: ImageReader
) -> tuple[Batch, list[Image.Image], list[dict[str, Any]]]:
    """The batch's images, its stored ones read together by the shard's ``reader``: the samples kept, their
    images, and with ``skip_bad`` a ``{"id", "index", "reason"}`` per sample whose image is missing or
    unreadable (without it that sample's error is raised)."""
    stored = reader.read(s.image for _, s, _ in batch if isinstance(s.image, ImageRef))
    kept: Batch = []
    images: list[Image.Image] = []
    skips: list[dict[str, Any]] = []
    for item in batch:
        index, sample, _ = item
        try:
            got = stored.get(sample.image) if isinstance(sample.image, ImageRef) else None
            if isinstance(got, EvalDataError):
                raise EvalDataError(f"{got} (sample {sample.id!r})")
            images.append(sample.load_image(got))
            kept.append(item)
        except EvalDataError as err:
            if not skip_bad:
                raise
            skips.append({"id": sample.id, "index": index, "reason": str(err)})
    return kept, images, skips


def _append(path: Path, records: list[dict[str, Any]]) -> None:
    with path.open("a", encoding="utf-8") as f:
        f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def _record(task: Task, index: int, sample: EvalSample, prompt: str, text: str) -> dict[str, Any]:
    """The sample's record: the raw ``prediction``, the ``answer`` the task parses (the text after any
    reasoning chain, :func:`eval.reasoning.split_reasoning`) and the ``chain`` status."""
    _, answer, chain = split_reasoning(text)
    parsed = task.parse(sample, answer)
    return {
        "id": sample.id, "index": index, "type": sample.type, "prompt": prompt, "prediction": text,
        "answer": answer, "chain": chain, "parsed": parsed, "reference": sample.reference,
        "score": task.score(sample, parsed), "meta": sample.meta,
    }


def _merge(files: list[Path], target: Path, drop: AbstractSet[str] = frozenset()) -> list[dict[str, Any]]:
    """The records of ``files`` (first of an id wins, ids in ``drop`` left out) in task order, written to
    ``target``, the other files removed."""
    by_id: dict[str, dict[str, Any]] = {}
    for path in files:
        for r in read_records(path):
            by_id.setdefault(r["id"], r)
    merged = sorted((r for r in by_id.values() if r["id"] not in drop), key=lambda r: r["index"])
    atomic_write(target, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in merged))
    for path in files:
        if path != target:
            path.unlink()
    return merged


def gather(
    task: Task, cfg: EvalConfig, out_dir: Path, n_total: int, processes: int = 1, skip_bad: bool = False
) -> dict[str, Any]:
    """Merge every predictions file, and every skipped file less the samples predicted since, each in task
    order; compute the metrics (with the number of ``processes`` that generated them), write
    ``metrics.json`` and ``results.md``. Rank 0 only."""
    merged = _merge(existing_predictions(out_dir), out_dir / PREDICTIONS)
    skip_files = sorted(out_dir.glob("skipped*.jsonl"))
    skipped = _merge(skip_files, out_dir / SKIPPED, {r["id"] for r in merged}) if skip_files else []
    # Records past a smaller ``limit`` stay in the file (never lose a finished sample) but not in the metrics.
    records, skipped = ([r for r in rs if cfg.limit is None or r["index"] < cfg.limit] for rs in (merged, skipped))
    if len(records) + len(skipped) != n_total:
        raise EvalError(f"{out_dir}: {len(records)} predictions for {n_total} samples ({len(skipped)} skipped); "
                        "rerun with resume")
    if not records:
        raise EvalError(f"{out_dir}: all {n_total} samples skipped (see {SKIPPED}); nothing to score")
    scores = task.aggregate(records)
    metrics = {
        "task": task.name, **scores, "main_metric": next(iter(scores)), **chain_counts(records),
        "skipped": len(skipped),
        "protocol": {
            **run_protocol(task, cfg), "batch_size": cfg.batch_size, "batch_order": SCHEDULE, "limit": cfg.limit,
            "skip_bad": skip_bad,
        },
        "processes": processes,
    }
    atomic_write(out_dir / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    atomic_write(out_dir / "results.md", format_table(metrics))
    return metrics


def run_task(
    generator: Generator, task: Task, cfg: EvalConfig, out_dir: str | Path, resume: bool = False,
    dist: Dist | None = None, progress: bool = True, skip_bad: bool = False,
) -> dict[str, Any]:
    """Evaluate ``generator`` on ``task``; returns the metrics on rank 0 (``{}`` on other ranks).

    ``dist`` defaults to the accelerate process state, so the same call runs one process or many.
    ``skip_bad``: skip and record a sample whose image is missing or unreadable (see the module doc).
    """
    dist = dist if dist is not None else Dist.from_accelerate()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if dist.is_main:
        _check_protocol(out_dir, {**run_protocol(task, cfg), "skip_bad": skip_bad}, resume)
    dist.barrier()
    shard = plan_shard(task, cfg, out_dir, dist, skip_bad)
    dist.barrier()  # every process has planned before any appends: the shards stay disjoint
    generate_shard(generator, task, cfg, shard, progress=progress and dist.is_main, skip_bad=skip_bad)
    dist.barrier()
    if not dist.is_main:
        return {}
    metrics = gather(task, cfg, out_dir, shard.n_total, processes=dist.world, skip_bad=skip_bad)
    print(format_table(metrics))
    return metrics


# --- the table ----------------------------------------------------------------------------------
def format_table(metrics: dict[str, Any]) -> str:
    """Markdown: the headline numbers, then one row per question type."""
    headline = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    lines = [f"## {metrics.get('task', 'eval')}", "", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {fmt_value(v)} |" for k, v in headline.items()]
    per_type, counts = metrics.get("per_type", {}), metrics.get("n_per_type", {})
    if per_type:
        lines += ["", "| type | n | score |", "|---|---|---|"]
        lines += [f"| {t} | {counts.get(t, '')} | {fmt_value(v)} |" for t, v in per_type.items()]
    return "\n".join(lines) + "\n"


def fmt_value(v: float | int | None) -> str:
    """A table cell: integers as they are, fractions to 4 places, a metric over nothing as n/a."""
    return "n/a" if v is None else str(v) if isinstance(v, int) else f"{v:.4f}"

