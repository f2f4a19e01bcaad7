"""DPN: a pyramid of spliced visual tokens pooled by dynamic pooling experts.

Dynamic Pyramid Network: Ai et al., 2025, arXiv 2503.20322; the details below follow its official
code (aihao2000/DPN-LLaVA), which fixes what the paper's text leaves out.

After each chosen decoder block ``p`` (DPN: 0-based 7, 15, 23 of 32, ``pooling_location='post'``)
the visual tokens of every sample — a ``rows x cols`` raster of spliced tokens — are pooled by one
of the experts (kernel = stride ``(kh, kw)``; DPN: (1,1), (1,2), (2,2) -> x1, x1/2, x1/4 tokens),
written back in place, and the sequence shrinks. Text tokens are untouched. Per stage:

    p = softmax(Router(h_r) / 10),  Router = LN -> Linear(d, d/4) -> GELU -> Linear(d/4, E)  (no bias)
    k ~ Categorical(p) in training (draws leaving < min_tokens are excluded), k = argmax p at inference
    V' = p_k * Pool_k(V)   (max pooling, ceil mode; the p_k factor gives the router a gradient)

``gate: straight_through`` (not in DPN) multiplies by ``1 + p_k - sg(p_k)`` instead (``sg``: stop-gradient):
the value is ``Pool_k(V)``, the router's gradient DPN's: the pooled tokens keep the scale of the residual
stream, which DPN's factor shrinks by p_k at every stage (by ~1/3 per stage while the routers are undecided).

``h_r`` is the hidden state of the router token: DPN appends a ``<ROUTER>`` token; we use its
documented fallback, the last prompt token (``VisualContext.query_mask``). Rows with fewer than
``skip_below`` visual tokens are not pooled. Routing loss (the official code's hinge), added to the LM loss in training:
``w * max(0, target - mean(c_kmax * p_kmax))`` over all decisions, ``k_max = argmax p``,
``c_k = k`` (experts listed from least to most compression), ``w = 0.001``, ``target = 1.5``.

How the HF decoder loop is shrunk without forking it. The model's ``forward`` computes the causal
mask, rotary ``position_embeddings`` and ``position_ids`` once and hands the same ones to every
layer. Hooks change that, on the real tensors (so the FLOPs saved are real):
* a forward hook after each pooling layer (prefill only) routes, pools and compacts every row, and
  left-pads the batch to its longest row; it records the new layout — 2-D mask, positions renumbered
  contiguously (text after the image moves down by the tokens removed), where the visual span lies;
* a forward pre-hook on every later layer replaces ``attention_mask`` (rebuilt by transformers' own
  ``create_causal_mask`` / ``create_sliding_window_causal_mask`` for that layer type, sized against
  that layer's own cache), ``position_ids`` and ``position_embeddings`` (the model's ``rotary_emb``);
* a forward hook after the last layer gathers the compact sequence back to the input length (each
  pooled-away visual slot reads its pooling cell), so logits, labels and HF's loss line up as usual.
KV cache: deeper layers simply hold shorter caches. During decoding nothing is pooled; a new token's
stage mask is the stage's prefill mask plus the decoding columns of the model's 2-D mask, and its
stage position is the model's position minus the tokens removed before it. Static (compileable)
caches, 3-D (m-RoPE) position ids and layers that take no ``position_embeddings`` are refused.
"""

from __future__ import annotations

import inspect
import math
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
    decoder_of,
    get_hidden,
    get_output,
    resolve_llm_layers,
    set_output,
)


@dataclass
class PyramidConfig:
    layers: list[int] = field(default_factory=lambda: [7, 15, 23])  # pool after these blocks (0-based)
    experts: list[list[int]] = field(default_factory=lambda: [[1, 1], [1, 2], [2, 2]])  # (kh, kw), least -> most pooling
    pool: Literal["max", "avg"] = "max"
    gate: Literal["prob", "straight_through"] = "prob"  # the pooled tokens' factor: p_k (DPN) or 1 + p_k - sg(p_k)
    min_tokens: int = 18  # training draws never leave fewer visual tokens (DPN re-samples)
    skip_below: int = 16  # rows with fewer visual tokens are not pooled
    router_ratio: int = 4  # router hidden width d / router_ratio
    logit_scale: float = 0.1  # router logits are divided by 10
    loss_weight: float = 0.001
    loss_target: float = 1.5

    def __post_init__(self) -> None:
        if not self.experts or any(len(e) != 2 or min(e) < 1 for e in self.experts):
            raise ValueError(f"experts: expected a list of [kh, kw] with positive sizes, got {self.experts}")
        if self.router_ratio < 1:
            raise ValueError(f"router_ratio: expected >= 1, got {self.router_ratio}")


