"""Per-layer visual attention share of an MLLM: the data behind FRANK's prior.

FRANK (Wei & Chen, 2025, arXiv 2505.16151, §3.2.3 and Appendix A.9). For each decoder layer l of the
language model, over a probe set of image + text rows:

    a_l = mean over rows x, heads h and text queries q of  A_vis(x,h,q) / (A_vis(x,h,q) + A_txt(x,h,q))

A_vis = attention probability that query q puts on the visual keys, A_txt = on the other attended
(text) keys. Visual keys are the tokens equal to the model's image-token id (``config.image_token_id``
/ ``image_token_index`` of a transformers MLLM, the ``<image>`` slots of ours): where a processor wraps
an image in further tokens -- Gemma 3's ``<start_of_image>`` / ``<end_of_image>``, Idefics3 / SmolVLM's
``<fake_token_around_image>`` and ``<global-img>``, Qwen-VL's ``<|vision_start|>`` / ``<|vision_end|>``,
InternVL's ``<img>`` / ``</img>`` -- those carry no pixels and count as text. The paper does not say
which text queries; we take every attended text token after the first image token (tokens before it
cannot see the image under causal attention) -- inferred, recorded in the JSON as ``queries``. Padded
keys are masked out of the softmax, so left padding leaves every row's shares as they are alone.

Attention probabilities need the eager kernel: the language model alone is switched to ``eager`` for
the probe and back afterwards (a vision tower keeps its kernel). Each decoder layer's probabilities
``[B, H, T, T]`` are read where transformers records them for ``outputs.attentions`` -- the second
output of the attention modules its ``_can_record_outputs`` names, one per layer in the language model
only -- by a forward hook that reduces them to the layer's per-row shares and drops them, so one
layer's probabilities are alive at a time instead of all L layers' (``output_attentions=True`` would
hold L x B x H x T^2 values: tens of GB for the thousands of visual tokens of tiled images).

:func:`run_probe` writes ``probe.json`` (``visual_share`` per layer -- what FRANK's ``prior`` reads --,
the OLS decay fit a_l ~ C e^(-alpha l) of Eq. 40-44, the resulting w_V under each ``prior_norm`` (sum, max, share), and
the protocol its caller records) and ``probe.png``. This module takes a built model and ready batches
(ours: ``input_ids``, ``attention_mask``, ``pixel_values``, e.g. from ``train.data.collate.Collator``;
a transformers MLLM: its processor's batch, :meth:`mllm.hf_native.NativeMLLM.inputs`): merging never
imports ``train/``; the ``mllm probe`` command assembles both.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

import torch
from PIL import Image

from common.atomic import atomic_write
from common.errors import UserError
from mllm.merge.methods.frank import fit_decay, prior_weights

PROBE_JSON = "probe.json"
PROBE_PNG = "probe.png"
QUERIES = "attended text tokens after the first image token"
# The paper probes ~1000 MSCOCO val images but does not publish its prompt: a generic request.
DEFAULT_PROMPT = "Describe this image in detail."
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class ProbeError(UserError, ValueError):
    """The model or the probe batches cannot be probed; the message says what is expected."""


def image_files(folder: Path, limit: int | None = None) -> list[Path]:
    """The first ``limit`` image files of ``folder`` by name (suffixes :data:`IMAGE_SUFFIXES`, any case),
    each decoded once here, so that an unreadable one is refused, named, before a model loads."""
    if not folder.is_dir():
        raise ProbeError(f"{folder}: --images: expected a folder of image files")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())[:limit]
    if not files:
        raise ProbeError(f"{folder}: no image files ({', '.join(IMAGE_SUFFIXES)})")
    for path in files:
        try:
            with Image.open(path) as img:
                img.load()
        except (OSError, ValueError, SyntaxError) as err:  # PIL raises SyntaxError for some broken files
            raise ProbeError(f"{path}: cannot read the image: {err}") from err
    return files


class AttentionModel(Protocol):
    """What the probe reads of a model: ours (:class:`mllm.model.MLLM`) or a transformers MLLM
    (:class:`mllm.hf_native.NativeMLLM`). Called on a batch's keys, it runs its forward."""

    image_token_id: int

    @property
    def llm(self) -> Any:
        """The language model (a transformers ``PreTrainedModel``), switched to eager while probing."""

    def eval(self) -> Any: ...

    def __call__(self, **batch: Any) -> Any: ...


