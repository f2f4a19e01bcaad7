"""Token grids: reshape ``[B, N, D]`` tokens to maps and bring them to a common grid, explicitly.

Encoders with different patch sizes or stages (CLIP-14 px vs DINOv2-16 px, Florence-2 / ConvNeXt
stages) produce different grids. Fusing them on channels needs one grid; the resampling is always a
configured choice (:data:`GRID_MODES`), never an implicit side effect:

* ``bilinear`` / ``bicubic`` / ``nearest``: ``F.interpolate`` with ``align_corners=False``;
* ``area``: ``F.adaptive_avg_pool2d`` (exact average pooling when the grid divides evenly);
* ``max``: ``F.adaptive_max_pool2d``.

Tokens are row-major over the grid (token ``i`` is cell ``(i // cols, i % cols)``), as every ViT and
``flatten(2)`` of a conv map lay them out.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F

from encoders.base import EncoderError

GridMode = Literal["bilinear", "bicubic", "nearest", "area", "max"]
GRID_MODES: tuple[str, ...] = ("bilinear", "bicubic", "nearest", "area", "max")


def to_map(tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """``[B, rows*cols, D] -> [B, D, rows, cols]``."""
    batch, num, dim = tokens.shape
    rows, cols = grid
    if num != rows * cols:
        raise EncoderError(f"{num} tokens do not fill a {rows}x{cols} grid")
    return tokens.transpose(1, 2).reshape(batch, dim, rows, cols)


def to_tokens(fmap: torch.Tensor) -> torch.Tensor:
    """``[B, D, rows, cols] -> [B, rows*cols, D]``."""
    return fmap.flatten(2).transpose(1, 2)


def resample(tokens: torch.Tensor, grid: tuple[int, int], target: tuple[int, int], mode: str) -> torch.Tensor:
    """Tokens on ``grid`` -> tokens on ``target`` by ``mode``; the identity when the grids agree."""
    if tuple(grid) == tuple(target):
        return tokens
    fmap = to_map(tokens, grid)
    if mode == "area":
        out = F.adaptive_avg_pool2d(fmap, target)
    elif mode == "max":
        out = F.adaptive_max_pool2d(fmap, target)
    elif mode in ("bilinear", "bicubic"):
        out = F.interpolate(fmap, size=target, mode=mode, align_corners=False)
    elif mode == "nearest":
        out = F.interpolate(fmap, size=target, mode="nearest")
    else:
        raise EncoderError(f"grid_mode: expected one of {list(GRID_MODES)}, got {mode!r}")
    return to_tokens(out)


def check_grid(grid: Sequence[int] | None, where: str) -> tuple[int, int] | None:
    """Validate a configured ``[rows, cols]`` grid (or ``None``)."""
    if grid is None:
        return None
    if len(grid) != 2 or any(int(g) <= 0 for g in grid):
        raise EncoderError(f"{where}: expected [rows, cols] with positive sizes, got {list(grid)}")
    return int(grid[0]), int(grid[1])
