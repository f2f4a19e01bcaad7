"""The merge-method contract.

A merge method is a class registered in ``mllm.registry.MERGE_METHODS`` whose ``merge`` is a pure
per-tensor function::

    merge(tensors: dict[model_id, Tensor], base: Tensor | None, params, info: TensorInfo) -> Tensor

``tensors`` holds each merged model's tensor in the YAML's model order (model id = the ``model``
string of the YAML), ``base`` the base model's (None for methods without a base), ``params`` an
instance of the method's ``config_cls`` dataclass (per-model values are ``dict[model_id, value]``
fields declared with :func:`per_model`), ``info`` the tensor's name, decoder-layer index and seed.
Deltas are taken in fp32.

``merge`` is given row blocks of a large tensor (starting at row ``info.row_start``), which bounds
memory by a block instead of the whole tensor: row block [i:j] of the output may depend only on rows
[i:j] of the inputs and on ``info.prepared``, the whole-tensor statistics computed before the first
block, per model id. They come from one of two hooks:

* ``prepare`` (when ``needs_prepare``), run on one model's whole tensor at a time (in fp32, which it
  may overwrite), for statistics that do not stream (TIES' magnitude threshold, a k-th largest value);
* a scan (when ``needs_scan``): the engine streams the tensor's row blocks through ``scan_block``, which
  accumulates into a dict that starts empty for every tensor, and hands it to ``scan_result`` (WIDEN's
  per-column norms and dot products). Memory: one block plus the accumulator.

Methods that need whole-model statistics before merging (FRANK's per-layer ``||tau||^2``, LiNeS' L1
norms) return True from ``two_pass``: the engine first streams every merged tensor, block by block,
through ``collect`` and sums the returned numbers per ``info.group`` (a decoder layer, or the tensor
itself outside the layers), hands the sums to ``finalize``, and passes its result to ``merge`` as
``info.stats``; ``report`` may then write artefacts (JSON, plots) into the output folder.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch

_MISSING = dataclasses.MISSING


class _Defaulted(dict):  # type: ignore[type-arg]
    """Per-model values where a model not listed gets ``default`` (direct construction in code/tests)."""

    def __init__(self, default: Any) -> None:
        super().__init__()
        self.default = default

    def __missing__(self, key: str) -> Any:
        return self.default


def per_model(default: Any = _MISSING, single: str | None = None) -> Any:
    """A per-model parameter: ``dict[model_id, value]``, set under each model's ``parameters``.

    ``default`` applies to models that set no value (and no top-level ``parameters`` default exists);
    without one the parameter is required for every model. ``single``: see :func:`single_value`.
    """
    meta = {"per_model": True, "model_default": default, **({"single": single} if single else {})}
    if default is _MISSING:
        return field(metadata=meta)
    return field(default_factory=lambda: _Defaulted(default), metadata=meta)


def single_value(why: str, default: Any = _MISSING) -> Any:
    """A shared parameter that takes one value for the whole merge: a layer gradient or a ``{filter, value}``
    list is refused when the YAML is read, with ``why`` (the value is model-wide, or defines the layer
    schedule itself)."""
    meta = {"single": why}
    return field(metadata=meta) if default is _MISSING else field(default=default, metadata=meta)


def yaml_key(name: str, default: Any) -> Any:
    """A shared parameter whose YAML key differs from the field name (``lambda`` -> ``lambda_``)."""
    return field(default=default, metadata={"key": name})


@dataclass(frozen=True)
class TensorInfo:
    """What a method may know about the tensor it merges, besides the tensors themselves."""

    name: str  # output tensor name (the reference model's naming)
    layer: int | None  # 0-based decoder-layer index, None outside the decoder layers
    num_layers: int  # decoder layers in the model
    seed: int = 0  # stable per (plan seed, tensor name): sparsification masks are reproducible
    complete: bool = True  # every merged model (and the base, if used) holds this tensor
    shape: tuple[int, ...] = ()  # the whole tensor's shape (a block may hold only some of its rows)
    row_start: int = 0  # first row (dim 0) of the block being merged
    prepared: Mapping[str, Any] = field(default_factory=dict)  # model id -> prepare() or scan_result() value
    stats: Mapping[str, Any] = field(default_factory=dict)  # finalize() output of a two-pass method

    @property
    def group(self) -> int | str:
        """Statistics group: the decoder-layer index, or the tensor name outside the layers."""
        return self.layer if self.layer is not None else self.name

    def offset(self, block: torch.Tensor) -> int:
        """Flat index, in the whole tensor, of ``block``'s first element."""
        return self.row_start * (block[0].numel() if block.dim() else 0)


