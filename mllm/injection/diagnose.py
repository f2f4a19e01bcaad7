"""How much the image reaches the LLM through gated cross-attention: one forward, per-layer figures.

For every :class:`~mllm.injection.gated_xattn.GatedXAttnBlock` of a model's ``gated_xattn`` injectors,
on one batch (Flamingo's block, Alayrac et al., 2022, arXiv 2204.14198, §2.2):

* the gates ``tanh(a_x)`` and ``tanh(a_f)``;
* ``|y|``: the residual stream entering the block;
* ``|tanh(a_x) CrossAttn(LN(y), X)|``: the visual read the block adds;
* ``|y' - y|``: all the block adds (visual read and gated FFW).

Norms are L2 over the width, averaged over the real tokens (``attention_mask``). A read far below the
residual means the LLM barely sees the image at that layer, whatever the gate says.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mllm.injection.gated_xattn import GatedXAttnInjector


@dataclass(frozen=True)
class XAttnLayerReport:
    layer: int  # the decoder layer the block precedes
    attn_gate: float  # tanh(a_x)
    ff_gate: float  # tanh(a_f)
    residual: float  # mean |y| entering the block
    visual_read: float  # mean |tanh(a_x) CrossAttn(LN(y), X)|
    block_delta: float  # mean |y' - y|

    @property
    def read_ratio(self) -> float:
        """``visual_read / residual``: the image's share of the stream at this layer."""
        return self.visual_read / max(self.residual, 1e-12)


def _mean_norm(x: torch.Tensor, mask: torch.Tensor) -> float:
    """``|x[b, t]|`` averaged over the tokens where ``mask`` is set."""
    weights = mask.to(x.device, torch.float32)
    return float((x.float().norm(dim=-1) * weights).sum() / weights.sum().clamp_min(1.0))


def xattn_report(model: nn.Module, batch: Mapping[str, Any]) -> list[XAttnLayerReport]:
    """Per-layer gates and norms of every gated cross-attention block of ``model`` on ``batch``
    (keyword arguments of ``model``'s forward, with ``attention_mask``), in injector and layer order."""
    blocks = [(i, inj.blocks[str(i)]) for inj in model.injectors if isinstance(inj, GatedXAttnInjector)
              for i in inj.layer_ids]
    seen: dict[int, dict[str, torch.Tensor]] = {i: {} for i, _ in blocks}
    handles = []
    for i, block in blocks:
        handles.append(block.register_forward_hook(lambda _m, args, out, _s=seen[i]: _s.update(y=args[0], out=out)))
        handles.append(block.to_out.register_forward_hook(lambda _m, _a, out, _s=seen[i]: _s.update(attn=out)))
    try:
        with torch.no_grad():
            model(**batch)
    finally:
        for handle in handles:
            handle.remove()
    mask = batch["attention_mask"]
    reports = []
    for i, block in blocks:
        got, gate = seen[i], float(block.attn_gate.detach().tanh())
        reports.append(XAttnLayerReport(
            layer=i, attn_gate=gate, ff_gate=float(block.ff_gate.detach().tanh()), residual=_mean_norm(got["y"], mask),
            visual_read=_mean_norm(gate * got["attn"], mask), block_delta=_mean_norm(got["out"] - got["y"], mask),
        ))
    return reports
