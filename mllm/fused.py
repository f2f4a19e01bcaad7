"""A fused encoder (``model.encoder.name: fused``) from typed parts: towers, fusion, common grid.

The config is parsed once, into typed parts (each tower an :class:`~mllm.config.EncoderPart`, the
fusion a :class:`~mllm.config.FusionPart`), by the one validator; building walks them: every tower
from the encoder table (a tower may itself be fused), then the fusion from the fusion table, sized by
what the towers give on the common grid (:func:`encoders.fused.tower_specs`), and finally
``FusedEncoder(towers, fusion, grid)`` from the built modules.
"""

from __future__ import annotations

from dataclasses import dataclass

from encoders.fused import FusedEncoder, tower_specs
from encoders.grid import GridMode
from mllm.config import EncoderPart, FusionPart
from mllm.registry import ENCODER_FUSIONS, ENCODERS


@dataclass
class FusedConfig:
    towers: list[EncoderPart]  # {name: <encoder>, <its fields>} each, e.g. an open_clip tower and a timm_vit tower
    fusion: FusionPart  # {name: concat | comm | ftz | dbfusion | convgate, <its fields>}
    grid: list[int] | None = None  # common [rows, cols] for every tower; None = keep each tower's grid
    grid_mode: GridMode = "area"  # how a tower reaches `grid` (encoders/grid.py)

    def __post_init__(self) -> None:
        if not self.towers:
            raise ValueError("towers: give at least one encoder part")


class FusedFromParts(FusedEncoder):
    """:class:`encoders.fused.FusedEncoder` built from a :class:`FusedConfig` (the ``fused`` encoder entry)."""

    config_cls = FusedConfig

    def __init__(self, cfg: FusedConfig) -> None:
        towers = [ENCODERS.build(part.name, part.cfg) for part in cfg.towers]
        fusion = ENCODER_FUSIONS.build(cfg.fusion.name, cfg.fusion.cfg, inputs=tower_specs(towers, cfg.grid))
        super().__init__(towers, fusion, cfg.grid, cfg.grid_mode)
        self.cfg = cfg
