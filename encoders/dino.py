"""Any timm Vision Transformer (ViT, DeiT, DINOv2 with or without registers) as a vision encoder.

The tower is built with ``timm.create_model(model_name, pretrained=False, num_classes=0, ...)`` and
optional architecture overrides, so one class covers ``vit_tiny_patch16_224``,
``vit_small_patch14_dinov2``, ``vit_small_patch14_reg4_dinov2`` and tiny random test towers alike.
Features are read with timm's own ``forward_intermediates``: tapped block ``l`` returns
``Z_l = Block_l(...Block_1(PatchEmbed(x) + pos))`` without the final norm by default, the
"penultimate-layer" features of LLaVA / prismatic (``get_intermediate_layers``) — set ``norm`` to
apply the tower's final LayerNorm (then the last layer equals ``forward_features``).
Weights come only from a local file, passed through timm's own ``checkpoint_filter_fn`` so original
DINOv2 checkpoints are converted and position embeddings resampled to ``image_size``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from encoders.base import EncoderError, VisionEncoder, freeze, resolve_layers
from encoders.conv_stem import ConvStemEmbed, check_stem


@dataclass
class TimmViTConfig:
    model_name: str = "vit_tiny_patch16_224"  # any timm VisionTransformer name
    image_size: int = 64  # square input side in pixels
    patch_size: int | None = None  # None = the model name's own patch size
    embed_dim: int | None = None  # None = the model name's own width
    depth: int | None = None  # None = the model name's own number of blocks
    num_heads: int | None = None
    layers: list[int] = field(default_factory=lambda: [-1])  # blocks to tap; negative = from the end
    drop_prefix: bool = True  # drop CLS / register tokens, keep only patch tokens
    norm: bool = False  # apply the final LayerNorm to tapped layers
    stem: str = "patch"  # patch (one linear patchify) | conv (Xiao et al. 2021 conv stem, random init only)
    stem_width: int | None = None  # conv stem: first conv's channels, doubling up to the width (paper's ViT-B: 64)
    weights: str | None = None  # local .safetensors / .pth / .bin file (timm or original DINOv2 keys)
    frozen: bool = False

    def __post_init__(self) -> None:
        if self.image_size <= 0:
            raise EncoderError(f"image_size: expected a positive integer, got {self.image_size}")
        if not self.layers:
            raise EncoderError("layers: tap at least one block")
        check_stem(self.stem, self.stem_width, self.weights)


class TimmViTEncoder(VisionEncoder):
    """A timm ViT returning ``{block index: tokens [B, N, D]}`` for the configured blocks."""

    config_cls = TimmViTConfig

    def __init__(self, cfg: TimmViTConfig) -> None:
        super().__init__()
        import timm
        from timm.models.vision_transformer import VisionTransformer

        self.cfg = cfg
        overrides: dict[str, Any] = {
            key: getattr(cfg, key)
            for key in ("patch_size", "embed_dim", "depth", "num_heads")
            if getattr(cfg, key) is not None
        }
        try:
            if cfg.stem == "conv":
                overrides["embed_layer"] = partial(ConvStemEmbed, first_width=cfg.stem_width)
            model = timm.create_model(
                cfg.model_name, pretrained=False, num_classes=0, img_size=cfg.image_size, **overrides
            )
        except RuntimeError as err:  # timm raises RuntimeError for unknown model names
            raise EncoderError(f"model_name: {err}") from err
        if not isinstance(model, VisionTransformer):
            raise EncoderError(
                f"model_name: {cfg.model_name!r} is a {type(model).__name__}, expected a timm VisionTransformer"
            )
        patch = model.patch_embed.patch_size
        if cfg.image_size % patch[0] or cfg.image_size % patch[1]:
            raise EncoderError(f"image_size: {cfg.image_size} is not a multiple of the patch size {patch}")
        self.model = model
        self.layers = resolve_layers(cfg.layers, len(model.blocks), where="layers")
        if cfg.weights is not None:
            self._load_weights(cfg.weights)
        if cfg.frozen:
            freeze(self)
        self._transform = self._build_transform()

    def _load_weights(self, path: str) -> None:
        from timm.models import load_checkpoint
        from timm.models.vision_transformer import checkpoint_filter_fn

        if not Path(path).is_file():
            raise EncoderError(f"weights: file {path} does not exist")
        try:
            result = load_checkpoint(self.model, path, strict=False, filter_fn=checkpoint_filter_fn)
        except RuntimeError as err:  # tensor shape mismatches are raised even with strict=False
            raise EncoderError(f"weights: {path} does not match {self.cfg.model_name}: {err}") from err
        # num_classes=0 removed the classifier, so a checkpoint's head is expected to go unused.
        unexpected = [k for k in result.unexpected_keys if not k.startswith("head.")]
        if result.missing_keys or unexpected:
            raise EncoderError(
                f"weights: {path} does not match {self.cfg.model_name}: "
                f"missing {result.missing_keys[:3]}, unexpected {unexpected[:3]}"
            )

    def _build_transform(self) -> Any:
        from timm.data import create_transform, resolve_model_data_config

        # crop_pct 1 + squash: resize the whole image to image_size and never crop, so box
        # coordinates given relative to the image stay valid for the pixels the model sees.
        data_cfg = resolve_model_data_config(self.model)
        data_cfg.update(input_size=(3, self.cfg.image_size, self.cfg.image_size), crop_pct=1.0, crop_mode="squash")
        return create_transform(**data_cfg, is_training=False)

    @property
    def embed_dim(self) -> int:
        return int(self.model.embed_dim)

    @property
    def grid_size(self) -> tuple[int, int]:
        rows, cols = self.model.patch_embed.grid_size
        return int(rows), int(cols)

    @property
    def num_patches(self) -> int:
        rows, cols = self.grid_size
        return rows * cols + (0 if self.cfg.drop_prefix else int(self.model.num_prefix_tokens))

    @property
    def image_size(self) -> tuple[int, int]:
        return self.cfg.image_size, self.cfg.image_size

    @property
    def fsdp_unit(self) -> type[nn.Module]:
        return type(self.model.blocks[0])

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        return self._transform(image.convert("RGB"))

    def forward(self, pixels: torch.Tensor) -> dict[int, torch.Tensor]:
        taps = sorted(set(self.layers))
        outs = self.model.forward_intermediates(
            pixels,
            indices=taps,
            norm=self.cfg.norm,
            stop_early=True,
            output_fmt="NLC",
            intermediates_only=True,
            return_prefix_tokens=not self.cfg.drop_prefix,
        )
        if not self.cfg.drop_prefix and self.model.num_prefix_tokens:
            outs = [torch.cat([prefix, patches], dim=1) for patches, prefix in outs]
        by_layer = dict(zip(taps, outs, strict=True))
        return {layer: by_layer[layer] for layer in self.layers}
