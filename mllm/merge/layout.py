"""A :class:`~mllm.merge.plan.MergePlan` -> one job per output tensor, from safetensors headers only.

:func:`plan_tensors` checks that the models are of one architecture family, that every tensor to merge
exists in every input with the reference's shape, and that layer ranges fit the models, naming the
first offending tensor / file / field -- before any tensor is read. One family means the same text
``model_type``; where an MLLM meets plain LLMs in the ``models:`` form, whose text model types may differ
(Qwen2-VL's ``qwen2_vl_text`` decoder is a ``qwen2`` one), it means the same decoder blocks instead:
every input holds as many blocks as the reference, each with the reference's tensors (names after
``name_map``) and shapes.

* ``models:`` -- one job per tensor of the reference model, under its name; the layer position of a
  gradient is ``t = layer / (num_layers - 1)``, as mergekit plans whole models as one slice.
* ``slices:`` -- the output's decoder layers are the slices' layers in order, renumbered from 0
  (mergekit's ``plan_slice``): output layer ``j``, the ``o``-th of a slice, merges layer
  ``layer_range[0] + o`` of each source, at ``t = o / (n - 1)`` (``t = 1`` for a one-layer slice). The
  reference model's layer-0 tensors are the template of every layer (one layer template per
  architecture, as mergekit's). Tensors outside the layers are merged at ``t = 0``: those before the
  layers (embeddings: names with ``embed`` but not ``embed_out``, ``wte``, ``wpe``, rotary tables)
  from the first slice's sources and parameters, the others (final norm, lm_head) from the last
  slice's -- of which mergekit takes only as many sources as the first slice has, and so does this.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from mllm.merge.families import is_multimodal, text_config
from mllm.merge.methods.base import TensorInfo, tensor_seed
from mllm.merge.plan import MergePlan, OutputSlice, SliceSource
from mllm.merge.tensors import MergeError, ModelReader, TensorSpec, tokenizer_files
from mllm.merge.vocab import VOCAB_TENSOR, Vocab

PRE_LAYER = re.compile(r"embed(?!_out)|(^|\.)(wte|wpe)\.|rotary|relative_pe")


@dataclass(frozen=True)
class TensorJob:
    spec: TensorSpec  # output name, shape, dtype
    info: TensorInfo
    params: Any | None  # None: copied from ``copy_from``
    sources: Mapping[str, str]  # model id -> that model's tensor name (merged models and base)
    models: tuple[str, ...] = ()  # merged model ids, in order
    base: str | None = None  # base model id
    copy_from: tuple[str, str] | None = None  # (model id, tensor name) of a copied tensor
    t: float = 0.0  # layer position of gradients
    vocab: Vocab | None = None  # an embedding / lm_head matrix whose rows are aligned to the output vocabulary
    vocab_base: str | None = None  # the model whose row a token takes when several (not all) have it


def _locate(reader: ModelReader, name: str, canonical: str) -> str | None:
    return name if name in reader else canonical if canonical in reader else None


def _layer(plan: MergePlan, name: str) -> int | None:
    m = plan.layer_pattern.search(plan.canonical(name))
    return int(m.group(1)) if m else None


def _renumber(plan: MergePlan, name: str, layer: int) -> str:
    """``name`` (a layer tensor) with its layer index replaced by ``layer``."""
    canonical = plan.canonical(name)
    m = plan.layer_pattern.search(canonical)
    assert m is not None
    tail = canonical[m.start(1):]
    if not name.endswith(tail):
        raise MergeError(f"{plan.source}: slices: name_map rewrites the layer index of {name!r}; "
                         f"slices need it in the tensor's own name")
    return name[:len(name) - len(tail)] + str(layer) + canonical[m.end(1):]


def _t(index: int | None, n: int) -> float:
    if index is None:
        return 0.0
    return index / (n - 1) if n > 1 else 1.0


def plan_tensors(plan: MergePlan, readers: Mapping[str, ModelReader], vocab: Vocab | None = None) -> list[TensorJob]:
    """One job per output tensor; raises MergeError at the first incompatibility. With ``vocab`` (the
    output vocabulary, :func:`mllm.merge.vocab.build_vocab`) the embedding / lm_head jobs take the output
    vocabulary's row count and read their inputs aligned to it."""
    if plan.tokenizer_source is not None:
        if not plan.tokenizer_source.is_dir():
            raise MergeError(f"{plan.source}: tokenizer_source: folder {plan.tokenizer_source} not found")
        tokenizer_files(plan.tokenizer_source)
    if plan.chat_template is not None and plan.tokenizer is None:
        tok_dir = plan.tokenizer_source or plan.reference.path
        if not (tok_dir / "tokenizer_config.json").is_file():
            raise MergeError(f"{plan.source}: chat_template: {tok_dir} has no tokenizer_config.json to set it in")
    _check_family(plan, readers)
    jobs = _whole_model_jobs(plan, readers) if plan.slices is None else _slice_jobs(plan, readers)
    return jobs if vocab is None else [_vocab_job(plan, readers, j, vocab) for j in jobs]


