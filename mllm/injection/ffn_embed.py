"""DEHVF: hierarchical visual features, selected per LLM layer, embedded in the layer's FFN.

DEHVF: Wei et al., 2025, "Dynamic Embedding of Hierarchical Visual Features for Efficient
Vision-Language Fine-Tuning", arXiv 2508.17638. INFERRED reconstruction: the paper's abstract fixes
the idea (a lightweight fuser picks ViT layers per LLM layer from that layer's own state; the result is
embedded in the layer's FFN; no visual token in the sequence), not its fuser equations, insertion form
or hyper-parameters. Those follow MemVP's FFN memory (Jie et al., ICML 2024, arXiv 2405.05615, and its
official code), the method DEHVF extends. For a chosen LLM block ``l`` with FFN input
``x_l = norm(h_l)`` ``[B, T, d]``:

1. ``F_m`` ``[B, N, d_v]``: the encoder layers ``m in M`` the encoder taps (the per-layer dict).
2. Layer query ``q_l = mean_t x_l[t]`` over the prompt tokens (``VisualContext.query_mask``),
   computed at prefill and frozen for decoding, so decoding stays causal-consistent.
3. Selection ``beta_l = softmax((W_l q_l + b_l) / tau)`` ``[B, |M|]`` with a per-layer linear selector.
   ``top_k = 0``: soft over all tapped layers, ``W_l = b_l = 0`` at init (uniform weights).
   ``top_k > 0``: exactly the k largest logits are kept and their weights renormalised; equal logits
   go to the tapped layer listed first, so the choice is never a tie. ``W_l = 0`` and ``b_l`` starts at
   the depth prior of :func:`depth_prior`: at the first step LLM layer ``l`` reads the k tapped layers
   nearest its own relative depth, the abstract's "hierarchical features corresponding to semantic
   granularity" (shallow LLM layers, shallow ViT layers). The renormalising sum is held constant in
   the backward pass, so the selector gets the gradient of the kept softmax weights ``p_m`` (the
   gate value of Switch Transformer's top-k routing, Fedus et al., 2022, arXiv 2101.03961, eqs. 1-2):
   without it a top-1 choice would have weight 1 whatever the logits, and no gradient.
4. ``Z_l = s_v * Proj(sum_m beta_{l,m} F_m)`` ``[B, N', d]`` with the MLLM's projector as the shared
   ``Proj`` (built on one encoder layer's width) and ``s_v = 0.01`` (MemVP). The paper does not fix
   the order; ``order: project_then_fuse`` gives ``Z_l = s_v * sum_m beta_{l,m} Proj(F_m)`` instead: the
   ``|M|`` projections are shared by all layers (cheaper when ``|M| < |L|``; identical for a linear
   projector).
5. MemVP memory beside the FFN, sharing its input norm:
   ``out_l = h_l + FFN_l(x_l) + s * SiLU(x_l (Z_l + P_k)^T) (Z_l + P_v)``, ``s = 0.1``,
   ``P_k ~ N(0, 0.02^2)``, ``P_v = 0`` (``[N', d]``, shared by all layers).

No visual token enters the sequence (the MLLM runs with ``splice: false``): the LLM sees only text;
a token pays ``O(N' d)`` per chosen layer instead of lengthening the sequence by ``N'``.
Alternatives the abstract leaves open (per-token selection, separate key/value projections) are not built.

Implemented as a forward hook on each chosen layer's ``mlp`` submodule (the FFN of Llama, Qwen,
Mistral, Gemma and Phi layers): its input is ``x_l``, and the memory read is added to its output.
``Z_l`` and ``beta_l`` are computed once per context (prefill) and reused while decoding.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from mllm.injection.base import (
    InjectionError,
    InjectionSpec,
    Injector,
    decoder_layers,
    masked_mean,
    resolve_llm_layers,
)


@dataclass
class FFNEmbedConfig:
    layers: list[int] = field(default_factory=list)  # LLM layers whose FFN gets visual memory; empty = all
    temperature: float = 1.0  # tau of the layer-selection softmax
    top_k: int = 0  # keep exactly the k largest selection weights (renormalised); 0 = soft over all tapped layers
    scale: float = 0.1  # s, MemVP's adapter_scale
    visual_scale: float = 0.01  # s_v: Z = s_v * Proj(fused feature), as MemVP scales its visual prompts
    pos_init_std: float = 0.02  # P_k ~ N(0, std^2); P_v starts at 0
    order: Literal["fuse_then_project", "project_then_fuse"] = "fuse_then_project"  # see step 4

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ValueError(f"temperature: expected > 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k: expected >= 0, got {self.top_k}")


def select_weights(logits: torch.Tensor, temperature: float, top_k: int) -> torch.Tensor:
    """``softmax(logits / tau)`` over encoder layers, or, with ``top_k``, its ``top_k`` largest entries
    renormalised (step 3 of the module docstring): ties go to the lower index, the sum is constant in backward."""
    probs = torch.softmax(logits / temperature, dim=-1)
    if not 0 < top_k < logits.shape[-1]:
        return probs
    kept = torch.sort(logits, dim=-1, descending=True, stable=True).indices[..., :top_k]  # stable: lower index first
    probs = probs * torch.zeros_like(probs).scatter(-1, kept, 1.0)
    return probs / probs.sum(-1, keepdim=True).detach()


def depth_prior(layer: int, num_layers: int, encoder_layers: Sequence[int]) -> torch.Tensor:
    """``-|r_l - r_m|`` ``[|M|]``: how far LLM layer ``l``'s relative depth ``l / (L - 1)`` lies from each tapped
    encoder layer's place in the tapped range, ``(m - min M) / (max M - min M)`` (0 = shallowest, 1 = deepest)."""
    low, span, depth = min(encoder_layers), max(max(encoder_layers) - min(encoder_layers), 1), max(num_layers - 1, 1)
    # integer numerators over one denominator: equal distances are equal floats, so ties stay ties
    return torch.tensor([-abs((m - low) * depth - layer * span) / (span * depth) for m in encoder_layers])


