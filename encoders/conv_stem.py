"""A convolutional stem for ViTs (and DaViT's first stage): "Early Convolutions Help Transformers See Better".

Xiao et al. (2021) replace the ViT's patchify — one ``p x p`` stride-``p`` convolution — by a stack of
``log2 p`` 3x3 stride-2 convolutions, each followed by BatchNorm and ReLU, and a final 1x1
convolution to the embedding width: ``E(x) = W_1x1 * ReLU(BN(W_k * ... ReLU(BN(W_1 * x))))``. The
token grid is the same (one token per ``p x p`` patch), but the stem sees overlapping 3x3
neighbourhoods with the translation equivariance of a CNN, which the paper shows makes optimisation
faster and less sensitive to the learning rate. Widths double per stage from ``first_width`` and
stop growing at ``embed_dim``; the paper's ViT-B/16 stem is ``first_width = 64``: 64, 128, 256, 512,
then the 1x1 to 768. Without ``first_width`` they double from ``embed_dim / 2^(k-1)`` up to ``embed_dim``.

:func:`conv_stem` builds the stack; :class:`ConvStemEmbed` is the drop-in ``embed_layer`` for timm's
``VisionTransformer`` (timm's own :class:`PatchEmbed` keeps the sizes, flattening and checks; only
its projection is replaced), open_clip's ViT takes it in place of its ``conv1`` patchify
(:mod:`encoders.clip`), and Florence-2's DaViT in place of its stage-1 ``7x7`` stride-4 conv embed
(:mod:`encoders.florence`).
"""

from __future__ import annotations

from typing import Any

import torch
from timm.layers import PatchEmbed
from torch import nn

from encoders.base import EncoderError

STEMS = ("patch", "conv")


def check_stem(stem: str, stem_width: int | None, weights: str | None) -> None:
    """Validate a tower config's ``stem`` / ``stem_width`` (``ValueError`` naming the field)."""
    if stem not in STEMS:
        raise EncoderError(f"stem: expected {' or '.join(STEMS)}, got {stem!r}")
    if stem_width is not None and stem != "conv":
        raise EncoderError(f"stem_width: sets the conv stem's channels; this encoder has stem: {stem}")
    if stem == "conv" and weights is not None:
        raise EncoderError("stem: a conv stem has no pretrained weights; use stem: patch with weights")


class ConvStem(nn.Sequential):
    """The stem's layers, with the first convolution's ``weight`` exposed as the patchify's was: models that
    read their patch embedding's dtype from ``conv.weight`` (transformers' Florence-2 DaViT) keep working."""

    @property
    def weight(self) -> torch.Tensor:
        return self[0].weight


def conv_stem(patch: tuple[int, int], embed_dim: int, in_chans: int = 3, first_width: int | None = None) -> ConvStem:
    """The ``log2 p`` 3x3 stride-2 Conv-BN-ReLU stages and the 1x1 projection: ``[B, C, H, W] -> [B, D, H/p, W/p]``."""
    side = patch[0]
    if patch[0] != patch[1] or side < 2 or side & (side - 1):
        raise EncoderError(f"stem: a conv stem needs a square power-of-two patch size, got {patch}")
    depth = side.bit_length() - 1  # log2 p stride-2 convolutions
    if first_width is None:
        widths = [max(8, embed_dim >> (depth - 1 - i)) for i in range(depth)]
    elif first_width < 1:
        raise EncoderError(f"stem_width: expected a positive number of channels, got {first_width}")
    else:
        widths = [min(embed_dim, first_width << i) for i in range(depth)]
    layers: list[nn.Module] = []
    for c_in, c_out in zip([in_chans, *widths[:-1]], widths, strict=True):
        layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
    layers.append(nn.Conv2d(widths[-1], embed_dim, 1))
    return ConvStem(*layers)


class ConvStemEmbed(PatchEmbed):
    """timm ``PatchEmbed`` whose ``proj`` is the 3x3 stride-2 conv stack plus a 1x1 projection."""

    def __init__(
        self, patch_size: int = 16, embed_dim: int = 768, in_chans: int = 3, first_width: int | None = None, **kwargs: Any
    ) -> None:
        super().__init__(patch_size=patch_size, embed_dim=embed_dim, in_chans=in_chans, **kwargs)
        self.proj = conv_stem(self.patch_size, embed_dim, in_chans, first_width)