def layer_shares(attentions: Sequence[torch.Tensor], attention_mask: torch.Tensor,
                 image_mask: torch.Tensor) -> torch.Tensor:
    """``[L, B]`` visual shares from per-layer attention probabilities ``[B, H, T, T]``.

    Per row: the mean over heads and query positions (attended text tokens after the first image
    token) of vis / (vis + txt), where vis / txt sum the probabilities on image / other attended keys.
    """
    attended = attention_mask.bool()
    text = attended & ~image_mask
    after_image = image_mask.long().cumsum(dim=1) > 0
    queries = (text & after_image).float()  # [B, T]
    if (queries.sum(dim=1) == 0).any():
        row = int((queries.sum(dim=1) == 0).nonzero()[0])
        raise ProbeError(f"probe row {row} has no image token followed by text: nothing to measure")
    keys = torch.stack([image_mask, text], dim=-1).float()[:, None]  # [B, 1, T, 2]
    out = []
    for probs in attentions:
        vis, txt = (probs.float() @ keys).unbind(-1)  # [B, H, T] each: mass on image / text keys
        share = (vis / (vis + txt).clamp_min(1e-12)).mean(dim=1)  # [B, T], mean over heads
        out.append((share * queries).sum(dim=1) / queries.sum(dim=1))
    return torch.stack(out)


@contextmanager
def eager_attention(llm: Any) -> Iterator[None]:
    """Switch a transformers model to eager attention (which returns probabilities), then back."""
    before = llm.config._attn_implementation
    if before != "eager":
        llm.set_attn_implementation("eager")
    try:
        yield
    finally:
        if before != "eager":
            llm.set_attn_implementation(before)


class _LayerShares:
    """Forward hooks on the language model's attention modules (in layer order): each call's probabilities
    become ``[B]`` shares (:func:`layer_shares`) of the current batch and leave the module's output."""

    def __init__(self, llm: Any) -> None:
        spec = (getattr(llm, "_can_record_outputs", None) or {}).get("attentions")
        if not isinstance(spec, type):  # a recorder keyed by name or index: not met in the families tested
            raise ProbeError(f"{type(llm).__name__}: its attention modules are not named by a class "
                             f"({spec!r}); the probe cannot find them")
        self.modules = [m for m in llm.modules() if isinstance(m, spec)]
        self.layers = llm.config.get_text_config().num_hidden_layers
        if len(self.modules) != self.layers:
            raise ProbeError(f"{type(llm).__name__}: {len(self.modules)} {spec.__name__} modules for "
                             f"{self.layers} decoder layers; expected one per layer")
        self.masks: tuple[torch.Tensor, torch.Tensor] | None = None
        self.shares: list[torch.Tensor] = []

    @contextmanager
    def hooked(self) -> Iterator[_LayerShares]:
        # prepend: ahead of transformers' own recording hook, which then sees no probabilities to keep
        handles = [m.register_forward_hook(self._hook, prepend=True) for m in self.modules]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def batch(self, attention_mask: torch.Tensor, image_mask: torch.Tensor) -> None:
        """The masks of the batch the next forward runs; its shares are collected afresh."""
        self.masks, self.shares = (attention_mask, image_mask), []

    def result(self) -> torch.Tensor:
        """``[L, B]``: the shares of the batch's forward, one row per decoder layer."""
        if len(self.shares) != self.layers:
            raise ProbeError(f"the forward ran {len(self.shares)} of the {self.layers} attention layers")
        return torch.stack(self.shares)

    def _hook(self, module: torch.nn.Module, args: Any, output: Any) -> Any:
        probs = output[1] if isinstance(output, tuple) and len(output) > 1 else None
        assert self.masks is not None, "batch() sets the masks before each forward"
        mask, image = self.masks
        if probs is None or tuple(probs.shape[-2:]) != (mask.shape[1], mask.shape[1]):
            got = "none" if probs is None else list(probs.shape)
            raise ProbeError(f"{type(module).__name__} of layer {len(self.shares)} gave attention probabilities "
                             f"{got}, expected [{mask.shape[0]}, heads, {mask.shape[1]}, {mask.shape[1]}] under eager")
        self.shares.append(layer_shares([probs], mask, image)[0])
        return (output[0], None, *output[2:])