class Router(nn.Module):
    """``softmax(logit_scale * W2 GELU(W1 LN(h)))`` -> expert probabilities ``[B, E]``."""

    def __init__(self, dim: int, num_experts: int, ratio: int, logit_scale: float) -> None:
        super().__init__()
        hidden = max(1, dim // ratio)
        self.net = nn.Sequential(
            nn.LayerNorm(dim), nn.Linear(dim, hidden, bias=False), nn.GELU(), nn.Linear(hidden, num_experts, bias=False)
        )
        self.logit_scale = logit_scale

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.net(h) * self.logit_scale, dim=-1)


@dataclass
class Layout:
    """The prefill sequence entering one pyramid stage (``T_s`` slots per row)."""

    mask: torch.Tensor  # [B, T_s] 1 = real token
    positions: torch.Tensor  # [B, T_s] rotary positions
    start: list[int]  # first visual slot per row
    grid: list[tuple[int, int]]  # visual (rows, cols) per row
    query: list[int]  # router-token slot per row
    expand: torch.Tensor  # [B, T0] slot of every original position (a pooled-away token -> its cell)
    removed: torch.Tensor  # [B] tokens removed so far (all before the text that follows the image)


def pool_grid(tokens: torch.Tensor, grid: tuple[int, int], kernel: tuple[int, int], mode: str) -> torch.Tensor:
    """``[n, D]`` raster tokens -> ``[ceil(r/kh) * ceil(c/kw), D]`` (kernel = stride, edge cells clipped)."""
    fmap = tokens.transpose(0, 1).reshape(1, tokens.shape[1], *grid)
    fn = F.max_pool2d if mode == "max" else F.avg_pool2d
    return fn(fmap, kernel, kernel, ceil_mode=True).flatten(2)[0].transpose(0, 1)


