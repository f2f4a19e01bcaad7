"""Per-cell object targets of a ShapesWorld scene, for the encoder's auxiliary object heads.

ShapesWorld puts at most one object in each cell of a ``grid x grid`` layout, so when the vision
encoder has one patch per cell (the tiny recipe: 64 px, patch 16, grid 4) every patch token has an
exact label: the attributes of its cell's object, or "empty". The ``object_heads`` auxiliary head
(``mllm.heads.object_heads``) turns them into a loss on the patch tokens.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from common.errors import UserError
from train.data.shapesworld import COLOUR_NAMES, SHAPES, SIZES

# class 0 of every attribute is "no object in this cell"; value i of an attribute is class i + 1
CELL_ATTRIBUTES: dict[str, tuple[str, ...]] = {"shape": SHAPES, "colour": COLOUR_NAMES, "size": SIZES}


class CellTargetError(UserError, ValueError):
    """A sample carries no usable ``objects`` list; the message names the sample."""


def cell_targets(sample: Mapping[str, Any], grid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(classes [grid², A] long, boxes [grid², 4] float)`` in row-major cell order.

    ``classes[c, a]`` is 0 for an empty cell, else 1 + the index of the object's value of attribute
    ``a`` (the order of :data:`CELL_ATTRIBUTES`); ``boxes[c]`` is the object's ``[x1, y1, x2, y2]`` as
    fractions of the image side (the 0-1000 coordinates / 1000), zeros for an empty cell.
    """
    sid = sample.get("id", "?")
    objects: Sequence[Mapping[str, Any]] | None = sample.get("objects")
    if objects is None:
        raise CellTargetError(f"sample {sid}: no 'objects' list; object heads train on ShapesWorld scenes only")
    classes = torch.zeros(grid * grid, len(CELL_ATTRIBUTES), dtype=torch.long)
    boxes = torch.zeros(grid * grid, 4)
    for obj in objects:
        row, col = obj["cell"]
        if not (0 <= row < grid and 0 <= col < grid):
            raise CellTargetError(f"sample {sid}: object cell {[row, col]} outside the {grid}x{grid} grid")
        cell = row * grid + col
        for a, (attr, values) in enumerate(CELL_ATTRIBUTES.items()):
            classes[cell, a] = values.index(obj[attr]) + 1
        boxes[cell] = torch.tensor(obj["box"], dtype=torch.float32) / 1000.0
    return classes, boxes
