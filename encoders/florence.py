"""Florence-2 (transformers' native ``Florence2``) as a vision encoder: DaViT stages, the projected
image tokens, and prompt-conditioned encoder states (Florence-VL's depth and breadth features).

Three kinds of feature set, each a token grid ``[B, N, D]`` (Florence-VL: Chen et al., 2024, CVPR 2025,
arXiv 2412.04424, depth and breadth features):

* ``layers``: DaViT blocks, numbered over all stages (block ``b`` = ``hidden_states[b + 1]`` of
  ``Florence2VisionBackbone``); stages differ in width and grid (stride 4, 8, 16, 32);
* ``image_features``: the projected image tokens ``V = LN(W [mean(X); X + pos])`` of
  ``Florence2Model.get_image_features`` — Florence-VL's *depth* feature ``V_d``;
* ``prompts``: for each task prompt ``t_k`` (token ids, ``bos ... eos``), the Florence-2 encoder's
  last hidden states at the image positions of ``Enc([V; Emb(t_k)])`` — Florence-VL's *breadth*
  features ``V_cap, V_ocr, V_grd``; all prompts run as one batch (padding masked).

Keys of the returned mapping: block taps keep their block index; the image features come under
``num_blocks`` and prompt ``k`` under ``num_blocks + 1 + k``. The leading global (mean) token of the
image features / prompt states is the only prefix token (``drop_prefix``). Taps on different grids
must be brought to one ``grid`` (encoders/grid.py), never silently. Florence-VL's own prompt ids
(BART vocabulary) are in the README; the breadth sets are inferred to keep the 576 image positions
of each prompt's encoder output (inferred: Florence-VL's modified Florence-2 hook that returns these
states is not part of its released code).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image
from torch import nn

from encoders.base import EncoderError, VisionEncoder, freeze, resolve_layers
from encoders.conv_stem import check_stem, conv_stem
from encoders.grid import GridMode, check_grid, resample
from encoders.hf import build_image_processor, load_hf_model, processed_size


@dataclass
class FlorenceConfig:
    path: str | None = None  # local transformers-format Florence-2 folder; None = random init
    vision: dict[str, Any] = field(default_factory=dict)  # Florence2VisionConfig fields (random init)
    text: dict[str, Any] = field(default_factory=dict)  # BART text_config fields (random init)
    processor: dict[str, Any] = field(default_factory=dict)  # image-processor overrides / config (see hf.py)
    layers: list[int] = field(default_factory=lambda: [-1])  # DaViT blocks over all stages; negative = from end
    image_features: bool = False  # also return the projected image tokens (Florence-VL V_d)
    prompts: list[list[int]] = field(default_factory=list)  # task-prompt token ids (Florence-VL breadth)
    grid: list[int] | None = None  # common [rows, cols] for taps whose grids differ
    grid_mode: GridMode = "area"  # how a tap reaches `grid` (encoders/grid.py)
    drop_prefix: bool = True  # drop the global token leading the image features / prompt states
    stem: str = "patch"  # patch (DaViT's stage-1 k x k conv embed) | conv (Xiao et al. 2021 conv stem, random init only)
    stem_width: int | None = None  # conv stem: first conv's channels, doubling up to the stage-1 width
    frozen: bool = True

    def __post_init__(self) -> None:
        check_stem(self.stem, self.stem_width, self.path)
        if not (self.layers or self.image_features or self.prompts):
            raise EncoderError("layers: tap a block, or set image_features or prompts")
        if any(not ids for ids in self.prompts):
            raise EncoderError("prompts: every prompt needs at least one token id")


def _stage_grids(davit: nn.Module, size: tuple[int, int]) -> list[tuple[int, int]]:
    """Output grid of each DaViT stage, from the convolutions its embedding holds (the ``k x k`` stride-``s``
    embed, or a conv stem in its place): ``floor((n + 2p - k) / s) + 1`` per convolution."""
    grids, (rows, cols) = [], size
    for embed in davit.convs:
        for conv in (m for m in embed.modules() if isinstance(m, nn.Conv2d)):
            (kh, kw), (sh, sw), (ph, pw) = conv.kernel_size, conv.stride, conv.padding
            rows, cols = (rows + 2 * ph - kh) // sh + 1, (cols + 2 * pw - kw) // sw + 1
        grids.append((rows, cols))
    return grids


class FlorenceEncoder(VisionEncoder):
    """Florence-2's DaViT blocks, projected image tokens and prompt-conditioned encoder states."""

    config_cls = FlorenceConfig

    def __init__(self, cfg: FlorenceConfig) -> None:
        super().__init__()
        self.cfg = cfg
        core = self._load(cfg)
        config = core.config
        vision = config.vision_config
        self.davit: nn.Module = core.vision_tower
        if cfg.stem == "conv":
            self._use_conv_stem(cfg.stem_width)
        self.projector: nn.Module | None = None
        self.text_encoder: nn.Module | None = None
        if cfg.image_features or cfg.prompts:
            self.projector = core.multi_modal_projector
        if cfg.prompts:
            self.text_encoder = core.language_model.encoder
            self._check_prompts(config)
            self.register_buffer("_prompt_ids", self._pad_prompts(config.text_config.pad_token_id), persistent=False)
        del core  # the decoder and LM head are not used
        self._processor = build_image_processor(cfg.path, cfg.processor, "encoder")
        self._image_size = processed_size(self._processor, "encoder")

        stage_of = [s for s, depth in enumerate(vision.depths) for _ in range(depth)]
        self.num_blocks = len(stage_of)
        grids = _stage_grids(self.davit, self._image_size)
        self.blocks = resolve_layers(cfg.layers, self.num_blocks, where="layers") if cfg.layers else []
        dims = {b: int(vision.embed_dim[stage_of[b]]) for b in self.blocks}
        tap_grids = {b: grids[stage_of[b]] for b in self.blocks}
        extra = ([self.num_blocks] if cfg.image_features else []) + [
            self.num_blocks + 1 + k for k in range(len(cfg.prompts))
        ]
        for key in extra:
            dims[key] = int(vision.projection_dim if key == self.num_blocks else config.text_config.d_model)
            tap_grids[key] = grids[-1]
        self.layers = self.blocks + extra
        self._dims, self._tap_grids = dims, tap_grids
        self._grid = self._common_grid(cfg, set(tap_grids.values()))
        if cfg.frozen:
            freeze(self)
            self.frozen = True
            self.eval()

    @staticmethod
    def _load(cfg: FlorenceConfig) -> nn.Module:
        """The ``Florence2Model`` (vision tower, projector, BART) from a folder or random init."""
        from transformers import Florence2Config, Florence2ForConditionalGeneration, Florence2Model

        if cfg.path is None:
            try:
                config = Florence2Config(vision_config=cfg.vision, text_config=cfg.text)
            except (TypeError, ValueError) as err:
                raise EncoderError(f"encoder.vision / encoder.text: not a Florence-2 config: {err}") from err
            return Florence2Model(config)
        return load_hf_model(cfg.path, "encoder", Florence2ForConditionalGeneration).model

    def _use_conv_stem(self, first_width: int | None) -> None:
        """Swap stage 1's ``k x k`` stride-``s`` conv embed for :func:`encoders.conv_stem.conv_stem` (``log2 s``
        3x3 stride-2 Conv-BN-ReLU stages and a 1x1 to the stage-1 width); its LayerNorm stays."""
        embed = self.davit.convs[0]
        embed.conv = conv_stem((embed.stride, embed.stride), embed.embed_dim, embed.in_channels, first_width)

    def _check_prompts(self, config: Any) -> None:
        if config.vision_config.projection_dim != config.text_config.d_model:
            raise EncoderError(
                f"encoder.text.d_model: {config.text_config.d_model} must equal vision.projection_dim "
                f"{config.vision_config.projection_dim} (image tokens enter the text encoder)"
            )
        vocab = int(config.text_config.vocab_size)
        for k, ids in enumerate(self.cfg.prompts):
            bad = [i for i in ids if not 0 <= i < vocab]
            if bad:
                raise EncoderError(f"prompts[{k}]: token ids {bad[:3]} outside the vocabulary of {vocab}")

    def _pad_prompts(self, pad_id: int) -> torch.Tensor:
        width = max(len(ids) for ids in self.cfg.prompts)
        return torch.tensor([ids + [pad_id] * (width - len(ids)) for ids in self.cfg.prompts])

    def _common_grid(self, cfg: FlorenceConfig, grids: set[tuple[int, int]]) -> tuple[int, int]:
        target = check_grid(cfg.grid, "grid")
        prefixed = (cfg.image_features or bool(cfg.prompts)) and not cfg.drop_prefix
        if prefixed and (target is not None or self.blocks):
            raise EncoderError(
                "drop_prefix: keeping the global token is only possible when no DaViT block is tapped "
                "and no grid is set (token counts would differ)"
            )
        if target is None:
            if len(grids) > 1:
                raise EncoderError(f"grid: the tapped layers lie on grids {sorted(grids)}; set grid: [rows, cols]")
            return next(iter(grids))
        return target

    @property
    def layer_dims(self) -> dict[int, int]:
        return {layer: self._dims[layer] for layer in self.layers}

    @property
    def embed_dim(self) -> int:
        widths = set(self._dims.values())
        if len(widths) > 1:
            raise EncoderError(
                f"layers: the tapped sets have widths {self.layer_dims}; fuse them in a fused encoder "
                "(e.g. fusion dbfusion) or tap sets of one width"
            )
        return widths.pop()

    @property
    def grid_size(self) -> tuple[int, int]:
        return self._grid

    @property
    def num_patches(self) -> int:
        prefix = (self.cfg.image_features or bool(self.cfg.prompts)) and not self.cfg.drop_prefix
        return self._grid[0] * self._grid[1] + int(prefix)

    @property
    def image_size(self) -> tuple[int, int]:
        return self._image_size

    @property
    def fsdp_unit(self) -> type[nn.Module]:
        return type(self.davit.blocks[0][0])

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        return self._processor(images=image.convert("RGB"), return_tensors="pt")["pixel_values"][0]

    def _prompt_states(self, image_tokens: torch.Tensor) -> list[torch.Tensor]:
        """``Enc([V; Emb(t_k)])`` at the image positions, for every prompt, in one batch."""
        batch, num, _ = image_tokens.shape
        ids = self._prompt_ids
        prompts, width = ids.shape
        pad = self.text_encoder.embed_tokens.padding_idx
        text = self.text_encoder.embed_tokens(ids).to(image_tokens.dtype)
        embeds = torch.cat(
            [image_tokens.repeat_interleave(prompts, dim=0), text.repeat(batch, 1, 1)], dim=1
        )
        mask = torch.cat([ids.new_ones(prompts, num), (ids != pad).long()], dim=1).repeat(batch, 1)
        states = self.text_encoder(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        states = states[:, :num].reshape(batch, prompts, num, -1)
        return [states[:, k] for k in range(prompts)]

    def forward(self, pixels: torch.Tensor) -> dict[int, torch.Tensor]:
        out = self.davit(pixels, output_hidden_states=True)
        feats: dict[int, torch.Tensor] = {
            b: out.hidden_states[b + 1].flatten(2).transpose(1, 2) for b in self.blocks
        }
        if self.projector is not None:
            image_tokens = self.projector(out.last_hidden_state)
            sets = ([image_tokens] if self.cfg.image_features else []) + (
                self._prompt_states(image_tokens) if self.cfg.prompts else []
            )
            start = 1 if self.cfg.drop_prefix else 0
            for key, tokens in zip(self.layers[len(self.blocks) :], sets, strict=True):
                feats[key] = tokens[:, start:]
        return {key: resample(feats[key], self._tap_grids[key], self._grid, self.cfg.grid_mode) for key in self.layers}