@torch.no_grad()
def visual_attention_share(model: AttentionModel,
                           batches: Iterable[Mapping[str, torch.Tensor]]) -> tuple[list[float], int]:
    """``(a_l for each decoder layer, rows probed)`` of an MLLM over ``batches`` (see the module
    docstring); a model of ours must splice its visual tokens into the sequence."""
    if getattr(model, "num_image_tokens", None) == 0:  # ours with ``model.splice: false``
        raise ProbeError("the model splices no visual tokens into the sequence (model.splice: false): "
                         "there is no attention on visual tokens to measure")
    was_training = bool(getattr(model, "training", False))  # a NativeMLLM is always in eval mode
    model.eval()
    reader = _LayerShares(model.llm)
    total: torch.Tensor | None = None
    rows = 0
    try:
        with eager_attention(model.llm), reader.hooked():
            for batch in batches:
                ids = batch["input_ids"]
                reader.batch(batch["attention_mask"].to(ids.device), ids == model.image_token_id)
                # The hooks read the attentions: no labels (a conversation batch's), one logit column, no cache.
                model(**{key: value for key, value in batch.items() if key != "labels"}, use_cache=False,
                      logits_to_keep=1)
                shares = reader.result().sum(dim=1)
                total = shares if total is None else total + shares
                rows += ids.shape[0]
    finally:
        if was_training:
            model.train()
    if total is None:
        raise ProbeError("the probe set is empty")
    return (total / rows).tolist(), rows


def run_probe(model: AttentionModel, batches: Iterable[Mapping[str, torch.Tensor]], out_dir: str | Path,
              source: str = "", protocol: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Probe ``model`` over ``batches``; write ``probe.json`` and ``probe.png`` into ``out_dir``.

    ``protocol`` (what the caller knows: model folder, images, prompt, device, dtype) is recorded
    beside the shares and the image-token id that marked the visual keys."""
    share, rows = visual_attention_share(model, batches)
    doc: dict[str, Any] = {"visual_share": share, "num_samples": rows, "queries": QUERIES, "source": source,
                           "image_token_id": model.image_token_id, **(protocol or {})}
    try:
        alpha, c = fit_decay(share)
        doc["fit"] = {"alpha": alpha, "C": c}
        doc["w_V"] = {norm: prior_weights(alpha, len(share), norm, c) for norm in ("sum", "max", "share")}
    except ValueError as err:  # a zero share cannot be log-fitted; the shares are still reported
        doc["fit"] = {"error": str(err)}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / PROBE_JSON, json.dumps(doc, indent=2).encode())
    _plot(share, doc["fit"], out / PROBE_PNG)
    return doc


def _plot(share: list[float], fit: Mapping[str, float], path: Path) -> None:
    import io
    import math

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = list(range(1, len(share) + 1))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(layers, share, marker="o", label="visual attention share $a_l$")
    if "alpha" in fit:
        ax.plot(layers, [fit["C"] * math.exp(-fit["alpha"] * x) for x in layers], linestyle="--",
                label=rf"fit $C e^{{-\alpha l}}$, $\alpha$={fit['alpha']:.3f}")
    ax.set_xlabel("decoder layer $l$")
    ax.set_ylabel("share of text-query attention")
    ax.set_title("Attention on visual tokens per layer")
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write(path, buf.getvalue())
