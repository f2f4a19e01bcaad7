"""The streaming merge engine: plan -> checks -> (statistics pass) -> merge pass -> atomic output.

Steps of :func:`run_merge`:

1. ``load_plan``: YAML validated (registry name, parameters, dtypes, regexes); nothing is opened.
2. Readers open the safetensors headers of every input; without name_map in the YAML, the reference's
   language-model names are found from its config and weights (:mod:`mllm.merge.families`);
   ``plan_tensors`` checks architecture family, names and shapes of every tensor to merge, and
   parameters per tensor -- all before any tensor is read and before anything is written.
3. For two-pass methods (FRANK; LiNeS with ``alpha: auto``), pass 1 streams the merged tensors block
   by block through ``collect`` and sums the numbers per decoder layer; ``finalize`` turns them into
   the ``info.stats`` of pass 2.
4. Pass 2, in the reference model's tensor order: the whole-tensor statistics of one tensor (a scan
   of its row blocks for WIDEN, ``prepare`` on whole tensors for TIES-style trimming), then its inputs
   one block of about BLOCK_ELEMS elements (rows along dim 0) at a time: merge in fp32, refuse a
   non-finite result, cast to the output dtype and stream it into the current shard.
5. Side files (config.json with the output dtype and, with slices, the output's layer count; generation
   config; tokenizer from the reference or ``tokenizer_source`` -- with ``tokenizer_source`` / ``tokenizer:``
   the vocabulary :mod:`mllm.merge.vocab` built, and its ``vocab_size`` --, with ``chat_template`` set), a README
   card holding the recipe, ``mllm_merge.yaml``, and the method's artefacts are written; the temp folder
   is renamed to ``out_dir`` only now.

``dry_run`` stops after step 2 and prints the plan. A ``model+lora`` input is read through
:class:`mllm.merge.lora.LoraReader`, which adds the adapter's update to each row block it reads.

Memory bound (above the ~0.5 GiB that importing torch costs): one tensor name is in flight at a time.
Every method holds ``(n_inputs + 3)`` fp32 copies of one block (n_inputs = merged models + base; a
block is 1 MiB in fp32), plus, for TIES-style magnitude trimming, a ``prepare`` step that holds the
base's tensor as stored and one fp32 copy of the model's (filled block by block, and overwritten by
``prepare``). WIDEN's scan adds ``2 n_models + 1`` fp64 numbers per column of the tensor (per token
for a transposed embedding). The writer streams each block straight into its shard (the header goes
first: every output shape is known in advance), so no shard is buffered -- all below the usual
``n_models x largest tensor + one shard``. Inputs are read with plain reads, never memory-mapped (a
mapped file's touched pages count in the RSS); allocations from 16 MiB up (whole tensors) go back to
the OS when freed, smaller whole tensors are trimmed after ``prepare``, and up to 64 MiB of freed
blocks stay in the heap for reuse (``tune_malloc``), so the RSS tracks the tensors in use. With a tokenizer merge
whose vocabularies differ, the embedding / lm_head matrices are aligned whole before they are merged
(:mod:`mllm.merge.vocab`: ``n_inputs x (V_in + V_out) x hidden`` fp32 numbers at most, while one is built). Measured:
benchmarks/bench_merge.py and tests/mllm/merge/test_memory.py.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import json
import logging
import math
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from common.atomic import atomic_folder
from mllm.merge.families import with_detected_names
from mllm.merge.layout import TensorJob, describe, plan_tensors
from mllm.merge.lora import LoraReader
from mllm.merge.methods.base import TensorInfo
from mllm.merge.plan import MergePlan, load_plan
from mllm.merge.tensors import (
    MergeError,
    ModelReader,
    ShardWriter,
    copy_side_files,
    ensure_output_free,
    set_config_dtype,
)
from mllm.merge.tokenizer import set_chat_template
from mllm.merge.vocab import build_vocab

log = logging.getLogger(__name__)
RECIPE_FILE = "mllm_merge.yaml"
BLOCK_ELEMS = 1 << 18  # elements per row block (1 MiB in fp32: the block's temporaries stay in cache)


def _load_libc() -> Any:
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    return libc if libc is not None and hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None


_LIBC = _load_libc()


# glibc mallopt parameters (malloc.h) and the values the merge sets
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 16 << 20  # larger allocations (whole tensors) are mapped, and unmapped when freed
TRIM_THRESHOLD = 64 << 20  # free heap kept for reuse before glibc gives it back on its own


def tune_malloc() -> None:
    """Let freed block temporaries be reused from the heap. glibc's default, adaptive thresholds
    hand the few MiB a block frees back to the kernel after nearly every block, and the next block
    page-faults them in again (measured: ~0.8 GB of page faults and ~40% of a linear merge's time on
    bench_merge's models). Fixed thresholds keep up to TRIM_THRESHOLD free in the heap -- a bounded
    addition to the RSS -- and map allocations from MMAP_THRESHOLD up, which return to the kernel
    when freed. The setting is process-wide and stays (glibc cannot go back to adaptive)."""
    if _LIBC is not None:
        _LIBC.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
        _LIBC.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)


def release_memory() -> None:
    """Return all free heap pages to the OS, after a whole tensor below MMAP_THRESHOLD was freed."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def open_readers(plan: MergePlan) -> dict[str, ModelReader]:
    """Header-only readers for every input and the reference, keyed by model id (a ``model+lora`` input
    reads with its adapter applied)."""
    readers: dict[str, ModelReader] = {}
    for entry in (*plan.inputs, plan.reference):
        if entry.id not in readers:
            readers[entry.id] = LoraReader(entry.path, entry.lora) if entry.lora else ModelReader(entry.path)
    return readers


def row_blocks(shape: tuple[int, ...]) -> list[tuple[int, int] | None]:
    """Row ranges (dim 0) of about BLOCK_ELEMS elements covering ``shape``; [None] = the whole tensor."""
    if len(shape) == 0 or shape[0] == 0:
        return [None]
    row = max(1, math.prod(shape[1:]))
    step = max(1, BLOCK_ELEMS // row)
    return [(r, min(r + step, shape[0])) for r in range(0, shape[0], step)]


def _aligned(job: TensorJob, readers: Mapping[str, ModelReader]) -> Mapping[str, ModelReader]:
    """The readers of ``job``'s inputs: for an embedding / lm_head matrix aligned to the output vocabulary,
    readers of the aligned copies (built at the first read, dropped by ``job.vocab.release()``)."""
    if job.vocab is None:
        return readers
    sources = dict(job.sources) if job.params is not None else dict([job.copy_from] if job.copy_from else [])
    return job.vocab.readers(job.spec.name, sources, job.vocab_base, readers)


def _inputs(plan: MergePlan, job: TensorJob, readers: Mapping[str, ModelReader], rows: tuple[int, int] | None
            ) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    readers = _aligned(job, readers)
    tensors = {mid: readers[mid].get(job.sources[mid], rows) for mid in job.models}
    base = readers[job.base].get(job.sources[job.base], rows) if job.base is not None else None
    return tensors, base


def _block_info(job: TensorJob, rows: tuple[int, int] | None, **fields: Any) -> TensorInfo:
    return dataclasses.replace(job.info, row_start=rows[0] if rows else 0, **fields)


def read_fp32(reader: ModelReader, name: str) -> torch.Tensor:
    """Tensor ``name`` in float32, filled one row block at a time: no whole copy in the stored dtype
    sits beside the fp32 one (for bf16 that would be half as large again)."""
    out = torch.empty(reader.shape(name), dtype=torch.float32)
    for rows in row_blocks(out.shape):
        (out if rows is None else out[rows[0]:rows[1]]).copy_(reader.get(name, rows))
    return out


def _prepare_whole(plan: MergePlan, job: TensorJob, readers: Mapping[str, ModelReader]) -> dict[str, Any]:
    """``prepare`` on each model's whole tensor (a float32 copy it may overwrite), one model at a time."""
    readers = _aligned(job, readers)
    base = readers[job.base].get(job.sources[job.base]) if job.base is not None else None
    prepared: dict[str, Any] = {}
    for mid in job.models:
        tensor = read_fp32(readers[mid], job.sources[mid])
        prepared[mid] = plan.method.prepare(tensor, base, job.params, job.info, mid)
        del tensor
        release_memory()
    return prepared


def _scan(plan: MergePlan, job: TensorJob, readers: Mapping[str, ModelReader]) -> dict[str, Any]:
    """The method's per-tensor scan: every row block through ``scan_block``, then ``scan_result``."""
    state: dict[str, Any] = {}
    for rows in row_blocks(job.spec.shape):
        tensors, base = _inputs(plan, job, readers, rows)
        plan.method.scan_block(state, tensors, base, job.params, _block_info(job, rows))
    return plan.method.scan_result(state, job.params, job.info)


def prepared_for(plan: MergePlan, job: TensorJob, readers: Mapping[str, ModelReader]) -> dict[str, Any]:
    """``info.prepared`` of a merged tensor: its scan, or ``prepare`` when it is merged in several blocks
    (a single block holds the whole tensor, from which ``merge`` takes the statistic itself)."""
    if plan.method.needs_scan(job.params):
        return _scan(plan, job, readers)
    if len(row_blocks(job.spec.shape)) > 1 and plan.method.needs_prepare(job.params):
        return _prepare_whole(plan, job, readers)
    return {}


def statistics_pass(plan: MergePlan, jobs: list[TensorJob], readers: Mapping[str, ModelReader],
                    progress: bool = False) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """Pass 1 of a two-pass method: per-group sums of ``collect`` (over row blocks), then ``finalize``.

    Returns the stats and, per tensor name, the ``info.prepared`` computed on the way, which pass 2
    reuses rather than reading the whole tensors again.
    """
    sums: dict[int | str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    prepared: dict[str, dict[str, Any]] = {}
    with _progress([j for j in jobs if j.params is not None], progress, "statistics") as todo:
        for job in todo:
            prepared[job.spec.name] = prepared_for(plan, job, readers)
            for rows in row_blocks(job.spec.shape):
                tensors, base = _inputs(plan, job, readers, rows)
                info = _block_info(job, rows, prepared=prepared[job.spec.name])
                for key, value in plan.method.collect(tensors, base, job.params, info).items():
                    sums[job.info.group][key] += value
            if job.vocab is not None:
                job.vocab.release()
    stats = plan.method.finalize(sums, shared_params(plan), jobs[0].info.num_layers if jobs else 0)
    return stats, prepared


def output_blocks(plan: MergePlan, job: TensorJob, readers: Mapping[str, ModelReader],
                  stats: Mapping[str, Any], prepared: Mapping[str, Any] | None = None) -> Iterator[torch.Tensor]:
    """The output tensor of one job as row blocks, in its output dtype (``prepared``: from pass 1)."""
    if job.params is None:
        assert job.copy_from is not None
        mid, name = job.copy_from
        readers = _aligned(job, readers)
        for rows in row_blocks(job.spec.shape):
            yield readers[mid].get(name, rows).to(job.spec.dtype)
        return
    if prepared is None:
        prepared = prepared_for(plan, job, readers)
    for rows in row_blocks(job.spec.shape):
        tensors, base = _inputs(plan, job, readers, rows)
        out = plan.method.merge(tensors, base, job.params, _block_info(job, rows, prepared=prepared, stats=stats))
        del tensors, base
        if not torch.isfinite(out.sum()):  # one reduction: any inf/nan entry makes the sum non-finite
            raise MergeError(f"{plan.source}: {plan.method_name} produced non-finite values in tensor {job.spec.name!r}")
        yield out.to(job.spec.dtype)


@contextmanager
def _progress(items: list[TensorJob], on: bool, desc: str) -> Iterator[Iterable[TensorJob]]:
    """``items``, behind a progress bar when ``on``; the bar closes before an error leaves the loop, so the
    error, not the bar's redraw, is the last line on the terminal."""
    if not on:
        yield items
        return
    from tqdm import tqdm

    with tqdm(items, desc=desc, unit="tensor") as bar:
        yield bar


def _card(plan: MergePlan, shards: list[str]) -> str:
    inputs = "\n".join(f"- `{m.id}`" for m in plan.models)
    base = f"\nBase model: `{plan.base.id}`\n" if plan.base else ""
    return (
        f"# Merged model\n\nMerged with `mllm merge` using **{plan.method_name}**.\n{base}\n"
        f"Models:\n{inputs}\n\nShards: {len(shards)}\n\n## Recipe\n\n```yaml\n{plan.text.rstrip()}\n```\n"
    )


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run the block with ``n`` intra-op threads (None: leave torch's setting), then restore it."""
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def shared_params(plan: MergePlan) -> Any:
    """The method's parameters without tensor filters or gradients (the first slice's, with slices)."""
    return plan.params_for(None, 0.0, plan.slices[0] if plan.slices else None)


def run_merge(config_path: str | Path, out_dir: str | Path, *, overwrite: bool = False,
              progress: bool = False, threads: int | None = 1, dry_run: bool = False) -> Path:
    """Merge the models of the YAML at ``config_path`` into ``out_dir``; returns ``out_dir``.

    Raises MergeError (a ValueError naming the file/field/tensor) on bad input, before any tensor is
    read; ``out_dir`` only appears once the merge is complete. ``overwrite`` replaces an existing
    ``out_dir`` (atomically, at the end). ``threads``: torch intra-op threads while merging. The work
    is memory-bound and split into small blocks, where waking other threads for every op costs more
    than it gains (badly so on a busy machine), hence 1 by default; None keeps torch's setting.
    ``dry_run`` prints the plan (:func:`mllm.merge.layout.describe`: each output tensor's sources, method
    and resolved parameters) after the header checks, and reads no weights and writes nothing.
    """
    if dry_run:
        plan = load_plan(config_path)
        readers = open_readers(plan)
        plan = with_detected_names(plan, readers)
        print(describe(plan, plan_tensors(plan, readers, build_vocab(plan, readers))), flush=True)
        return Path(out_dir)
    tune_malloc()
    try:
        with torch_threads(threads):
            return _run(load_plan(config_path), Path(out_dir), overwrite, progress)
    finally:
        release_memory()  # the heap kept for reuse goes back with the merge


def _run(plan: MergePlan, out: Path, overwrite: bool, progress: bool) -> Path:
    ensure_output_free(out, overwrite)
    readers = open_readers(plan)
    plan = with_detected_names(plan, readers)
    vocab = build_vocab(plan, readers)
    jobs = plan_tensors(plan, readers, vocab)
    merged = sum(j.params is not None for j in jobs)
    log.info("%s: %d tensors, %d merged, %d copied from %s", plan.method_name, len(jobs), merged,
             len(jobs) - merged, plan.reference.id)
    with atomic_folder(out, replace=overwrite) as tmp:
        two_pass = any(plan.method.two_pass(j.params) for j in jobs if j.params is not None)
        stats, prepared = statistics_pass(plan, jobs, readers, progress) if two_pass else ({}, {})
        with ShardWriter(tmp, [j.spec for j in jobs], plan.shard_bytes) as writer:
            with _progress(jobs, progress, plan.method_name) as todo:
                for job in todo:
                    blocks = output_blocks(plan, job, readers, stats, prepared.pop(job.spec.name, None))
                    writer.write(job.spec.name, blocks)
                    if job.vocab is not None:
                        job.vocab.release()
            shards = writer.close()
        copy_side_files(plan.reference.path, tmp, plan.tokenizer_source)
        if vocab is not None:
            vocab.write(tmp)
        if plan.out_dtype is not None:
            set_config_dtype(tmp, plan.out_dtype)
        if plan.slices is not None:
            set_num_layers(tmp, jobs[0].info.num_layers if jobs else 0)
        if plan.chat_template is not None:
            set_chat_template(tmp, plan.chat_template, [m.path for m in plan.inputs], plan.source)
        (tmp / RECIPE_FILE).write_text(plan.text)
        (tmp / "README.md").write_text(_card(plan, shards))
        plan.method.report(stats, shared_params(plan), tmp)
    return out


def set_num_layers(out: Path, n: int) -> None:
    """The output's decoder-layer count after slicing, in ``config.json`` (top level or ``text_config``),
    as mergekit sets ``num_hidden_layers``; a per-layer ``layer_types`` list of one value is resized."""
    path = out / "config.json"
    if not path.is_file():
        return
    cfg = json.loads(path.read_text())
    for node in (cfg, cfg.get("text_config")):
        if isinstance(node, dict) and "num_hidden_layers" in node:
            node["num_hidden_layers"] = n
            kinds = node.get("layer_types")
            if isinstance(kinds, list) and len(kinds) != n:
                if len(set(kinds)) > 1:
                    raise MergeError(f"{path}: layer_types mixes {sorted(set(kinds))}; slicing such a model "
                                     f"needs the layer kinds of the slices (not supported yet)")
                node["layer_types"] = kinds[:1] * n
    path.write_text(json.dumps(cfg, indent=2) + "\n")
