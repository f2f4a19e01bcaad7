"""A model with a LoRA adapter applied, read tensor by tensor (mergekit's ``model+adapter`` references).

LoRA (Hu et al., ICLR 2022, arXiv 2106.09685) adds a low-rank update to a frozen weight:

    W' = W + s B A,   s = alpha / r      (rsLoRA, Kalajdzievski 2023, arXiv 2312.03732: s = alpha / sqrt(r))

with ``A`` [r, in] and ``B`` [out, r]. The adapter folder is peft's format: ``adapter_config.json``
(``r``, ``lora_alpha``, ``use_rslora``, ``rank_pattern`` / ``alpha_pattern``, ``fan_in_fan_out``) and
``adapter_model.safetensors`` holding ``base_model.model.<module>.lora_A.weight`` / ``lora_B.weight``.
mergekit merges the adapter into a full copy of the model on disk (peft ``merge_and_unload``) before
merging; here each target tensor gets its update when it is read, one row block at a time (rows i:j of
``W'`` need rows i:j of ``B`` and all of ``A``), so no merged copy is ever written. As in peft, the
update is computed in float32 and added in the weight's own dtype. Adapters that are not plain LoRA on
linear weights (DoRA magnitudes, embedding LoRA, trained biases, ``modules_to_save`` copies) are
refused, naming the first such tensor.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import torch

from mllm.merge.tensors import _ST_TO_TORCH, MergeError, ModelReader, read_exactly, read_header

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model."


class LoraReader(ModelReader):
    """``ModelReader`` of ``path`` whose LoRA target tensors come back with ``s B A`` added."""

    def __init__(self, path: Path, adapter: Path) -> None:
        super().__init__(path)
        self.adapter = adapter
        cfg = _adapter_config(adapter)
        weights = adapter / ADAPTER_WEIGHTS
        if not weights.is_file():
            raise MergeError(f"{adapter}: no {ADAPTER_WEIGHTS} (a peft LoRA adapter folder expected)")
        data_start, header = read_header(weights)
        self._weights = weights
        self._entries = {n: (data_start + e["data_offsets"][0], tuple(int(d) for d in e["shape"]),
                             _ST_TO_TORCH[e["dtype"]]) for n, e in header.items()}
        self._targets: dict[str, tuple[str, str, float]] = {}  # weight name -> (A name, B name, scale)
        for name in sorted(header):
            m = re.fullmatch(re.escape(_PREFIX) + r"(.+)\.lora_([AB])\.weight", name)
            if m is None:
                raise MergeError(f"{weights}: tensor {name!r} is not a LoRA A/B weight of a linear layer "
                                 f"(DoRA, embedding LoRA, biases and modules_to_save are not supported)")
            if m.group(2) == "B":
                continue
            module = m.group(1)
            a, b, target = name, f"{_PREFIX}{module}.lora_B.weight", f"{module}.weight"
            if b not in header:
                raise MergeError(f"{weights}: {a!r} has no matching {b!r}")
            if target not in self:
                raise MergeError(f"{weights}: LoRA target {target!r} is not a tensor of {path}")
            (r, n_in), (n_out, r_b) = self._entries[a][1], self._entries[b][1]
            out_shape = (n_in, n_out) if cfg["fan_in_fan_out"] else (n_out, n_in)
            if r_b != r or self.shape(target) != out_shape:
                raise MergeError(f"{weights}: LoRA {module!r} has A {[r, n_in]} and B {[n_out, r_b]}, "
                                 f"which do not fit {target!r} of shape {list(self.shape(target))} in {path}")
            alpha = _pattern(cfg["alpha_pattern"], module, cfg["lora_alpha"])
            self._targets[target] = (a, b, alpha / (math.sqrt(r) if cfg["use_rslora"] else r))
        self._fan_in_fan_out = bool(cfg["fan_in_fan_out"])

    def _read(self, name: str) -> torch.Tensor:
        start, shape, dtype = self._entries[name]
        buf = torch.empty(math.prod(shape) * dtype.itemsize, dtype=torch.uint8)
        read_exactly(self._weights, start, buf.numpy())
        return buf.view(dtype).reshape(shape)

    def get(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        w = super().get(name, rows)
        if name not in self._targets:
            return w
        a_name, b_name, scale = self._targets[name]
        a, b = self._read(a_name).float(), self._read(b_name)
        if self._fan_in_fan_out:  # W is [in, out]: rows of W are columns of A
            a = a if rows is None else a[:, rows[0]:rows[1]]
            delta = (b.float() @ a).T
        else:
            b = b if rows is None else b[rows[0]:rows[1]]
            delta = b.float() @ a
        return w + (delta * scale).to(w.dtype)


def _adapter_config(adapter: Path) -> dict[str, Any]:
    path = adapter / ADAPTER_CONFIG
    if not path.is_file():
        raise MergeError(f"{adapter}: no {ADAPTER_CONFIG} (a peft LoRA adapter folder expected)")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise MergeError(f"{path}: malformed JSON: {err}") from err
    if cfg.get("peft_type", "LORA") != "LORA":
        raise MergeError(f"{path}: peft_type {cfg['peft_type']!r} is not supported (LORA expected)")
    if cfg.get("use_dora"):
        raise MergeError(f"{path}: use_dora: DoRA adapters are not supported")
    if not isinstance(cfg.get("lora_alpha"), (int, float)) or not isinstance(cfg.get("r"), int):
        raise MergeError(f"{path}: expected numbers for r and lora_alpha")
    return {"lora_alpha": cfg["lora_alpha"], "use_rslora": bool(cfg.get("use_rslora")),
            "alpha_pattern": cfg.get("alpha_pattern") or {}, "fan_in_fan_out": bool(cfg.get("fan_in_fan_out"))}


def _pattern(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """peft's per-module override: the first key ``k`` with ``module`` matching ``(.*\\.)?k`` in full."""
    for key, value in patterns.items():
        if re.fullmatch(rf"(.*\.)?({key})", module):
            return value
    return default
