"""Per-layer visual attention share of an MLLM: the data behind FRANK's prior.

FRANK (Wei & Chen, 2025, arXiv 2505.16151, §3.2.3 and Appendix A.9). For each decoder layer l, over
a probe set of image + text rows:

    a_l = mean over rows x, heads h and text queries q of  A_vis(x,h,q) / (A_vis(x,h,q) + A_txt(x,h,q))

A_vis = attention probability that query q puts on the image-token keys, A_txt = on the other
attended (text) keys. The paper does not say which text queries; we take every attended text token
after the first image token (tokens before it cannot see the image under causal attention) --
inferred, recorded in the JSON as ``queries``. Attention probabilities need the eager kernel, so the
LLM is switched to ``eager`` for the probe and back afterwards.

:func:`run_probe` writes ``probe.json`` (``visual_share`` per layer -- what FRANK's ``prior`` reads --,
the OLS decay fit a_l ~ C e^(-alpha l) of Eq. 40-44, and the resulting w_V under both normalisations)
and ``probe.png``. This module takes a built model and ready batches (``input_ids``,
``attention_mask``, ``pixel_values``, e.g. from ``train.data.collate.Collator``): merging never
imports ``train/``; the ``mllm probe`` command assembles both.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from common.atomic import atomic_write
from common.errors import UserError
from mllm.merge.methods.frank import fit_decay, prior_weights

PROBE_JSON = "probe.json"
PROBE_PNG = "probe.png"
QUERIES = "attended text tokens after the first image token"


class ProbeError(UserError, ValueError):
    """The model or the probe batches cannot be probed; the message says what is expected."""


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
    out = []
    for probs in attentions:
        p = probs.float()
        vis = (p * image_mask[:, None, None, :]).sum(-1)  # [B, H, T]
        txt = (p * text[:, None, None, :]).sum(-1)
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


@torch.no_grad()
def visual_attention_share(model: Any, batches: Iterable[Mapping[str, torch.Tensor]]) -> tuple[list[float], int]:
    """``(a_l for each decoder layer, rows probed)`` of an MLLM over ``batches``.

    ``model`` is an :class:`mllm.model.MLLM` (used through ``forward``, ``image_token_id``,
    ``num_image_tokens`` and ``llm``) whose visual tokens are spliced into the sequence.
    """
    if getattr(model, "num_image_tokens", 0) == 0:
        raise ProbeError("the model splices no visual tokens into the sequence (model.splice: false): "
                         "there is no attention on visual tokens to measure")
    was_training = model.training
    model.eval()
    total: torch.Tensor | None = None
    rows = 0
    try:
        with eager_attention(model.llm):
            for batch in batches:
                ids, mask = batch["input_ids"], batch["attention_mask"]
                out = model(input_ids=ids, attention_mask=mask, pixel_values=batch["pixel_values"],
                            output_attentions=True)
                shares = layer_shares(out.attentions, mask.to(ids.device), ids == model.image_token_id)
                total = shares.sum(dim=1) if total is None else total + shares.sum(dim=1)
                rows += ids.shape[0]
    finally:
        model.train(was_training)
    if total is None:
        raise ProbeError("the probe set is empty")
    return (total / rows).tolist(), rows


def run_probe(model: Any, batches: Iterable[Mapping[str, torch.Tensor]], out_dir: str | Path,
              source: str = "") -> dict[str, Any]:
    """Probe ``model`` over ``batches``; write ``probe.json`` and ``probe.png`` into ``out_dir``."""
    share, rows = visual_attention_share(model, batches)
    doc: dict[str, Any] = {"visual_share": share, "num_samples": rows, "queries": QUERIES, "source": source}
    try:
        alpha, c = fit_decay(share)
        doc["fit"] = {"alpha": alpha, "C": c}
        doc["w_V"] = {norm: prior_weights(alpha, len(share), norm) for norm in ("sum", "max")}
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
