"""Where the LLM reads the image, per injector: one forward, per-layer figures.

:func:`xattn_report`: for every :class:`~mllm.injection.gated_xattn.GatedXAttnBlock` of a model's ``gated_xattn`` injectors,
on one batch (Flamingo's block, Alayrac et al., 2022, arXiv 2204.14198, §2.2):

* the gates ``tanh(a_x)`` and ``tanh(a_f)``;
* ``|y|``: the residual stream entering the block;
* ``|tanh(a_x) CrossAttn(LN(y), X)|``: the visual read the block adds;
* ``|y' - y|``: all the block adds (visual read and gated FFW).

Norms are L2 over the width, averaged over the real tokens (``attention_mask``). A read far below the
residual means the LLM barely sees the image at that layer, whatever the gate says.

:func:`position_probe`: whether the cross-attended tokens carry their place in the image (a
:func:`linear_probe` of the token index), which keys without a position embedding need for grounding.

:func:`ffn_report`: per DEHVF / MemVP FFN memory (``ffn_embed``), the encoder-layer selection, the memory
read against the FFN's own output, and how much the read changes with another image.
:func:`router_report`: per DPN pooling stage (``pyramid``), the routers' probabilities, the expert used and
the visual tokens kept per row.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mllm.injection.base import decoder_layers
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


def _forward(model: nn.Module, batch: Mapping[str, Any], handles: list[Any]) -> None:
    """One gradient-free forward of ``model`` on ``batch`` with the diagnostic ``handles`` attached, then removed."""
    try:
        with torch.no_grad():
            model(**batch)
    finally:
        for handle in handles:
            handle.remove()


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
    _forward(model, batch, handles)
    mask = batch["attention_mask"]
    reports = []
    for i, block in blocks:
        got, gate = seen[i], float(block.attn_gate.detach().tanh())
        reports.append(XAttnLayerReport(
            layer=i, attn_gate=gate, ff_gate=float(block.ff_gate.detach().tanh()), residual=_mean_norm(got["y"], mask),
            visual_read=_mean_norm(gate * got["attn"], mask), block_delta=_mean_norm(got["out"] - got["y"], mask),
        ))
    return reports


def linear_probe(features: torch.Tensor, labels: torch.Tensor, split: int, steps: int = 300, seed: int = 0) -> float:
    """Held-out accuracy of a linear classifier ``[d] -> classes`` read from ``features`` ``[N, d]``.

    Fitted with Adam on rows ``[:split]`` (features standardised per dimension on them, so one learning rate
    fits every scale), scored on rows ``[split:]``: near the majority-class rate, the labels are not linearly
    readable from the features; near 1, they are.
    """
    if not 0 < split < len(features):
        raise ValueError(f"linear_probe: split {split} leaves no fit/score rows among {len(features)}")
    x = features.detach().float()
    mean, std = x[:split].mean(0), x[:split].std(0).clamp_min(1e-6)
    x = (x - mean) / std
    classes, dim = int(labels.max()) + 1, x.shape[1]
    generator = torch.Generator().manual_seed(seed)
    weight = (torch.randn(dim, classes, generator=generator) * dim ** -0.5).requires_grad_()
    bias = torch.zeros(classes, requires_grad=True)
    optimizer = torch.optim.Adam([weight, bias], lr=1e-2)
    with torch.enable_grad():
        for _ in range(steps):
            optimizer.zero_grad()
            nn.functional.cross_entropy(x[:split] @ weight + bias, labels[:split]).backward()
            optimizer.step()
    with torch.no_grad():
        guess = (x[split:] @ weight + bias).argmax(-1)
    return float((guess == labels[split:]).float().mean())


def position_probe(tokens: torch.Tensor, train_fraction: float = 0.75, steps: int = 300, seed: int = 0) -> float:
    """How well a linear map reads each visual token's index from its features, ``tokens`` ``[B, M, d]``.

    Softmax cross-attention ignores the order of its keys, so a block can tell where an object is only
    if the token's features say so. A :func:`linear_probe` ``[d] -> M`` (the token index, i.e. its cell
    in a raster grid) is fitted on the first ``train_fraction`` of the images and scored on the rest:
    accuracy near ``1 / M`` means the positions are gone, near 1 that they are all there.
    """
    batch, count, dim = tokens.shape
    split = int(batch * train_fraction)
    if not 0 < split < batch:
        raise ValueError(f"position_probe: {batch} images leave no train/test split at {train_fraction}")
    labels = torch.arange(count).repeat(batch)
    return linear_probe(tokens.reshape(-1, dim), labels, split * count, steps, seed)


@dataclass(frozen=True)
class FFNLayerReport:
    layer: int  # the decoder layer whose FFN holds the memory
    selection: list[float]  # beta_l, averaged over the batch, one weight per tapped encoder layer
    ffn_out: float  # mean |FFN_l(x_l)|
    memory_read: float  # mean |s SiLU(x_l K_l^T) V_l|
    key_norm: float  # mean |K_l[n]| over the N' memory slots
    image_dependence: float | None  # mean |read - read with another row's image| / mean |read| (``shift`` > 0)

    @property
    def read_ratio(self) -> float:
        """``memory_read / ffn_out``: the image's share of what this layer's FFN adds."""
        return self.memory_read / max(self.ffn_out, 1e-12)


def _ffn_reads(model: nn.Module, injectors: list[Any], batch: Mapping[str, Any]) -> dict[tuple[int, int], dict[str, Any]]:
    """Per (injector, layer): the FFN input ``x``, the hooked ``mlp``'s output (FFN + read), the memory
    ``(K, V, beta)`` and the read ``s SiLU(x K^T) V`` recomputed from them, on one forward of ``batch``."""
    from mllm.injection.ffn_embed import memory_read

    layers = decoder_layers(model.llm)
    seen: dict[tuple[int, int], dict[str, Any]] = {}
    handles = []
    for j, inj in enumerate(injectors):
        for i in inj.layer_ids:
            slot = seen.setdefault((j, i), {})
            # registered after the injector's own hook: ``out`` already holds FFN + read, and the
            # injector's per-context state (dropped when the call ends) holds this layer's memory
            handles.append(layers[i].mlp.register_forward_hook(
                lambda _m, args, out, _s=slot, _inj=inj, _i=i: _s.update(x=args[0], out=out, memory=_inj.state[_i])))
    _forward(model, batch, handles)
    for (j, _i), got in seen.items():
        keys, values, _ = got["memory"]
        got["read"] = injectors[j].cfg.scale * memory_read(got["x"].to(keys.dtype), keys, values)
    return seen


def ffn_report(model: nn.Module, batch: Mapping[str, Any], shift: int = 0) -> list[FFNLayerReport]:
    """Per-layer selection and norms of every ``ffn_embed`` (DEHVF / MemVP) memory of ``model`` on ``batch``.

    The read ``s SiLU(x K^T) V`` is recomputed from the FFN input the injector saw and the memory it cached
    for the context; the FFN's own output is what the hooked ``mlp`` returned minus that read. With
    ``shift`` > 0 the batch runs again with ``pixel_values`` rolled by ``shift`` rows (each prompt seeing
    another row's image): a read that barely changes carries little of the image, whatever its norm.
    """
    from mllm.injection.ffn_embed import FFNEmbedInjector

    injectors = [inj for inj in model.injectors if isinstance(inj, FFNEmbedInjector)]
    seen = _ffn_reads(model, injectors, batch)
    other = _ffn_reads(model, injectors, {**batch, "pixel_values": batch["pixel_values"].roll(shift, 0)}) if shift else None
    mask = batch["attention_mask"]
    reports = []
    for (j, i), got in seen.items():
        keys, _, beta = got["memory"]
        read = got["read"]
        change = None if other is None else _mean_norm(read - other[(j, i)]["read"], mask) / max(_mean_norm(read, mask), 1e-12)
        reports.append(FFNLayerReport(
            layer=i, selection=[float(b) for b in beta.float().mean(0)],
            ffn_out=_mean_norm(got["out"] - read.to(got["out"].dtype), mask), memory_read=_mean_norm(read, mask),
            key_norm=float(keys.float().norm(dim=-1).mean()), image_dependence=change,
        ))
    return reports


@dataclass(frozen=True)
class RouterStageReport:
    layer: int  # the decoder layer after which this stage pools
    probs: list[list[float]]  # [row][expert] router probabilities p
    tokens_in: list[int]  # [row] visual tokens entering the stage
    tokens_out: list[int]  # [row] visual tokens leaving it
    skip_below: int  # rows with fewer visual tokens are not pooled (the injector's ``skip_below``)

    @property
    def chosen(self) -> list[int | None]:
        """Per row, the expert the eval forward used (``argmax p``), ``None`` where the row was not pooled."""
        return [max(range(len(p)), key=p.__getitem__) if n_in >= self.skip_below else None
                for p, n_in in zip(self.probs, self.tokens_in, strict=True)]

    @property
    def scale(self) -> list[float | None]:
        """Per pooled row, ``p_k`` of the chosen expert: the factor the pooled visual tokens are multiplied by."""
        return [None if k is None else p[k] for p, k in zip(self.probs, self.chosen, strict=True)]


def router_report(model: nn.Module, batch: Mapping[str, Any]) -> list[RouterStageReport]:
    """Per stage of every ``pyramid`` (DPN) injector of ``model`` in eval mode on ``batch``: the routers'
    probabilities per row, and the visual tokens entering and leaving the stage."""
    from mllm.injection.pyramid import PyramidInjector

    injectors = [inj for inj in model.injectors if isinstance(inj, PyramidInjector)]
    seen: dict[tuple[int, int], torch.Tensor] = {}
    handles = [inj.routers[str(p)].register_forward_hook(
        lambda _m, _a, out, _k=(j, p): seen.__setitem__(_k, out.detach().float()))
        for j, inj in enumerate(injectors) for p in inj.pool_layers]
    _forward(model, batch, handles)
    return [RouterStageReport(layer=p, probs=seen[(j, p)].tolist(), tokens_in=inj.last_visual_tokens[s],
                              tokens_out=inj.last_visual_tokens[s + 1], skip_below=inj.cfg.skip_below)
            for j, inj in enumerate(injectors) for s, p in enumerate(inj.pool_layers)]
