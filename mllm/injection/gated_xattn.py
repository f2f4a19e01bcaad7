"""Flamingo-style gated cross-attention in front of chosen decoder layers.

Before each chosen frozen LM block (Flamingo: Alayrac et al., 2022, arXiv 2204.14198, §2.2, the
GATED XATTN-DENSE layers; OpenFlamingo's ``GatedCrossAttentionBlock``):

    y <- y + tanh(a_x) * CrossAttn(q = LN(y), k, v = X)      X: the projected visual tokens [B, M, d]*
    y <- y + tanh(a_f) * FFW(LN(y))                          FFW: Linear(d, m d) -> GELU -> Linear(m d, d)
    y <- LMBlock(y)                                          * or the resampled latents [B, R, d]

with scalar gates ``a_x = a_f = 0`` at initialisation, so the model's logits are exactly the plain
LLM's until the gates move. Multi-head attention without bias (``heads`` x ``dim_head``), no
LayerNorm on the visual side (OpenFlamingo). Layers: an explicit list, or every ``every``-th
(``(i + 1) % every == 0``, OpenFlamingo's convention). Flamingo lets a text token see only the most
recent preceding image; with one image per sample at the start of the prompt every token sees it
(the few template tokens before the ``<image>`` marker included).

Perceiver Resampler (optional, ``resampler: {latents, depth, heads, ...}``; Flamingo §2.1, "Visual
processing and the Perceiver Resampler", and the pseudo-code of its resampler figure): ``X`` is then
``R`` learned latents that have read the visual tokens, not the ``M`` tokens themselves. With ``X_f``
the projected tokens of the image (one frame, so one learned time embedding ``t``, zero at init) and
``x`` the ``[R, d]`` learned latents:

    X_f <- X_f + t
    x   <- x + Attn(q = LN(x), k, v = [LN(X_f) ; LN(x)])     keys/values: the media AND the latents
    x   <- x + FFW(LN(x))                                    FFW as above, mult ``ff_mult``
    (``depth`` times, each layer its own weights), then X = LN(x)  [B, R, d]

Multi-head attention without bias, separate LayerNorms on media and latents and the final LayerNorm
follow OpenFlamingo's ``PerceiverResampler`` (Awadalla et al., 2023, arXiv 2308.01390), whose
defaults (64 latents, depth 6, 8 heads x 64, FFW mult 4) are ours; Flamingo uses R = 64.

Positions (``positions: true``; not in Flamingo): softmax cross-attention is blind to the order of its
keys, so a token's place in the image reaches the LLM only if its features carry it. The option adds a
learned embedding ``P`` ([M, d], zero at init) to the visual tokens before the resampler or the blocks,
``X <- X + P``, as ViT adds learned positions to its patch embeddings (Dosovitskiy et al., 2020, arXiv
2010.11929, eq. 1); the splice gets the same information from the LLM's own rotary positions.

Implemented as a forward pre-hook on each chosen decoder layer that rewrites its input hidden
states. The cross-attended set (tokens or resampled latents) and each block's keys/values
``X W_k, X W_v`` are computed once per context (prefill) and reused by every cached decoding step.
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
    VisualContext,
    decoder_layers,
    every_kth,
    get_hidden,
    resolve_llm_layers,
    set_hidden,
)


@dataclass
class ResamplerConfig:
    latents: int = 64  # R learned latents: the visual set every block cross-attends
    depth: int = 6  # resampler layers (attention + FFW)
    heads: int = 8
    dim_head: int = 64
    ff_mult: int = 4

    def __post_init__(self) -> None:
        for name in ("latents", "depth", "heads", "dim_head", "ff_mult"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected a positive integer, got {getattr(self, name)}")


@dataclass
class GatedXAttnConfig:
    layers: list[int] = field(default_factory=list)  # decoder layers to precede (negative = from the end)
    every: int = 1  # with `layers` empty: layers i with (i + 1) % every == 0
    heads: int = 8
    dim_head: int = 64
    ff_mult: int = 4  # FFW hidden width = ff_mult * d
    gate_init: float = 0.0  # a_x = a_f at init; 0 keeps the plain LLM's logits exactly
    positions: bool = False  # add a learned position embedding to the cross-attended tokens (module docstring)
    resampler: ResamplerConfig | None = None  # Perceiver Resampler latents as the cross-attended set; None = the tokens

    def __post_init__(self) -> None:
        if self.heads < 1 or self.dim_head < 1 or self.ff_mult < 1:
            raise ValueError("heads, dim_head and ff_mult must be positive integers")


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``[B, T, H*Dh] -> [B, H, T, Dh]``."""
    return x.unflatten(-1, (heads, -1)).transpose(1, 2)


