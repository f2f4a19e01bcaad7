"""The vision-encoder interface every tower (and every fused set of towers) implements.

``forward(pixels [B, 3, H, W]) -> {layer index: tokens [B, N, D]}`` for the layers the config taps
(negative indices count from the last block, as in Python), plus the properties callers size
things by: ``embed_dim``, ``num_patches``, ``grid_size``, ``image_size``, ``preprocess`` and
``fsdp_unit``. Shape contracts are asserted when the encoder is built, not mid-forward.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from common import layers as common_layers
from common.errors import UserError


class EncoderError(UserError, ValueError):
    """Bad encoder input: a weights path that does not exist, a layer index out of range, ..."""


class VisionEncoder(nn.Module):
    """Base class: subclasses set ``layers`` (resolved, non-negative) and implement ``forward``."""

    config_cls: type
    layers: list[int]
    frozen: bool = False  # subclasses that froze their weights set this: they then stay in eval mode

    def train(self, mode: bool = True) -> VisionEncoder:
        """A frozen encoder ignores ``train()``: no dropout / drop-path / batch-norm updates."""
        return super().train(mode and not self.frozen)

    @property
    def embed_dim(self) -> int:  # width D of every returned layer
        raise NotImplementedError

    @property
    def layer_dims(self) -> dict[int, int]:
        """Width of each returned layer; towers whose stages differ in width override it."""
        return {layer: self.embed_dim for layer in self.layers}

    @property
    def grid_size(self) -> tuple[int, int]:  # patch grid (rows, cols) of the returned tokens
        raise NotImplementedError

    @property
    def num_patches(self) -> int:
        """Tokens N per returned layer (patch tokens, plus prefix tokens when they are kept)."""
        raise NotImplementedError

    @property
    def image_size(self) -> tuple[int, int]:
        raise NotImplementedError

    @property
    def fsdp_unit(self) -> type[nn.Module]:
        """The block class FSDP should wrap."""
        raise NotImplementedError

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """One PIL image -> float tensor [3, H, W], with the library's own transform."""
        raise NotImplementedError

    def forward(self, pixels: torch.Tensor) -> dict[int, torch.Tensor]:
        raise NotImplementedError


def resolve_layers(layers: Sequence[int], depth: int, where: str = "layers") -> list[int]:
    """Possibly-negative block indices -> ``0..depth-1`` in config order (:func:`common.layers.resolve_layers`);
    out of range or none is an EncoderError."""
    return common_layers.resolve_layers(layers, depth, where, stack="block encoder", error=EncoderError)


def load_state_file(model: nn.Module, path: str | None, where: str = "weights") -> None:
    """Load a local ``.safetensors`` (or a ``.bin``/``.pth`` with ``weights_only=True``) into ``model``."""
    if path is None:
        return
    file = Path(path)
    if not file.is_file():
        raise EncoderError(f"{where}: weights file {file} does not exist")
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(file))
    else:
        state = torch.load(file, map_location="cpu", weights_only=True)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise EncoderError(
            f"{where}: {file} does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )


def freeze(module: nn.Module) -> None:
    for param in module.parameters():
        param.requires_grad_(False)


PreprocessFn = Callable[[Image.Image], torch.Tensor]