def _check_family(plan: MergePlan, readers: Mapping[str, ModelReader]) -> None:
    """Every input of the reference's architecture: its decoder blocks where an MLLM is merged whole
    (:func:`_check_blocks`), else its text model_type."""
    ref = readers[plan.reference.id]
    ref_family = text_config(ref.config).get("model_type")
    for m in plan.inputs:
        reader = readers[m.id]
        if m.id == plan.reference.id:
            continue
        if plan.slices is None and (is_multimodal(ref.config) or is_multimodal(reader.config)):
            _check_blocks(plan, ref, reader)
            continue
        fam = text_config(reader.config).get("model_type")
        if ref_family and fam and fam != ref_family:
            raise MergeError(
                f"{m.path / 'config.json'}: model_type {fam!r} differs from {ref_family!r} of "
                f"{plan.reference.path / 'config.json'} (models must be of one architecture family)"
            )


def _blocks(plan: MergePlan, reader: ModelReader) -> dict[int, dict[str, str]]:
    """Decoder block -> {name after name_map: the model's own name} of the tensors the plan selects."""
    out: dict[int, dict[str, str]] = {}
    for n in reader.names():
        layer = _layer(plan, n)
        if layer is not None and plan.selected(n):
            out.setdefault(layer, {})[plan.canonical(n)] = n
    return out


def _check_blocks(plan: MergePlan, ref: ModelReader, reader: ModelReader) -> None:
    """``reader``'s decoder blocks against the reference's: the same count, tensors and shapes."""
    want, have = _blocks(plan, ref), _blocks(plan, reader)
    if not want:  # no blocks found in the reference: the method says so, naming layer_pattern and name_map
        return
    if len(have) != len(want):
        why = "" if have else (" (no tensor name matches layer_pattern after name_map, which is found from the "
                               "reference's weights only: set name_map, or make the MLLM the reference)")
        raise MergeError(f"{reader.path}: number of decoder blocks {len(have)}, the reference {ref.path} has "
                         f"{len(want)}{why}")
    for layer, tensors in sorted(want.items()):
        got = have.get(layer, {})
        for key, name in tensors.items():
            if key not in got:
                raise MergeError(f"{reader.path}: decoder block {layer} has no tensor {key!r} (the reference "
                                 f"{ref.path} has {name!r})")
            if reader.shape(got[key]) != ref.shape(name):
                raise MergeError(f"{reader.file_of(got[key])}: tensor {got[key]!r} of decoder block {layer} has shape "
                                 f"{list(reader.shape(got[key]))}, the reference's {name!r} in {ref.file_of(name)} "
                                 f"has {list(ref.shape(name))}")
        extra = sorted(set(got) - set(tensors))
        if extra:
            raise MergeError(f"{reader.path}: tensor {got[extra[0]]!r} of decoder block {layer} has no counterpart "
                             f"in the reference {ref.path} (the decoder blocks differ)")


def _vocab_job(plan: MergePlan, readers: Mapping[str, ModelReader], job: TensorJob, vocab: Vocab) -> TensorJob:
    """An embedding / lm_head job with its inputs aligned to the output vocabulary (a copied one: the
    copied model's rows alone); unchanged when aligning moves no row. The ``tokens:`` sources it uses are
    checked here, before any tensor is read."""
    if not VOCAB_TENSOR.search(plan.canonical(job.spec.name)) or not job.spec.shape:
        return job
    sources = dict(job.sources) if job.params is not None else dict([job.copy_from] if job.copy_from else [])
    base = job.base or (plan.base.id if plan.base is not None and plan.base.id in sources else None)
    mids = tuple(sources)
    if not vocab.changes(mids):
        return job
    vocab.rule(mids, base, {m: readers[m].shape(sources[m]) for m in mids})
    shape = (vocab.size, *job.spec.shape[1:])
    return dataclasses.replace(job, spec=dataclasses.replace(job.spec, shape=shape),
                               info=dataclasses.replace(job.info, shape=shape), vocab=vocab, vocab_base=base)