def tensor_seed(seed: int, name: str) -> int:
    """A 63-bit seed from the plan seed and a tensor name, identical across runs and machines."""
    digest = hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def fp32(t: torch.Tensor) -> torch.Tensor:
    """The tensor in float32 (float64 kept): deltas in bf16 would cancel: the difference of two
    nearby bf16 weights keeps only a few significant bits."""
    return t if t.dtype in (torch.float32, torch.float64) else t.to(torch.float32)


class MergeMethod:
    """Base class of merge methods; subclasses set the class variables and ``merge``.

    A method's name is its key in ``mllm.registry.MERGE_METHODS`` and nowhere else; a loaded plan
    carries it as ``MergePlan.method_name``.
    """

    config_cls: ClassVar[type]
    # none: base_model is refused; optional: the base is used when the YAML names one (and is then no
    # merged model, even when also listed under models, as in mergekit); ignored: base_model is accepted
    # and only lends its config and tokenizer (mergekit's passthrough); input: as ignored, but in the
    # models: form a base not listed there joins the merged models, last, with no parameters of its own
    # (mergekit's normalize_config adds it as one more input of a method without a base role: linear)
    base: ClassVar[Literal["required", "optional", "none", "ignored", "input"]] = "required"
    min_models: ClassVar[int] = 1
    max_models: ClassVar[int | None] = None
    # Which model supplies output names, unmerged tensors, config and tokenizer when the YAML sets no
    # reference_model: the base model, or the first listed model (FRANK: the MLLM).
    reference: ClassVar[Literal["base", "first"]] = "base"
    # Why the method refuses ``slices:`` (None: it takes them)
    no_slices: ClassVar[str | None] = None

    @classmethod
    def selects(cls, info: TensorInfo, params: Any) -> bool:
        """Whether this tensor is merged (else copied from the reference model)."""
        return True

    @classmethod
    def validate(cls, params: Any, model_ids: list[str], num_layers: int) -> None:
        """Checks that need the model list or layer count; raise MergeError. Runs before any I/O."""

    @classmethod
    def two_pass(cls, params: Any) -> bool:
        """Whether the merge needs the whole-model statistics pass (``collect`` / ``finalize``) first."""
        return False

    @classmethod
    def needs_prepare(cls, params: Any) -> bool:
        """Whether block-wise merging needs ``prepare`` on each model's whole tensor first."""
        return False

    @classmethod
    def prepare(cls, tensor: torch.Tensor, base: torch.Tensor | None, params: Any, info: TensorInfo,
                model_id: str) -> Any:
        """A per-tensor, per-model statistic of the whole tensor (TIES: the magnitude threshold),
        passed to ``merge`` of every row block as ``info.prepared[model_id]``. ``tensor`` comes in float32
        and is the method's to overwrite (a scratch copy, so the engine holds no second one); ``base``
        is as stored, read-only."""
        return None

    @classmethod
    def needs_scan(cls, params: Any) -> bool:
        """Whether each merged tensor is scanned block by block (``scan_block``) before it is merged."""
        return False

    @classmethod
    def scan_block(cls, state: dict[str, Any], tensors: dict[str, torch.Tensor], base: torch.Tensor | None,
                   params: Any, info: TensorInfo) -> None:
        """Accumulate one row block's statistics into ``state`` (empty at the tensor's first block)."""

    @classmethod
    def scan_result(cls, state: dict[str, Any], params: Any, info: TensorInfo) -> dict[str, Any]:
        """The scanned statistics per model id, passed to ``merge`` of every row block as ``info.prepared``."""
        return {}

    @classmethod
    def merge(cls, tensors: dict[str, torch.Tensor], base: torch.Tensor | None, params: Any,
              info: TensorInfo) -> torch.Tensor:
        raise NotImplementedError

    @classmethod
    def collect(cls, tensors: dict[str, torch.Tensor], base: torch.Tensor | None, params: Any,
                info: TensorInfo) -> Mapping[str, float]:
        """Pass-1 numbers for this tensor; the engine sums them per ``info.group``."""
        return {}

    @classmethod
    def finalize(cls, sums: Mapping[int | str, Mapping[str, float]], params: Any, num_layers: int) -> dict[str, Any]:
        """Turn the pass-1 sums into ``info.stats`` for pass 2."""
        return {}

    @classmethod
    def report(cls, stats: Mapping[str, Any], params: Any, out_dir: Path) -> list[str]:
        """Write artefacts into the output folder; returns the file names written."""
        return []
