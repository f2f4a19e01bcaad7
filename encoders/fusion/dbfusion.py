"""Florence-VL Depth–Breadth Fusion, DBFusion (Chen et al., 2024, CVPR 2025, arXiv 2412.04424).

Florence-VL concatenates, along channels, one *depth* feature set and several *breadth* sets of a
Florence-2 encoder — the projected DaViT image tokens ``V_d`` and the encoder's states under the
caption / OCR / grounding prompts:

    F = [ V_d ; V_cap ; V_ocr ; V_grd ] ∈ R^{B × 576 × 4·1024}

then a 3-layer MLP maps F to the LLM width. That MLP is **the projector** here (``projector:
{name: mlp, depth: 3}`` = the released ``mlp3x_gelu``), not part of this module, so DBFusion itself
is channel concatenation over every feature set of every tower — the same operator as ``concat``,
registered under the method's name and requiring at least two feature sets. The sets come from
``encoders/florence.py`` (``image_features: true`` and ``prompts``), or, for the "several depths"
variant, from DaViT blocks brought to one grid.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from encoders.base import EncoderError
from encoders.fusion.base import FeatureSpec
from encoders.fusion.concat import ConcatFusion


@dataclass
class DBFusionConfig:
    """No options: the order of the sets is the order the towers tap them (depth first, then breadth)."""


class DBFusion(ConcatFusion):
    config_cls = DBFusionConfig  # type: ignore[assignment]
    name = "dbfusion"

    def __init__(self, cfg: DBFusionConfig, inputs: Sequence[FeatureSpec]) -> None:
        sets = sum(len(spec.dims) for spec in inputs)
        if sets < 2:
            raise EncoderError(
                f"fusion dbfusion: needs at least two feature sets (depth + breadth), got {sets}; "
                "tap image_features and prompts on the Florence-2 tower"
            )
        super().__init__(cfg, inputs)  # type: ignore[arg-type]
