"""Shared fixtures for encoder tests: a real photograph for preprocessing parity."""

from __future__ import annotations

import pytest
from PIL import Image


@pytest.fixture(scope="session")
def astronaut() -> Image.Image:
    """scikit-image's astronaut photo, cropped to a non-square 512x384 so resizing and cropping matter."""
    skimage_data = pytest.importorskip("skimage.data")
    return Image.fromarray(skimage_data.astronaut()).crop((0, 64, 512, 448))
