"""Shared fixtures for encoder tests: a real photograph, and the fused-encoder builder that mllm/
is expected to use (towers from their parts, then the fusion from the towers' feature specs)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from PIL import Image

from encoders.base import VisionEncoder
from encoders.fused import FusedEncoder, FusedEncoderConfig
from mllm.config import EncoderPart, FusionPart
from mllm.registry import ENCODER_FUSIONS, ENCODERS


@pytest.fixture(scope="session")
def astronaut() -> Image.Image:
    """scikit-image's astronaut photo, cropped to a non-square 512x384 so resizing and cropping matter."""
    skimage_data = pytest.importorskip("skimage.data")
    return Image.fromarray(skimage_data.astronaut()).crop((0, 64, 512, 448))


def _build_encoder(part: EncoderPart) -> VisionEncoder:
    if not isinstance(part.cfg, FusedEncoderConfig):
        return ENCODERS.build(part.name, part.cfg)
    towers = [_build_encoder(EncoderPart.from_value(t, f"encoder.towers[{i}]")) for i, t in enumerate(part.cfg.towers)]
    fusion = FusionPart.from_value(part.cfg.fusion, "encoder.fusion")
    return FusedEncoder(part.cfg, towers, lambda specs: ENCODER_FUSIONS.build(fusion.name, fusion.cfg, inputs=specs))


@pytest.fixture(scope="session")
def build_encoder() -> Callable[[EncoderPart], VisionEncoder]:
    return _build_encoder