def _whole_model_jobs(plan: MergePlan, readers: Mapping[str, ModelReader]) -> list[TensorJob]:
    ref = readers[plan.reference.id]
    names = ref.names()
    layer_of = {n: _layer(plan, n) for n in names}
    num_layers = max((x for x in layer_of.values() if x is not None), default=-1) + 1
    plan.method.validate(plan.params_for(None), [m.id for m in plan.models], num_layers)
    base = plan.base if plan.method.base in ("required", "optional") else None  # "ignored": it lends its config
    sources = [SliceSource(m, (0, num_layers)) for m in (*plan.models, *([base] if base else []))]
    whole = OutputSlice(tuple(sources), base, {})
    return [_job(plan, readers, n, n, whole, None, {s.model.id: n for s in sources}, layer_of[n], num_layers,
                 copy=(plan.reference.id, n)) for n in names]


def _num_layers(plan: MergePlan, reader: ModelReader) -> int:
    return max((x for n in reader.names() if (x := _layer(plan, n)) is not None), default=-1) + 1


def _slice_jobs(plan: MergePlan, readers: Mapping[str, ModelReader]) -> list[TensorJob]:
    assert plan.slices is not None
    ref = readers[plan.reference.id]
    names = ref.names()
    layer_of = {n: _layer(plan, n) for n in names}
    template = [n for n in names if layer_of[n] == 0]
    if not template:
        raise MergeError(f"{ref.path}: no tensor of decoder layer 0 matches layer_pattern "
                         f"{plan.layer_pattern.pattern!r} (slices need the layer index in tensor names)")
    for i, sl in enumerate(plan.slices):
        for j, s in enumerate(sl.sources):
            have = _num_layers(plan, readers[s.model.id])
            if s.layer_range[1] > have:
                raise MergeError(f"{plan.source}: slices[{i}].sources[{j}].layer_range: {list(s.layer_range)} "
                                 f"goes past the {have} decoder layers of {s.model.id!r}")
    num_layers = sum(sl.num_layers for sl in plan.slices)
    for sl in plan.slices:  # each slice's values, for its own models
        plan.method.validate(plan.params_for(None, 0.0, sl), [s.model.id for s in sl.merged], num_layers)
    outside = [n for n in names if layer_of[n] is None]
    first, last = plan.slices[0], plan.slices[-1]
    last = dataclasses.replace(last, sources=last.sources[:len(first.sources)])  # mergekit's zip()
    jobs = [_job(plan, readers, n, n, first, None, {s.model.id: n for s in first.sources}, None, num_layers,
                 copy=(plan.reference.id, n)) for n in outside if PRE_LAYER.search(plan.canonical(n))]
    out_layer = 0
    for sl in plan.slices:
        for o in range(sl.num_layers):
            for n0 in template:
                inputs = {s.model.id: _renumber(plan, n0, s.layer_range[0] + o) for s in sl.sources}
                jobs.append(_job(plan, readers, _renumber(plan, n0, out_layer), n0, sl, _t(o, sl.num_layers),
                                 inputs, out_layer, num_layers))
            out_layer += 1
    jobs += [_job(plan, readers, n, n, last, None, {s.model.id: n for s in last.sources}, None, num_layers,
                  copy=(plan.reference.id, n)) for n in outside if not PRE_LAYER.search(plan.canonical(n))]
    return jobs


