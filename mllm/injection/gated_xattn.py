"""Flamingo-style gated cross-attention in front of chosen decoder layers.

Before each chosen frozen LM block (Flamingo: Alayrac et al., 2022, arXiv 2204.14198, §2.2, the
GATED XATTN-DENSE layers; OpenFlamingo's ``GatedCrossAttentionBlock``):

    y <- y + tanh(a_x) * CrossAttn(q = LN(y), k, v = X)      X: the projected visual tokens [B, M, d]
    y <- y + tanh(a_f) * FFW(LN(y))                          FFW: Linear(d, m d) -> GELU -> Linear(m d, d)
    y <- LMBlock(y)

with scalar gates ``a_x = a_f = 0`` at initialisation, so the model's logits are exactly the plain
LLM's until the gates move. Multi-head attention without bias (``heads`` x ``dim_head``), no
LayerNorm on the visual side (OpenFlamingo). Layers: an explicit list, or every ``every``-th
(``(i + 1) % every == 0``, OpenFlamingo's convention). Flamingo lets a text token see only the most
recent preceding image; with one image per sample at the start of the prompt every token sees it
(the few template tokens before the ``<image>`` marker included).

Implemented as a forward pre-hook on each chosen decoder layer that rewrites its input hidden
states. Each block's visual keys/values ``X W_k, X W_v`` are computed once per context (prefill) and
reused by every cached decoding step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mllm.injection.base import (
    InjectionError,
    InjectionSpec,
    Injector,
    decoder_layers,
    every_kth,
    get_hidden,
    resolve_llm_layers,
    set_hidden,
)


@dataclass
class GatedXAttnConfig:
    layers: list[int] = field(default_factory=list)  # decoder layers to precede (negative = from the end)
    every: int = 1  # with `layers` empty: layers i with (i + 1) % every == 0
    heads: int = 8
    dim_head: int = 64
    ff_mult: int = 4  # FFW hidden width = ff_mult * d
    gate_init: float = 0.0  # a_x = a_f at init; 0 keeps the plain LLM's logits exactly

    def __post_init__(self) -> None:
        if self.heads < 1 or self.dim_head < 1 or self.ff_mult < 1:
            raise ValueError("heads, dim_head and ff_mult must be positive integers")


class GatedXAttnBlock(nn.Module):
    """One gated cross-attention + gated feed-forward block (the equation in the module docstring)."""

    def __init__(self, dim: int, heads: int, dim_head: int, ff_mult: int, gate_init: float) -> None:
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.norm = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)
        self.ff = nn.Sequential(
            nn.LayerNorm(dim), nn.Linear(dim, ff_mult * dim, bias=False), nn.GELU(), nn.Linear(ff_mult * dim, dim, bias=False)
        )
        self.attn_gate = nn.Parameter(torch.tensor(float(gate_init)))
        self.ff_gate = nn.Parameter(torch.tensor(float(gate_init)))

    def _split(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, H*Dh] -> [B, H, T, Dh]
        return x.unflatten(-1, (self.heads, -1)).transpose(1, 2)

    def keys_values(self, visual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self.to_kv(visual).chunk(2, dim=-1)
        return self._split(k), self._split(v)

    def forward(self, y: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        q = self._split(self.to_q(self.norm(y)))
        attn = F.scaled_dot_product_attention(q, *kv).transpose(1, 2).flatten(2)
        y = y + self.attn_gate.tanh() * self.to_out(attn)
        return y + self.ff_gate.tanh() * self.ff(y)


class GatedXAttnInjector(Injector):
    """Gated cross-attention blocks before the configured decoder layers."""

    config_cls = GatedXAttnConfig
    needs = frozenset({"tokens"})

    def __init__(self, cfg: GatedXAttnConfig, spec: InjectionSpec) -> None:
        super().__init__()
        self.cfg = cfg
        where = "gated_xattn.layers" if cfg.layers else "gated_xattn.every"
        self.layer_ids = (
            resolve_llm_layers(cfg.layers, spec.num_layers, where)
            if cfg.layers else every_kth(cfg.every, spec.num_layers, where)
        )
        self.blocks = nn.ModuleDict({
            str(i): GatedXAttnBlock(spec.hidden_size, cfg.heads, cfg.dim_head, cfg.ff_mult, cfg.gate_init)
            for i in self.layer_ids
        })

    def attach(self, llm: nn.Module) -> None:
        layers = decoder_layers(llm)
        if len(layers) <= self.layer_ids[-1]:
            raise InjectionError(f"gated_xattn: layer {self.layer_ids[-1]} beyond the LLM's {len(layers)} layers")
        for i in self.layer_ids:
            self._handles.append(layers[i].register_forward_pre_hook(partial(self._before, i), with_kwargs=True))

    def _before(self, layer: int, _module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if self.context is None:
            return None
        hidden = get_hidden(args, kwargs)
        ctx = self.check_batch(hidden)
        block = self.blocks[str(layer)]
        kv = self.state.get(layer)
        if kv is None:  # prefill: the visual keys/values of this block, reused while decoding
            if ctx.tokens is None:
                raise InjectionError("gated_xattn: the visual context carries no projected tokens")
            kv = self.state[layer] = block.keys_values(ctx.tokens.to(block.to_q.weight.dtype))
        out = block(hidden.to(block.to_q.weight.dtype), kv)
        return set_hidden(args, kwargs, out.to(hidden.dtype))
