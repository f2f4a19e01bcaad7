"""A fused encoder: several towers, each with its own preprocessing, and one fusion module.

It is itself a :class:`VisionEncoder` (prismatic's ``DinoSigLIPViTBackbone`` idea), so the model sees
one encoder whose single output ``{0: [B, N, D]}`` is the fusion's output::

    pixels -> unpack -> tower_t(x_t) -> tapped layers -> resample to `grid` -> fusion -> [B, N, D]

It is composed from built modules (encoders/ imports nothing of mllm/): the caller builds the towers,
asks :func:`tower_specs` what each gives on the common grid, builds the fusion for those specs and
passes all of it in — ``FusedEncoder(towers, fusion, grid)``. The roof does that from typed config
parts (``mllm/fused.py``).

Per-tower transforms: ``preprocess`` runs every tower's own transform and packs the results into
one tensor ``[3·T, H_max, W_max]`` (tower ``t`` in channels ``3t..3t+2``, top-left aligned, zero
padding); ``forward`` cuts each tower's exact pixels back out. Packing is lossless, keeps a
collatable image-shaped tensor, and lets towers differ in size (MG-LLaVA: 336 px and 768 px) and in
normalisation (CLIP vs ImageNet mean/std).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image
from torch import nn

from encoders.base import EncoderError, VisionEncoder
from encoders.fusion.base import EncoderFusion, FeatureSpec
from encoders.grid import GridMode, check_grid, resample

FUSED_LAYER = 0  # the one key of a fused encoder's output


def tower_specs(towers: Sequence[VisionEncoder], grid: Sequence[int] | None) -> list[FeatureSpec]:
    """What each tower hands the fusion: its tapped layers' widths, on ``grid`` (``None``: its own grid)."""
    target = check_grid(grid, "grid")
    specs = []
    for index, tower in enumerate(towers):
        tower_grid, tokens = tower.grid_size, tower.num_patches
        if target is not None and tower_grid != target:
            prefix = tokens - tower_grid[0] * tower_grid[1]
            if prefix:
                raise EncoderError(
                    f"towers[{index}]: keeps {prefix} prefix token(s), which cannot be resampled from grid "
                    f"{tower_grid} to {target}; set its drop_prefix: true"
                )
            tower_grid, tokens = target, target[0] * target[1]
        specs.append(FeatureSpec(tuple(tower.layer_dims[layer] for layer in tower.layers), tower_grid, tokens))
    return specs


class FusedEncoder(VisionEncoder):
    """Towers -> grid alignment -> fusion, presented as one encoder with one output layer."""

    def __init__(
        self,
        towers: Sequence[VisionEncoder],
        fusion: EncoderFusion,
        grid: Sequence[int] | None = None,
        grid_mode: GridMode = "area",
    ) -> None:
        """``grid``: common ``[rows, cols]`` for every tower (``None`` keeps each tower's grid);
        ``grid_mode``: how a tower reaches it (encoders/grid.py)."""
        super().__init__()
        if not towers:
            raise EncoderError("towers: give at least one encoder")
        self.towers = nn.ModuleList(towers)
        self.grid_mode = grid_mode
        self.specs = tower_specs(towers, grid)
        self.fusion = fusion
        self.layers = [FUSED_LAYER]
        self._sizes = [tower.image_size for tower in towers]
        self._canvas = (max(h for h, _ in self._sizes), max(w for _, w in self._sizes))

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
        return self.forward_towers(pixels)[0]

    def forward_towers(self, pixels: torch.Tensor) -> tuple[dict[int, torch.Tensor], list[torch.Tensor]]:
        """:meth:`forward`'s output and, beside it, each tower's last tapped layer on the common grid (what
        a loss on the towers themselves reads), returned explicitly: nothing is kept on the module."""
        feats = self.tower_features(pixels)
        return {FUSED_LAYER: self.fusion(feats)}, [layers[-1] for layers in feats]

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
            feats.append([resample(out[layer], tower.grid_size, spec.grid, self.grid_mode) for layer in tower.layers])
        return feats
