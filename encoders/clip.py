"""open_clip image towers (CLIP ViT-B/L, SigLIP and ConvNeXt CLIP variants) as vision encoders.

The model is built by ``open_clip.create_model_and_transforms(model, pretrained=<local file>)``: its
``visual`` tower is kept, the text tower dropped, and the validation transform it returns is the
preprocessing. Features are read with open_clip's own ``visual.forward_intermediates``: tapped
block ``l`` returns ``Z_l = Block_l(...Block_1(LN_pre([x_cls; PatchEmbed(x)] + pos)))`` — the raw
residual stream, as LLaVA's ``mm_vision_select_layer`` reads it — or, with ``norm``, ``LN_post(Z_l)``
(then the CLS token of the last layer times ``proj`` is exactly ``visual(x)``). For timm-backed
towers (SigLIP, ConvNeXt) the intermediates are timm's, one per block (ViT) or per stage (ConvNeXt).

Weights come only from a local file (or an open_clip ``local-dir:`` folder); ``hf-hub:`` names and
pretrained tags are refused because they download. A tag may still be named in ``tag`` to take its
preprocessing (mean, std, interpolation, resize mode) from open_clip's table, which downloads nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from encoders.base import EncoderError, VisionEncoder, freeze, resolve_layers
from encoders.conv_stem import check_stem, conv_stem

PREPROCESS_KEYS = ("mean", "std", "interpolation", "resize_mode")


@dataclass
class OpenClipConfig:
    model: str = "ViT-B-32"  # open_clip architecture name (open_clip.list_models()) or "local-dir:<folder>"
    weights: str | None = None  # local CLIP checkpoint file (.safetensors/.bin/.pt/.npz); None = random init
    overrides: dict[str, Any] = field(default_factory=dict)  # model kwargs, e.g. a tiny vision_cfg / text_cfg
    image_size: int | None = None  # input size other than the architecture's (e.g. ConvNeXt at 768 px)
    tag: str | None = None  # pretrained tag whose preprocessing to use (e.g. openai, webli); no download
    preprocess: dict[str, Any] = field(default_factory=dict)  # overrides of mean / std / interpolation / resize_mode
    layers: list[int] = field(default_factory=lambda: [-1])  # blocks (ViT) or stages (ConvNeXt); negative = from end
    drop_prefix: bool = True  # drop the CLS token, keep only patch tokens
    norm: bool = False  # apply the tower's final norm (ln_post) to the tapped layers
    stem: str = "patch"  # patch (the ViT's conv1 patchify) | conv (Xiao et al. 2021 conv stem, random-init ViTs only)
    stem_width: int | None = None  # conv stem: first conv's channels, doubling up to the width
    frozen: bool = True

    def __post_init__(self) -> None:
        if self.model.startswith("hf-hub:"):
            raise EncoderError(f"model: {self.model!r} downloads from the hub; use a local-dir:<folder> or a file in weights")
        if self.image_size is not None and "vision_cfg" in self.overrides:
            # open_clip replaces the whole vision config by overrides.vision_cfg, size included
            raise EncoderError("image_size: with overrides.vision_cfg, set image_size inside vision_cfg")
        unknown = sorted(set(self.preprocess) - set(PREPROCESS_KEYS))
        if unknown:
            raise EncoderError(f"preprocess.{unknown[0]}: unknown key; expected some of {list(PREPROCESS_KEYS)}")
        # a local-dir: model carries its weights, which a conv stem would silently drop
        check_stem(self.stem, self.stem_width, self.weights or (self.model if self.model.startswith("local-dir:") else None))


class OpenClipEncoder(VisionEncoder):
    """open_clip's ``visual`` tower returning ``{layer: tokens [B, N, D]}`` for the tapped layers."""

    config_cls = OpenClipConfig

    def __init__(self, cfg: OpenClipConfig) -> None:
        super().__init__()
        import open_clip

        self.cfg = cfg
        model, _, self._transform = self._create(open_clip, cfg)
        self.visual: nn.Module = model.visual
        del model  # the text tower is not used
        if cfg.stem == "conv":
            self._use_conv_stem(cfg.stem_width)
        info = self._feature_info()
        self.layers = resolve_layers(cfg.layers, len(info), where="layers")
        dims = {info[layer][0] for layer in self.layers}
        grids = {info[layer][1] for layer in self.layers}
        if len(dims) > 1 or len(grids) > 1:
            raise EncoderError(
                f"layers: {cfg.layers} span stages of widths {sorted(dims)} and grids {sorted(grids)}; "
                "tap layers of one stage (or use two towers in a fused encoder)"
            )
        self._dim, self._grid = dims.pop(), grids.pop()
        if cfg.frozen:
            freeze(self)
            self.frozen = True
            self.eval()

    @staticmethod
    def _create(open_clip: Any, cfg: OpenClipConfig) -> tuple[Any, Any, Any]:
        if cfg.model.startswith("local-dir:") and not Path(cfg.model.removeprefix("local-dir:")).is_dir():
            raise EncoderError(f"model: folder {cfg.model.removeprefix('local-dir:')} does not exist")
        if cfg.weights is not None and not Path(cfg.weights).is_file():
            raise EncoderError(f"weights: file {cfg.weights} does not exist")
        pre: dict[str, Any] = {}
        if cfg.tag is not None:
            tag_cfg = open_clip.get_pretrained_cfg(cfg.model, cfg.tag)
            if not tag_cfg:
                raise EncoderError(f"tag: {cfg.tag!r} is not an open_clip pretrained tag of {cfg.model!r}")
            pre = {k: tag_cfg[k] for k in PREPROCESS_KEYS if k in tag_cfg}
        pre.update(cfg.preprocess)
        try:
            return open_clip.create_model_and_transforms(
                cfg.model,
                pretrained=cfg.weights,
                force_image_size=cfg.image_size,
                **{f"image_{k}": v for k, v in pre.items()},
                **cfg.overrides,
            )
        except RuntimeError as err:
            if cfg.weights is not None and "state_dict" in str(err):
                raise EncoderError(f"weights: {cfg.weights} does not match {cfg.model}: {err}") from err
            raise EncoderError(f"model: cannot build open_clip model {cfg.model!r}: {err}") from err
        except TypeError as err:  # open_clip's config dataclasses reject unknown override keys
            raise EncoderError(f"overrides: {err}") from err

    def _use_conv_stem(self, first_width: int | None) -> None:
        """Swap the ViT's ``conv1`` patchify for :func:`encoders.conv_stem.conv_stem` (same grid and width)."""
        if not hasattr(self.visual, "transformer"):
            raise EncoderError(f"stem: conv replaces a ViT's patchify; {self.cfg.model} is a {type(self.visual).__name__}")
        self.visual.conv1 = conv_stem(tuple(self.visual.patch_size), int(self.visual.transformer.width), 3, first_width)

    def _feature_info(self) -> list[tuple[int, tuple[int, int]]]:
        """(width, grid) of every tappable layer, from the tower's structure (no forward pass)."""
        visual = self.visual
        size = tuple(int(s) for s in visual.image_size) if hasattr(visual, "image_size") else None
        if hasattr(visual, "transformer"):  # open_clip's own VisionTransformer
            grid = tuple(int(g) for g in visual.grid_size)
            return [(int(visual.transformer.width), grid)] * len(visual.transformer.resblocks)
        if size is None or not hasattr(visual, "trunk"):
            raise EncoderError(f"model: {type(visual).__name__} towers have no intermediate layers to tap")
        return [
            (int(f["num_chs"]), (size[0] // f["reduction"], size[1] // f["reduction"]))
            for f in visual.trunk.feature_info
        ]

    @property
    def _num_prefix(self) -> int:
        if hasattr(self.visual, "transformer"):
            return 1  # open_clip's ViT always has one class token
        return int(getattr(self.visual.trunk, "num_prefix_tokens", 0))

    @property
    def embed_dim(self) -> int:
        return self._dim

    @property
    def grid_size(self) -> tuple[int, int]:
        return self._grid

    @property
    def num_patches(self) -> int:
        rows, cols = self._grid
        return rows * cols + (0 if self.cfg.drop_prefix else self._num_prefix)

    @property
    def image_size(self) -> tuple[int, int]:
        size = self.visual.image_size
        return int(size[0]), int(size[1])

    @property
    def fsdp_unit(self) -> type[nn.Module]:
        if hasattr(self.visual, "transformer"):
            return type(self.visual.transformer.resblocks[0])
        return type(self.visual.trunk.get_submodule(self.visual.trunk.feature_info[0]["module"]))

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        return self._transform(image.convert("RGB"))

    def forward(self, pixels: torch.Tensor) -> dict[int, torch.Tensor]:
        taps = sorted(set(self.layers))
        keep_prefix = not self.cfg.drop_prefix and self._num_prefix > 0
        out = self.visual.forward_intermediates(
            pixels,
            indices=taps,
            stop_early=True,
            normalize_intermediates=self.cfg.norm,
            intermediates_only=True,
            output_fmt="NCHW",  # the one format both open_clip ViTs and timm conv trunks return
            output_extra_tokens=keep_prefix,
        )
        tokens = [fmap.flatten(2).transpose(1, 2) for fmap in out["image_intermediates"]]
        if keep_prefix:
            tokens = [torch.cat([prefix, t], dim=1) for prefix, t in zip(out["image_intermediates_prefix"], tokens, strict=True)]
        by_layer = dict(zip(taps, tokens, strict=True))
        return {layer: by_layer[layer] for layer in self.layers}
