"""One of our checkpoints spread over several devices: accelerate's big-model inference (``--device-map auto``).

:func:`plan_device_map` splits the LLM between its decoder layers (transformers' ``_no_split_modules``)
with accelerate's ``infer_auto_device_map`` over the memory each device offers (``get_balanced_memory``,
as transformers' ``device_map="auto"`` does), and puts the encoder, the projector and the auxiliary heads
on the device of the LLM's input embeddings: the visual tokens are spliced into those embeddings, so
they must meet there. What fits on no GPU goes to ``"cpu"`` (kept in host memory, brought to the GPU
module by module during the forward) and then to ``"disk"`` (read from the checkpoint's own safetensors
files when needed: no copy is written). :func:`dispatch` attaches accelerate's hooks that move
activations between devices. LLM-side injectors hook into decoder layers with weights of their own, so a
model with injectors is kept on one device.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from common.errors import UserError

DeviceMap = dict[str, int | str]  # module name (dotted; "" = the whole model) -> GPU index, "cpu" or "disk"
DEVICE_MAPS = ("auto",)


class PlacementError(UserError, ValueError):
    """A device map that cannot be honoured; the message says why."""


def check_placement(device: str | None, device_map: str | None) -> None:
    """Refuse, before anything loads, ``device`` and ``device_map`` together or a map that is not known."""
    if device_map is not None and device is not None:
        raise PlacementError("device and device_map: give one (device_map spreads the model over several)")
    if device_map not in (None, *DEVICE_MAPS):
        raise PlacementError(f"device_map: expected one of {list(DEVICE_MAPS)}, got {device_map!r}")


def device_of(device_map: Mapping[str, int | str], name: str) -> int | str:
    """The device of parameter / buffer / module ``name``: the entry of its longest mapped prefix."""
    parts = name.split(".")
    for end in range(len(parts), -1, -1):
        key = ".".join(parts[:end])
        if key in device_map:
            return device_map[key]
    raise PlacementError(f"device_map: no entry covers {name!r}")


def _bytes(module: nn.Module, dtype: torch.dtype) -> int:
    size = torch.finfo(dtype).bits // 8
    return sum(p.numel() * (size if p.is_floating_point() else p.element_size()) for p in module.parameters())


def plan_device_map(model: Any, device_map: str, dtype: torch.dtype,
                    max_memory: Mapping[int | str, int | str] | None = None, disk: bool = False) -> DeviceMap:
    """Where each module of ``model`` (an :class:`mllm.model.MLLM` built on the meta device) goes.

    ``device_map`` is ``"auto"``; ``max_memory`` (accelerate's ``{0: "20GiB", "cpu": "60GiB"}``) defaults to
    what the devices have free; ``disk``: whether what fits in no memory may stay in the checkpoint
    files (else that is an error). The LLM's map is accelerate's, prefixed ``llm.``; every other top-level
    module joins the input embeddings, whose device's budget is first reduced by their size.
    """
    from accelerate import infer_auto_device_map
    from accelerate.utils import get_balanced_memory, get_max_memory

    if device_map not in DEVICE_MAPS:
        raise PlacementError(f"device_map: expected one of {list(DEVICE_MAPS)}, got {device_map!r}")
    memory = get_max_memory(dict(max_memory) if max_memory is not None else None)
    others = [name for name, child in model.named_children()
              if name != "llm" and next(child.parameters(), None) is not None]
    reserve = sum(_bytes(getattr(model, name), dtype) for name in others)
    no_split = list(getattr(model.llm, "_no_split_modules", None) or [])
    if len(set(memory) - {"cpu", "disk"}) > 1:  # several GPUs: balance the whole model, as transformers' "auto"
        memory = get_balanced_memory(model, max_memory=memory, no_split_module_classes=no_split, dtype=dtype)
    first = next(iter(memory))
    memory[first] = max(0, _as_bytes(memory[first]) - reserve)
    llm_map = infer_auto_device_map(model.llm, max_memory=memory, no_split_module_classes=no_split, dtype=dtype)
    if "disk" in llm_map.values() and not disk:
        raise PlacementError("device_map: the model does not fit in the GPUs' and the CPU's memory "
                             f"(max_memory {memory}); give more, or allow reading the rest from the checkpoint "
                             "files (disk offload)")
    placed = {("llm." + k if k else "llm"): v for k, v in llm_map.items()}
    embeddings = device_of(placed, "llm." + _embedding_name(model.llm))
    placed.update({name: embeddings for name in others})
    if getattr(model, "injectors", None) and len(model.injectors) and len(set(placed.values())) > 1:
        raise PlacementError("device_map: LLM-side injectors (model.injectors) hook weights of their own into "
                             "decoder layers; load this model on one device (--device)")
    return placed


def _as_bytes(value: int | str) -> int:
    from accelerate.utils import convert_file_size_to_int

    return value if isinstance(value, int) else convert_file_size_to_int(value)


def _embedding_name(llm: nn.Module) -> str:
    embedding = llm.get_input_embeddings()
    return next(name for name, module in llm.named_modules() if module is embedding) + ".weight"


def load_device(device_map: Mapping[str, int | str], name: str) -> torch.device | None:
    """Where the stored tensor ``name`` is read to: its GPU, the CPU (for ``"cpu"``), or None for ``"disk"``
    (left on the meta device; the dispatch hooks read it from the checkpoint file when it is used)."""
    where = device_of(device_map, name)
    if where == "disk":
        return None
    return torch.device("cpu") if where == "cpu" else torch.device("cuda", int(where))


def dispatch(model: nn.Module, device_map: Mapping[str, int | str],
             disk_index: Mapping[str, Mapping[str, str]]) -> nn.Module:
    """Attach accelerate's hooks for ``device_map`` (nothing to attach when it names a single device other
    than disk: the model is then moved there). ``disk_index``: ``{tensor name: {"safetensors_file",
    "weight_name", "dtype"}}`` of the tensors left on disk."""
    from accelerate import dispatch_model

    devices = set(device_map.values())
    if len(devices) == 1 and "disk" not in devices:
        where = next(iter(devices))
        return model.to("cpu" if where == "cpu" else torch.device("cuda", int(where)))
    return dispatch_model(model, device_map=dict(device_map), offload_index=dict(disk_index) or None)