def _job(plan: MergePlan, readers: Mapping[str, ModelReader], out: str, template: str, sl: OutputSlice,
         t: float | None, inputs: Mapping[str, str], layer: int | None, num_layers: int,
         copy: tuple[str, str] | None = None) -> TensorJob:
    """The job of output tensor ``out`` (shape and dtype of the reference's ``template``) from ``sl``'s
    sources, whose own names are ``inputs``. ``t`` None: the whole-model position of ``layer``."""
    ref = readers[plan.reference.id]
    shape, dtype = ref.shape(template), ref.dtype(template)
    t = _t(layer, num_layers) if t is None else t
    found = {mid: _locate(readers[mid], name, plan.canonical(name)) for mid, name in inputs.items()}
    info = TensorInfo(out, layer, num_layers, tensor_seed(plan.seed, out),
                      complete=all(v is not None for v in found.values()), shape=shape)
    params = plan.params_for(out, t, sl if plan.slices is not None else None,
                             {k: v for k, v in found.items() if v is not None})
    floating = dtype.is_floating_point
    out_dtype = plan.out_dtype if (plan.out_dtype is not None and floating) else dtype
    spec = TensorSpec(out, shape, out_dtype)
    base = sl.base.id if sl.base is not None and sl.base.id in inputs else None
    if plan.method.base == "required" and base is None:
        raise MergeError(f"{plan.source}: slices[-1]: tensor {out!r} takes the last slice's first "
                         f"{len(inputs)} sources (as mergekit does), and the base is not among them")
    if floating and plan.selected(out) and plan.method.selects(info, params):
        for mid in inputs:
            _check_input(plan, readers, mid, inputs[mid], found[mid], shape)
        models = tuple(m for m in inputs if m != base)
        return TensorJob(spec, info, params, {k: v for k, v in found.items() if v is not None}, models, base, None, t)
    if copy is None:  # a layer tensor left unmerged: the slice's first source supplies it
        mid = next(iter(inputs))
        _check_input(plan, readers, mid, inputs[mid], found[mid], shape)
        copy = (mid, found[mid] or inputs[mid])
    return TensorJob(spec, info, None, {}, (), None, copy, t)


def _check_input(plan: MergePlan, readers: Mapping[str, ModelReader], mid: str, name: str,
                 found: str | None, shape: tuple[int, ...]) -> None:
    reader = readers[mid]
    canonical = plan.canonical(name)
    if found is None:
        also = f" or {canonical!r}" if canonical != name else ""
        raise MergeError(
            f"{reader.path}: tensor {name!r}{also} to merge is missing (model {mid!r}); "
            f"exclude it, or map names with name_map"
        )
    aligned = plan.tokenizer is not None and VOCAB_TENSOR.search(canonical)  # rows follow the output vocabulary
    if (reader.shape(found)[1:] != shape[1:]) if aligned else (reader.shape(found) != shape):
        msg = (f"{reader.file_of(found)}: tensor {found!r} has shape {list(reader.shape(found))}, "
               f"the reference {plan.reference.path} has {list(shape)}")
        v_ref = text_config(readers[plan.reference.id].config).get("vocab_size")
        v_in = text_config(reader.config).get("vocab_size")
        if v_ref and v_in and v_ref != v_in and shape and shape[0] == v_ref:
            msg += (f"; vocab sizes differ ({v_in} vs {v_ref}): exclude the embedding/lm_head tensors "
                    f"to keep the reference model's, with its tokenizer")
        raise MergeError(msg)


def _fmt(value: Any) -> str:
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k}: {_fmt(v)}" for k, v in value.items()) + "}"
    return f"{value:.6g}" if isinstance(value, float) else str(value).lower() if isinstance(value, bool) else str(value)


def describe(plan: MergePlan, jobs: Sequence[TensorJob]) -> str:
    """The plan as text, one line per output tensor after a header (and the name_map in use): what
    ``--dry-run`` prints."""
    merged = sum(j.params is not None for j in jobs)
    layers = jobs[0].info.num_layers if jobs else 0
    lines = [f"# {plan.source}: {plan.method_name}, {len(jobs)} tensors ({merged} merged, {len(jobs) - merged} "
             f"copied), {layers} decoder layers, reference {plan.reference.id}"]
    if plan.name_map:  # given in the YAML or found from the reference's weights (mllm.merge.families)
        lines.append("# name_map: " + ", ".join(f"{p.pattern} -> {r}" for p, r in plan.name_map))
    for job in jobs:
        head = f"{job.spec.name} {list(job.spec.shape)} {str(job.spec.dtype).removeprefix('torch.')}"
        if job.params is None:
            assert job.copy_from is not None
            lines.append(f"{head} <- copy {job.copy_from[0]}:{job.copy_from[1]}")
            continue
        srcs = ", ".join(f"{m}:{job.sources[m]}" for m in job.models)
        base = f"; base {job.base}:{job.sources[job.base]}" if job.base else ""
        params = {f.metadata.get("key", f.name): getattr(job.params, f.name)
                  for f in dataclasses.fields(job.params)}
        lines.append(f"{head} <- {plan.method_name} t={job.t:.4g} [{srcs}{base}] {_fmt(params)}")
    return "\n".join(lines)