def feed_forward(dim: int, mult: int) -> nn.Sequential:
    """Flamingo's FFW: ``Linear(mult d, d)(GELU(Linear(d, mult d)(LN(x))))``, no bias."""
    return nn.Sequential(
        nn.LayerNorm(dim), nn.Linear(dim, mult * dim, bias=False), nn.GELU(), nn.Linear(mult * dim, dim, bias=False)
    )


class PerceiverLayer(nn.Module):
    """One Perceiver Resampler layer: latents attend to ``[LN(media) ; LN(latents)]``, then FFW (module docstring)."""

    def __init__(self, dim: int, cfg: ResamplerConfig) -> None:
        super().__init__()
        inner = cfg.heads * cfg.dim_head
        self.heads = cfg.heads
        self.norm_media = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)
        self.ff = feed_forward(dim, cfg.ff_mult)

    def forward(self, media: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        normed = self.norm_latents(latents)
        k, v = self.to_kv(torch.cat([self.norm_media(media), normed], dim=1)).chunk(2, dim=-1)
        q = self.to_q(normed)
        attn = F.scaled_dot_product_attention(*(split_heads(t, self.heads) for t in (q, k, v)))
        latents = latents + self.to_out(attn.transpose(1, 2).flatten(2))
        return latents + self.ff(latents)


class PerceiverResampler(nn.Module):
    """``[B, M, d]`` visual tokens -> ``[B, R, d]`` latents (Flamingo's resampler pseudo-code, module docstring)."""

    def __init__(self, dim: int, cfg: ResamplerConfig) -> None:
        super().__init__()
        self.latents = nn.Parameter(torch.randn(cfg.latents, dim))
        self.time = nn.Parameter(torch.zeros(dim))  # the one frame's time embedding
        self.layers = nn.ModuleList(PerceiverLayer(dim, cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(dim)

    def forward(self, media: torch.Tensor) -> torch.Tensor:
        media = media + self.time
        latents = self.latents.expand(media.shape[0], -1, -1)
        for layer in self.layers:
            latents = layer(media, latents)
        return self.norm(latents)


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
        self.ff = feed_forward(dim, ff_mult)
        self.attn_gate = nn.Parameter(torch.tensor(float(gate_init)))
        self.ff_gate = nn.Parameter(torch.tensor(float(gate_init)))

    def keys_values(self, visual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self.to_kv(visual).chunk(2, dim=-1)
        return split_heads(k, self.heads), split_heads(v, self.heads)

    def forward(self, y: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        q = split_heads(self.to_q(self.norm(y)), self.heads)
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
        self.resampler = PerceiverResampler(spec.hidden_size, cfg.resampler) if cfg.resampler else None
        self.positions = nn.Parameter(torch.zeros(spec.num_visual_tokens, spec.hidden_size)) if cfg.positions else None

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
            kv = self.state[layer] = block.keys_values(self.media(ctx, block.to_q.weight.dtype))
        out = block(hidden.to(block.to_q.weight.dtype), kv)
        return set_hidden(args, kwargs, out.to(hidden.dtype))

    def media(self, ctx: VisualContext, dtype: torch.dtype) -> torch.Tensor:
        """The set every block cross-attends, ``[B, M, d]`` tokens or ``[B, R, d]`` resampled latents; once per context."""
        if "media" not in self.state:
            if ctx.tokens is None:
                raise InjectionError("gated_xattn: the visual context carries no projected tokens")
            tokens = ctx.tokens.to(dtype)
            if self.positions is not None:
                tokens = tokens + self.positions.to(dtype)
            self.state["media"] = tokens if self.resampler is None else self.resampler(tokens)
        return self.state["media"]