def mix(beta: torch.Tensor, stacked: torch.Tensor) -> torch.Tensor:
    """``sum_m beta[b, m] * stacked[b, m]``: ``[B, |M|]`` x ``[B, |M|, N, D]`` -> ``[B, N, D]`` (one bmm)."""
    batch, layers, num, dim = stacked.shape
    return (beta.to(stacked.dtype).unsqueeze(1) @ stacked.reshape(batch, layers, num * dim)).reshape(batch, num, dim)


def memory_read(x: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """MemVP's FFN-as-memory read: ``SiLU(x K^T) V`` for ``x`` ``[B, T, d]``, ``K, V`` ``[B, N, d]``."""
    return F.silu(x @ keys.transpose(1, 2)) @ values


class FFNEmbedInjector(Injector):
    """Per-layer hierarchical visual memory in the FFNs of the chosen decoder layers."""

    config_cls = FFNEmbedConfig
    needs = frozenset({"layers"})

    def __init__(self, cfg: FFNEmbedConfig, spec: InjectionSpec) -> None:
        super().__init__()
        self.cfg = cfg
        self.layer_ids = resolve_llm_layers(cfg.layers or range(spec.num_layers), spec.num_layers, "ffn_embed.layers")
        self.encoder_layers = spec.encoder_layers
        if cfg.top_k > len(spec.encoder_layers):
            raise InjectionError(f"ffn_embed.top_k: {cfg.top_k} exceeds the {len(spec.encoder_layers)} tapped encoder layers")
        self.select = nn.ModuleDict({str(i): nn.Linear(spec.hidden_size, len(spec.encoder_layers)) for i in self.layer_ids})
        with torch.no_grad():  # step 3: uniform soft selection, or the depth prior for top-k
            for i, lin in self.select.items():
                lin.weight.zero_()
                prior = depth_prior(int(i), spec.num_layers, spec.encoder_layers)
                lin.bias.copy_(prior if cfg.top_k else torch.zeros_like(prior))
        self.pos_k = nn.Parameter(torch.randn(spec.num_visual_tokens, spec.hidden_size) * cfg.pos_init_std)
        self.pos_v = nn.Parameter(torch.zeros(spec.num_visual_tokens, spec.hidden_size))

    def attach(self, llm: nn.Module) -> None:
        layers = decoder_layers(llm)
        for i in self.layer_ids:
            mlp = getattr(layers[i], "mlp", None)
            if not isinstance(mlp, nn.Module):
                raise InjectionError(
                    f"ffn_embed: decoder layer {i} ({type(layers[i]).__name__}) has no `mlp` FFN submodule to extend"
                )
            self._handles.append(mlp.register_forward_hook(partial(self._after_ffn, i)))

    def memory(self, layer: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(K_l, V_l, beta_l)`` of ``layer`` from its prefill FFN input ``x``; cached for the context."""
        cached = self.state.get(layer)
        if cached is not None:
            return cached
        ctx = self.check_batch(x)
        if ctx.layers is None or ctx.project is None:
            raise InjectionError("ffn_embed: the visual context carries no encoder layers / projector")
        if x.shape[1] != ctx.query_mask.shape[1]:
            raise InjectionError(
                f"ffn_embed: the first LLM call of a context must be the prefill ({ctx.query_mask.shape[1]} "
                f"tokens), got {x.shape[1]}"
            )
        lin = self.select[str(layer)]
        query = masked_mean(x.to(lin.weight.dtype), ctx.query_mask.to(x.device))
        beta = select_weights(lin(query), self.cfg.temperature, self.cfg.top_k)  # [B, |M|]
        if self.cfg.order == "fuse_then_project":
            z = ctx.project(mix(beta, self._stacked("features", lambda f: f)))
        else:
            z = mix(beta, self._stacked("projected", ctx.project))
        z = self.cfg.visual_scale * z.to(self.pos_k.dtype)
        self.state[layer] = (z + self.pos_k, z + self.pos_v, beta)
        return self.state[layer]

    def _stacked(self, key: str, fn: Any) -> torch.Tensor:
        """``[B, |M|, N, D]``: ``fn`` of every tapped encoder layer, stacked once per context."""
        if key not in self.state:
            layers = self.context.layers  # type: ignore[union-attr]
            self.state[key] = torch.stack([fn(layers[m]) for m in self.encoder_layers], dim=1)
        return self.state[key]

    def _after_ffn(self, layer: int, _module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> Any:
        if self.context is None:
            return None
        x = args[0]
        keys, values, _ = self.memory(layer, x)
        read = memory_read(x.to(keys.dtype), keys, values)
        return output + (self.cfg.scale * read).to(output.dtype)