def cell_of(index: torch.Tensor, grid: tuple[int, int], kernel: tuple[int, int]) -> torch.Tensor:
    """Raster index of the pooling cell holding each raster token ``index``."""
    cols_out = math.ceil(grid[1] / kernel[1])
    return (index // grid[1] // kernel[0]) * cols_out + (index % grid[1]) // kernel[1]


class PyramidInjector(Injector):
    """DPN routers at the configured depths, and the hooks that shrink the HF decoder loop."""

    config_cls = PyramidConfig
    needs = frozenset({"splice"})

    def __init__(self, cfg: PyramidConfig, spec: InjectionSpec) -> None:
        super().__init__()
        self.cfg = cfg
        self.pool_layers = resolve_llm_layers(cfg.layers, spec.num_layers, "pyramid.layers")
        if self.pool_layers[-1] >= spec.num_layers - 1:
            raise InjectionError(f"pyramid.layers: pooling after the last layer ({spec.num_layers - 1}) saves nothing")
        if spec.visual_grid is None:
            raise InjectionError("pyramid: the projector's visual tokens form no (rows, cols) grid to pool")
        self.grid = spec.visual_grid
        self.num_layers = spec.num_layers
        self.experts = [(int(kh), int(kw)) for kh, kw in cfg.experts]
        self.routers = nn.ModuleDict({
            str(p): Router(spec.hidden_size, len(self.experts), cfg.router_ratio, cfg.logit_scale)
            for p in self.pool_layers
        })
        self.last_visual_tokens: list[list[int]] = []  # [stage][row] visual tokens, last prefill
        self.pinned: list[int] | None = None  # an expert per stage instead of the routers' choice (pin)
        self.reset_stats()

    def pin(self, experts: list[int] | None) -> None:
        """Route every row of stage ``s`` to expert ``experts[s]`` (``None``: the routers choose again). The
        router's own probability of that expert still scales the pooled tokens, as in training, so the deeper
        layers see the magnitudes they learnt: a fixed compute budget for a trained DPN (its accuracy/FLOPs curve)."""
        if experts is not None:
            if len(experts) != len(self.pool_layers) or not all(0 <= k < len(self.experts) for k in experts):
                raise InjectionError(f"pyramid.pin: expected {len(self.pool_layers)} expert indices in "
                                     f"0..{len(self.experts) - 1}, got {experts}")
            experts = [int(k) for k in experts]
        self.pinned = experts

    # --- attaching ----------------------------------------------------------------------------
    def attach(self, llm: nn.Module) -> None:
        decoder = decoder_of(llm)
        layers = decoder.layers
        if len(layers) != self.num_layers:
            raise InjectionError(f"pyramid: the LLM has {len(layers)} layers, the spec {self.num_layers}")
        self._decoder = [decoder]  # a list: not a submodule of the injector
        types = getattr(decoder.config, "layer_types", None) or ["full_attention"] * len(layers)
        unknown = sorted({t for t in types} - {"full_attention", "sliding_attention"})
        if unknown:
            raise InjectionError(f"pyramid: attention type {unknown[0]!r} cannot be re-masked after pooling")
        if not callable(getattr(decoder, "rotary_emb", None)):
            raise InjectionError(f"pyramid: {type(decoder).__name__} has no rotary_emb to re-embed pooled positions")
        self._types = list(types)
        self._handles.append(decoder.register_forward_pre_hook(self._on_decoder, with_kwargs=True))
        for i in range(self.pool_layers[0] + 1, len(layers)):
            stage = sum(p < i for p in self.pool_layers)
            self._handles.append(layers[i].register_forward_pre_hook(partial(self._restage, i, stage), with_kwargs=True))
        for stage, p in enumerate(self.pool_layers):
            self._handles.append(layers[p].register_forward_hook(partial(self._pool, p, stage), with_kwargs=True))
        self._handles.append(layers[-1].register_forward_hook(self._expand))

    # --- hooks --------------------------------------------------------------------------------
    def _on_decoder(self, _module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Record, per LLM call, the model's 2-D mask and whether this call is the prefill."""
        if self.context is None:
            return
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is not None and getattr(cache, "is_compileable", False):
            raise InjectionError("pyramid: static (compileable) caches cannot hold per-stage lengths")
        mask = kwargs.get("attention_mask")
        if mask is not None and (not isinstance(mask, torch.Tensor) or mask.ndim != 2):
            raise InjectionError("pyramid: needs the model's 2-D attention mask, got a prepared one")
        prefill = cache is None or cache.get_seq_length() == 0
        if prefill:
            self.state["layouts"] = []
            self.state["decisions"] = []
        elif "layouts" not in self.state:
            raise InjectionError("pyramid: a cached decoding step without a prefill in this context")
        self.state["call"] = {"prefill": prefill, "mask": mask}

    def _pool(self, layer: int, stage: int, _m: nn.Module, _a: Any, kwargs: dict[str, Any], output: Any) -> Any:
        if self.context is None or not self.state["call"]["prefill"]:
            return None
        hidden = get_output(output)
        layouts = self.state["layouts"]
        if stage == 0:
            layouts.append(self._first_layout(hidden, kwargs.get("position_ids")))
        hidden, layout = self._pool_stage(hidden, layouts[stage], self.routers[str(layer)], stage)
        layouts.append(layout)
        return set_output(output, hidden)

    def _restage(self, layer: int, stage: int, _m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Hand layer ``layer`` (in pyramid stage ``stage``) its stage's mask and positions."""
        if self.context is None:
            return None
        hidden = get_hidden(args, kwargs)
        call = self.state["call"]
        key = (stage, self._types[layer])
        if key not in call:
            call[key] = self._stage_inputs(layer, stage, hidden, kwargs)
        mask, positions, embeddings = call[key]
        new = {**kwargs, "attention_mask": mask}
        if "position_ids" in kwargs:
            new["position_ids"] = positions
        if "position_embeddings" not in kwargs:
            raise InjectionError(f"pyramid: decoder layer {layer} takes no position_embeddings to re-embed")
        new["position_embeddings"] = embeddings
        return args, new

    def _expand(self, _module: nn.Module, _args: Any, output: Any) -> Any:
        if self.context is None or not self.state["call"]["prefill"]:
            return None
        layouts: list[Layout] = self.state["layouts"]
        self.last_visual_tokens = [[r * c for r, c in lay.grid] for lay in layouts]
        self._rows += len(layouts[0].grid)
        self._token_sums = [a + sum(b) for a, b in zip(self._token_sums, self.last_visual_tokens, strict=False)]
        hidden = get_output(output)
        rows = torch.arange(hidden.shape[0], device=hidden.device)[:, None]
        return set_output(output, hidden[rows, layouts[-1].expand.to(hidden.device)])

    def aux_loss(self) -> torch.Tensor | None:
        decisions = self.state.get("decisions") if self.training else None
        if not decisions:
            return None
        probs = torch.stack(decisions)  # [decisions, E]
        top, k_max = probs.max(dim=-1)
        score = (k_max.to(top.dtype) * top).mean()
        return self.cfg.loss_weight * F.relu(self.cfg.loss_target - score)

    # --- layouts ------------------------------------------------------------------------------
    def _first_layout(self, hidden: torch.Tensor, positions: torch.Tensor | None) -> Layout:
        ctx = self.check_batch(hidden)
        if ctx.image_mask is None or ctx.image_mask.shape[1] != hidden.shape[1]:
            raise InjectionError("pyramid: the prefill must be the spliced sequence of the visual context")
        batch, length = ctx.image_mask.shape
        device = hidden.device
        mask = self.state["call"]["mask"]
        mask = torch.ones(batch, length, dtype=torch.long, device=device) if mask is None else mask.to(device).long()
        if positions is None:
            positions = (mask.cumsum(-1) - 1).clamp_min(0)
        if positions.ndim != 2:
            raise InjectionError("pyramid: 3-D (multimodal rotary) position ids are not supported")
        image = ctx.image_mask.to(device)
        count = self.grid[0] * self.grid[1]
        start = image.long().argmax(dim=1).tolist()
        flipped = ctx.query_mask.to(device).long().flip(1).argmax(dim=1)
        query = (length - 1 - flipped).tolist()
        for b in range(batch):
            if not image[b, start[b]: start[b] + count].all() or int(image[b].sum()) != count:
                raise InjectionError(f"pyramid: row {b} does not hold one contiguous block of {count} visual tokens")
            if query[b] < start[b] + count:
                raise InjectionError(f"pyramid: row {b}'s router token (last prompt token) precedes its image")
        return Layout(
            mask=mask, positions=positions.to(device).expand(batch, -1), start=start, grid=[self.grid] * batch,
            query=query, expand=torch.arange(length, device=device).expand(batch, -1),
            removed=torch.zeros(batch, dtype=torch.long, device=device),
        )

    def _choose(self, probs: torch.Tensor, grid: tuple[int, int], stage: int) -> int:
        if self.pinned is not None:
            return self.pinned[stage]
        if not self.training:
            return int(probs.argmax())
        kept = [math.ceil(grid[0] / kh) * math.ceil(grid[1] / kw) for kh, kw in self.experts]
        allowed = [k for k, n in enumerate(kept) if n >= self.cfg.min_tokens] or [max(range(len(kept)), key=kept.__getitem__)]
        weights = probs.detach()[allowed]
        return allowed[int(torch.multinomial(weights / weights.sum(), 1))]

    def _pool_stage(self, hidden: torch.Tensor, lay: Layout, router: Router, stage: int) -> tuple[torch.Tensor, Layout]:
        """Route, pool and compact every row; the batch is left-padded to its longest row."""
        batch, length, dim = hidden.shape
        device = hidden.device
        rows = torch.arange(batch, device=device)
        probs = router(hidden[rows, torch.tensor(lay.query, device=device)].to(router.net[0].weight.dtype))
        parts, maps, grids = [], [], []
        old = torch.arange(length, device=device)
        for b in range(batch):
            s, grid = lay.start[b], lay.grid[b]
            n = grid[0] * grid[1]
            visual = hidden[b, s: s + n]
            kernel = (1, 1)
            if n >= self.cfg.skip_below:
                k = self._choose(probs[b], grid, stage)
                self.state["decisions"].append(probs[b])
                kernel = self.experts[k]
                p = probs[b, k].to(hidden.dtype)
                visual = pool_grid(visual, grid, kernel, self.cfg.pool) * (p if self.cfg.gate == "prob" else 1 + p - p.detach())
            new_grid = (math.ceil(grid[0] / kernel[0]), math.ceil(grid[1] / kernel[1]))
            n_new = new_grid[0] * new_grid[1]
            parts.append(torch.cat([hidden[b, :s], visual, hidden[b, s + n:]]))
            cell = s + cell_of((old - s).clamp(0, n - 1), grid, kernel)
            maps.append(torch.where(old < s, old, torch.where(old < s + n, cell, old - (n - n_new))))
            grids.append(new_grid)
        width = max(p.shape[0] for p in parts)
        pads = [width - p.shape[0] for p in parts]
        out = torch.stack([F.pad(p, (0, 0, pad, 0)) for p, pad in zip(parts, pads, strict=True)])
        removed = torch.tensor([length - p.shape[0] for p in parts], device=device)

        def compact(t: torch.Tensor, b: int, shift: int = 0) -> torch.Tensor:
            s, n, n_new = lay.start[b], lay.grid[b][0] * lay.grid[b][1], grids[b][0] * grids[b][1]
            row = torch.cat([t[:s], t[s: s + n_new], t[s + n:] - shift])
            return F.pad(row, (pads[b], 0))

        new = Layout(
            mask=torch.stack([compact(lay.mask[b], b) for b in range(batch)]),
            positions=torch.stack([compact(lay.positions[b], b, int(removed[b])) for b in range(batch)]),
            start=[lay.start[b] + pads[b] for b in range(batch)],
            grid=grids,
            query=[int(maps[b][lay.query[b]]) + pads[b] for b in range(batch)],
            expand=torch.stack([maps[b][lay.expand[b]] + pads[b] for b in range(batch)]),
            removed=lay.removed + removed,
        )
        return out, new

    def _stage_inputs(
        self, layer: int, stage: int, hidden: torch.Tensor, kwargs: dict[str, Any]
    ) -> tuple[Any, torch.Tensor, Any]:
        """This call's (4-D mask, position ids, rotary embeddings) for the layers of ``stage``."""
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        lay: Layout = self.state["layouts"][stage]
        call = self.state["call"]
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if call["prefill"]:
            mask, positions = lay.mask, lay.positions
        else:
            q = hidden.shape[1]
            columns = cache.get_seq_length(layer) + q - lay.mask.shape[1]
            model_mask = call["mask"]
            extra = (
                torch.ones(hidden.shape[0], columns, dtype=lay.mask.dtype, device=lay.mask.device)
                if model_mask is None else model_mask[:, -columns:].to(lay.mask)
            )
            mask = torch.cat([lay.mask, extra], dim=1)
            given = kwargs.get("position_ids")
            positions = (
                given.expand(hidden.shape[0], -1) - lay.removed[:, None]
                if given is not None else (mask.cumsum(-1) - 1)[:, -q:]
            )
        decoder = self._decoder[0]
        make = create_causal_mask if self._types[layer] == "full_attention" else create_sliding_window_causal_mask
        attn = make(
            config=decoder.config, inputs_embeds=hidden, attention_mask=mask.bool(), cache=cache,
            position_ids=positions, layer_idx=layer,
        )
        rotary = decoder.rotary_emb
        if "layer_type" in inspect.signature(rotary.forward).parameters:  # Gemma 3: local / global rotary bases
            return attn, positions, rotary(hidden, positions, self._types[layer])
        return attn, positions, rotary(hidden, positions)

    def reset_stats(self) -> None:
        self._rows = 0
        self._token_sums = [0.0] * (len(self.pool_layers) + 1)

    def tokens_per_layer(self) -> list[float]:
        """Mean visual tokens entering each decoder layer, over every row prefilled since
        :meth:`reset_stats` (routing is per sample: FLOPs are reported as this mean)."""
        bounds = [-1, *self.pool_layers, self.num_layers - 1]
        rows = max(self._rows, 1)
        return [self._token_sums[s] / rows for s in range(len(self._token_sums)) for _ in range(bounds[s + 1] - bounds[s])]
