"""LLM-side fusion: injectors hook the decoder layers of any Hugging Face decoder-only causal LM.

LLM-side injection: visual context reaches the LLM *inside* its decoder layers instead of (or
besides) as spliced tokens. An injector never forks model code and never replaces a module, so the
LLM's ``state_dict``, checkpoints and merges are untouched; it registers PyTorch hooks
(``register_forward_pre_hook`` / ``register_forward_hook``) on the layers it finds generically in
``llm.get_decoder().layers`` (Llama, Qwen2/3, Mistral, Gemma, Phi all expose that list).

Lifecycle. ``MLLM`` builds each injector from its config and an :class:`InjectionSpec`, calls
:meth:`Injector.attach` once, and wraps every LLM call in :func:`inject` with a
:class:`VisualContext` (one training forward, or one whole ``generate`` call). Outside a context
every hook is a no-op: the LLM behaves exactly as the plain model.

KV cache. Whatever an injector derives from the visual context (cross-attention keys/values, FFN
memories, pyramid layouts) is computed once, on the first LLM call of the context (the prefill),
kept in :attr:`Injector.state`, reused by every cached decoding step, and dropped when the context
closes. Beam search / ``num_return_sequences > 1`` (which re-batch the prompt) are refused.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from common.errors import UserError
from common.layers import resolve_layers

NEEDS = ("tokens", "layers", "splice")  # what an injector may ask the MLLM for


class InjectionError(UserError, ValueError):
    """An injector cannot be attached or fed as configured; the message names the field."""


@dataclass(frozen=True)
class InjectionSpec:
    """Sizes an injector is built with (known before any forward)."""

    hidden_size: int  # d, the LLM width
    num_layers: int  # L, decoder layers
    num_visual_tokens: int  # projector outputs per image (M)
    visual_grid: tuple[int, int] | None  # their (rows, cols) raster layout, None when not a grid
    encoder_layers: tuple[int, ...]  # tapped encoder layers, in config order
    encoder_dim: int  # width d_v of one tapped encoder layer


@dataclass
class VisualContext:
    """What one LLM call (or one generate call) knows about its images; rows = batch rows."""

    attention_mask: torch.Tensor  # [B, T] 1 = real token (of the sequence the context opened with)
    query_mask: torch.Tensor  # [B, T] the prompt tokens a per-sample query may read (never the answer)
    image_mask: torch.Tensor | None = None  # [B, T] spliced visual-token slots
    tokens: torch.Tensor | None = None  # [B, M, d] projected visual tokens
    layers: Mapping[int, torch.Tensor] | None = None  # encoder layer -> [B, N, d_v]
    project: Callable[[torch.Tensor], torch.Tensor] | None = None  # the MLLM projector, [B, N, d_v] -> [B, M, d]

    @property
    def batch(self) -> int:
        return int(self.attention_mask.shape[0])


class Injector(nn.Module):
    """Base class: subclasses set ``config_cls`` and ``needs`` and implement :meth:`attach`."""

    config_cls: ClassVar[type]
    needs: ClassVar[frozenset[str]] = frozenset()  # subset of NEEDS

    def __init__(self) -> None:
        super().__init__()
        self._ctx: VisualContext | None = None
        self._state: dict[Any, Any] = {}
        self._handles: list[Any] = []

    # --- context ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def use(self, ctx: VisualContext) -> Iterator[None]:
        """Make ``ctx`` visible to the hooks; everything derived from it is dropped on exit."""
        if self._ctx is not None:
            raise InjectionError(f"{type(self).__name__}: a visual context is already open (nested LLM calls)")
        self._ctx, self._state = ctx, {}
        try:
            yield
        finally:
            self._ctx, self._state = None, {}

    @property
    def context(self) -> VisualContext | None:
        return self._ctx

    @property
    def state(self) -> dict[Any, Any]:
        """Per-context scratch space (prefill results reused by decoding steps)."""
        return self._state

    def check_batch(self, hidden: torch.Tensor) -> VisualContext:
        ctx = self._ctx
        assert ctx is not None
        if hidden.shape[0] != ctx.batch:
            raise InjectionError(
                f"{type(self).__name__}: the LLM runs {hidden.shape[0]} rows for {ctx.batch} images; "
                "beam search and num_return_sequences > 1 are not supported with injectors"
            )
        return ctx

    # --- hooks --------------------------------------------------------------------------------
    def attach(self, llm: nn.Module) -> None:
        raise NotImplementedError

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def aux_loss(self) -> torch.Tensor | None:
        """An extra training loss from the current context (added to the LM loss), if any."""
        return None


@contextlib.contextmanager
def inject(injectors: Sequence[Injector], ctx: VisualContext | None) -> Iterator[None]:
    """Open ``ctx`` on every injector for the duration of one LLM call (or one generate call);
    ``ctx`` may be ``None`` only when there are no injectors."""
    if injectors and ctx is None:
        raise InjectionError("injectors need a visual context for this LLM call")
    with contextlib.ExitStack() as stack:
        for injector in injectors:
            stack.enter_context(injector.use(ctx))
        yield


def check_needs(needs: Sequence[tuple[str, frozenset[str]]], splice: bool) -> None:
    """Reject injector combinations the data path cannot feed (``needs`` = ``[(where, needs)]``)."""
    wants_tokens = [w for w, n in needs if "tokens" in n]
    for where, need in needs:
        if "splice" in need and not splice:
            raise InjectionError(f"{where}: works on spliced visual tokens; set model.splice: true")
        if "layers" in need and (splice or wants_tokens):
            other = "model.splice is true" if splice else f"{wants_tokens[0]} needs projected tokens"
            raise InjectionError(
                f"{where}: projects single encoder layers with the model's projector, but {other}; "
                "use it with model.splice: false and no token-consuming injector"
            )


def build_injectors(parts: Sequence[Any], spec: InjectionSpec, llm: nn.Module) -> list[Injector]:
    """``model.injectors`` (registry-named parts) built from ``spec`` and attached to ``llm``, in order."""
    from mllm.registry import INJECTORS

    built = []
    for i, part in enumerate(parts):
        try:
            injector = INJECTORS.build(part.name, part.cfg, spec=spec)
            injector.attach(llm)
        except InjectionError as err:
            raise InjectionError(f"model.injectors[{i}]: {err}") from err
        built.append(injector)
    return built


def visual_grid(encoder: Any, projector: Any, num_tokens: int) -> tuple[int, int] | None:
    """The (rows, cols) raster of the projector's ``num_tokens`` outputs, or ``None`` when they form none:
    the projector's ``output_grid`` if it has one, else the encoder's patch grid if the count is kept."""
    try:
        rows, cols = encoder.grid_size
    except NotImplementedError:
        return None
    grid_fn = getattr(projector, "output_grid", None)
    if callable(grid_fn):
        return tuple(grid_fn((rows, cols)))
    return (int(rows), int(cols)) if rows * cols == num_tokens else None


# --- finding and hooking decoder layers -----------------------------------------------------
def decoder_of(llm: nn.Module) -> nn.Module:
    """The decoder stack (``LlamaModel``, ``Qwen2Model``, ...) of a causal LM, found generically."""
    getter = getattr(llm, "get_decoder", None)
    decoder = getter() if callable(getter) else getattr(llm, "model", None)
    if decoder is None or not isinstance(getattr(decoder, "layers", None), nn.ModuleList):
        raise InjectionError(
            f"{type(llm).__name__}: no decoder layer list found (expected llm.get_decoder().layers, "
            "as in Llama, Qwen, Mistral, Gemma and Phi models)"
        )
    return decoder


def decoder_layers(llm: nn.Module) -> nn.ModuleList:
    return decoder_of(llm).layers


def resolve_llm_layers(layers: Sequence[int], num_layers: int, where: str) -> list[int]:
    """Sorted, de-duplicated 0-based decoder-layer indices; negative counts from the end
    (:func:`common.layers.resolve_layers` with ``unique``); out of range or none is an InjectionError."""
    return resolve_layers(layers, num_layers, where, stack="layer LLM", unique=True, error=InjectionError)


def every_kth(every: int, num_layers: int, where: str) -> list[int]:
    """OpenFlamingo's ``cross_attn_every_n_layers``: layers ``i`` with ``(i + 1) % every == 0``."""
    if not 1 <= every <= num_layers:
        raise InjectionError(f"{where}: expected 1 <= every <= {num_layers}, got {every}")
    return [i for i in range(num_layers) if (i + 1) % every == 0]


def get_hidden(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    """A decoder layer's input hidden states, passed positionally or as ``hidden_states``."""
    return args[0] if args else kwargs["hidden_states"]


def set_hidden(
    args: tuple[Any, ...], kwargs: dict[str, Any], hidden: torch.Tensor
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def get_output(output: Any) -> torch.Tensor:
    """A layer's output hidden states (transformers 5 returns a tensor, older versions a tuple)."""
    return output[0] if isinstance(output, tuple) else output


def set_output(output: Any, hidden: torch.Tensor) -> Any:
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[B, T, D]`` averaged over the tokens where ``mask`` ``[B, T]`` is set -> ``[B, D]``."""
    weights = mask.to(x.dtype).unsqueeze(-1)
    return (x * weights).sum(1) / weights.sum(1).clamp_min(1.0)
