"""A fused encoder: several towers, each with its own preprocessing, and one fusion module.

It is itself a :class:`VisionEncoder` (prismatic's ``DinoSigLIPViTBackbone`` idea), so the model sees
one encoder whose single output ``{0: [B, N, D]}`` is the fusion's output::

    pixels -> unpack -> tower_t(x_t) -> tapped layers -> resample to `grid` -> fusion -> [B, N, D]

Construction respects the dependency direction (encoders/ imports nothing of mllm/): the caller
builds the towers from ``cfg.towers`` and passes them in, with a factory that builds the fusion from
the towers' :class:`FeatureSpec` (which exist only once the towers do). In mllm/ that is::

    towers = [build_encoder(EncoderPart.from_value(t, ...)) for t in cfg.towers]
    fusion = FusionPart.from_value(cfg.fusion, ...)
    FusedEncoder(cfg, towers, lambda specs: ENCODER_FUSIONS.build(fusion.name, fusion.cfg, inputs=specs))

Per-tower transforms: ``preprocess`` runs every tower's own transform and packs the results into
one tensor ``[3·T, H_max, W_max]`` (tower ``t`` in channels ``3t..3t+2``, top-left aligned, zero
padding); ``forward`` cuts each tower's exact pixels back out. Packing is lossless, keeps a
collatable image-shaped tensor, and lets towers differ in size (MG-LLaVA: 336 px and 768 px) and in
normalisation (CLIP vs ImageNet mean/std).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from torch import nn

from encoders.base import EncoderError, VisionEncoder
from encoders.fusion.base import EncoderFusion, FeatureSpec
from encoders.grid import GridMode, check_grid, resample

FUSED_LAYER = 0  # the one key of a fused encoder's output


@dataclass
class FusedEncoderConfig:
    towers: list[dict[str, Any]]  # encoder parts {name: <encoder>, <its fields>}, built by the caller
    fusion: dict[str, Any]  # fusion part {name: <fusion>, <its fields>}, built by the caller
    grid: list[int] | None = None  # common [rows, cols] for every tower; None = keep each tower's grid
    grid_mode: GridMode = "area"  # how a tower reaches `grid` (encoders/grid.py)

    def __post_init__(self) -> None:
        if not self.towers:
            raise ValueError("towers: give at least one encoder part")
        for t, tower in enumerate(self.towers):
            if not isinstance(tower, dict) or "name" not in tower:
                raise ValueError(f"towers[{t}]: expected a mapping with a 'name' key (a registered encoder)")
        if not isinstance(self.fusion, dict) or "name" not in self.fusion:
            raise ValueError("fusion: expected a mapping with a 'name' key (a registered encoder fusion)")


class FusedEncoder(VisionEncoder):
    """Towers -> grid alignment -> fusion, presented as one encoder with one output layer."""

    config_cls = FusedEncoderConfig

    def __init__(
        self,
        cfg: FusedEncoderConfig,
        towers: Sequence[VisionEncoder],
        make_fusion: Callable[[list[FeatureSpec]], EncoderFusion],
    ) -> None:
        super().__init__()
        if len(towers) != len(cfg.towers):
            raise EncoderError(f"towers: {len(cfg.towers)} configured but {len(towers)} built")
        self.cfg = cfg
        self.towers = nn.ModuleList(towers)
        self._target = check_grid(cfg.grid, "grid")
        self.specs = [self._spec(t, tower) for t, tower in enumerate(towers)]
        self.fusion = make_fusion(self.specs)
        self.layers = [FUSED_LAYER]
        self._sizes = [tower.image_size for tower in towers]
        self._canvas = (max(h for h, _ in self._sizes), max(w for _, w in self._sizes))
        # With keep_towers set, forward with grad enabled also leaves each tower's last tapped layer (on the common grid) in
        # tower_tokens, for a loss on the towers themselves (mllm/object_heads.py, `towers: true`).
        self.keep_towers = False
        self.tower_tokens: list[torch.Tensor] = []

    def _spec(self, index: int, tower: VisionEncoder) -> FeatureSpec:
        grid, tokens = tower.grid_size, tower.num_patches
        if self._target is not None and grid != self._target:
            prefix = tokens - grid[0] * grid[1]
            if prefix:
                raise EncoderError(
                    f"towers[{index}]: keeps {prefix} prefix token(s), which cannot be resampled from grid "
                    f"{grid} to {self._target}; set its drop_prefix: true"
                )
            grid, tokens = self._target, self._target[0] * self._target[1]
        return FeatureSpec(tuple(tower.layer_dims[layer] for layer in tower.layers), grid, tokens)

    @property
    def embed_dim(self) -> int:
        return int(self.fusion.out_dim)

    @property
    def grid_size(self) -> tuple[int, int]:
        return self.fusion.out_grid

    @property
    def num_patches(self) -> int:
        return int(self.fusion.out_tokens)

    @property
    def image_size(self) -> tuple[int, int]:
        return self._canvas

    @property
    def fsdp_unit(self) -> type[nn.Module]:
        return self.towers[0].fsdp_unit

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """Every tower's own transform, packed as ``[3·T, H_max, W_max]``."""
        packed = torch.zeros(3 * len(self.towers), *self._canvas)
        for t, tower in enumerate(self.towers):
            pixels = tower.preprocess(image)
            if tuple(pixels.shape) != (3, *self._sizes[t]):
                raise EncoderError(f"towers[{t}]: preprocess gave {tuple(pixels.shape)}, expected (3, *{self._sizes[t]})")
            packed[3 * t : 3 * t + 3, : pixels.shape[1], : pixels.shape[2]] = pixels
        return packed

    def forward(self, pixels: torch.Tensor) -> dict[int, torch.Tensor]:
        feats = self.tower_features(pixels)
        self.tower_tokens = [layers[-1] for layers in feats] if self.keep_towers and torch.is_grad_enabled() else []
        return {FUSED_LAYER: self.fusion(feats)}

    def tower_features(self, pixels: torch.Tensor) -> list[list[torch.Tensor]]:
        """Each tower's tapped layers on the common grid, exactly as the fusion receives them."""
        if pixels.shape[1] != 3 * len(self.towers):
            raise EncoderError(
                f"fused encoder: pixels have {pixels.shape[1]} channels, expected {3 * len(self.towers)} "
                "(3 per tower, as packed by preprocess)"
            )
        feats = []
        for t, (tower, spec) in enumerate(zip(self.towers, self.specs, strict=True)):
            rows, cols = self._sizes[t]
            out = tower(pixels[:, 3 * t : 3 * t + 3, :rows, :cols])
            feats.append([resample(out[layer], tower.grid_size, spec.grid, self.cfg.grid_mode) for layer in tower.layers])
        return feats
