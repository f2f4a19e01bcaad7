"""Shared fixtures for encoder tests: a real photograph, and the model's encoder builder (the encoder
table: a fused encoder's towers from their parts, then the fusion from the towers' feature specs)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from PIL import Image

from encoders.base import VisionEncoder
from mllm.config import EncoderPart


@pytest.fixture(scope="session")
def astronaut() -> Image.Image:
    """scikit-image's astronaut photo, cropped to a non-square 512x384 so resizing and cropping matter."""
    skimage_data = pytest.importorskip("skimage.data")
    return Image.fromarray(skimage_data.astronaut()).crop((0, 64, 512, 448))


@pytest.fixture(scope="session")
def build_encoder() -> Callable[[EncoderPart], VisionEncoder]:
    from mllm.registry import ENCODERS

    return lambda part: ENCODERS.build(part.name, part.cfg)
