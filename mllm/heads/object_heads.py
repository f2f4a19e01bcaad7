"""Object heads: an auxiliary loss that teaches a from-scratch vision encoder what is in each patch.

Real MLLMs start from an encoder pretrained with dense or contrastive supervision (CLIP, DINOv2,
Florence-2's region-level annotations); a randomly initialised encoder trained only through the
LLM's answer loss learns object shape last (benchmarks/results/ holds the measurements). For a
ShapesWorld scene, with one encoder patch per grid cell, every patch token ``h_c`` has an exact label
(:mod:`train.data.cell_targets`), and this head supplies that supervision beside the answer loss: one
linear classifier per attribute ``a`` (class 0 = empty cell) and one linear box regressor,

    L = L_LM + w * ( sum_a mean_c CE(W_a h_c, y_{c,a})
                     + w_box * mean_{c occupied} SmoothL1_beta(W_box h_c, b_c) )

with ``b_c`` the object's box as fractions of the image side and the smooth-L1 of Fast R-CNN
(Girshick, ICCV 2015, arXiv:1504.08083, Eq. 3; ``beta`` the switch from quadratic to linear). A finer
patch grid, ``k`` patches per cell side (``patch_size: 8`` on a 4x4 scene: 8x8 patches), is read per
cell: ``h_c`` is the mean of the cell's ``k x k`` patch tokens (an object fills part of its cell, so a
single patch's label would often be "empty" where the object is).

A fused encoder's towers stand in for several pretrained encoders. With ``towers: true`` each tower
``t`` gets its own classifiers and regressor on its last tapped layer ``h^t_c`` (on the fusion's
common grid), and ``L`` adds ``sum_t w * (...)(h^t)``: every tower learns what is in its patches
from the first step, also one behind a zero-initialised gate (FtZ, Conv-Gate), whose gradient
through the fusion is 0 there.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from mllm.heads.base import AuxHead, HeadError, HeadInputs, HeadSpec, SampleTargets
from train.data.cell_targets import CELL_ATTRIBUTES, cell_targets


@dataclass
class ObjectHeadsConfig:
    weight: float = 1.0  # w: the heads' loss relative to the answer loss
    box_weight: float = 5.0  # w_box: box regression relative to the classifiers (boxes are fractions in [0, 1])
    box_beta: float = 0.05  # smooth-L1 switch point, in fractions of the image side (~3 px at 64 px)
    # fused encoder only: also one set of heads on each tower's last tapped layer, so every tower is taught
    # what is in its patches from step 0, as a pretrained tower would be, even behind a zero-initialised gate
    towers: bool = False

    def __post_init__(self) -> None:
        if not self.weight > 0 or self.box_weight < 0 or not self.box_beta > 0:
            raise ValueError(
                f"object_heads: expected weight > 0, box_weight >= 0, box_beta > 0; got weight={self.weight}, "
                f"box_weight={self.box_weight}, box_beta={self.box_beta}"
            )


class PatchHeads(nn.Module):
    """Per-attribute classifiers and a box regressor on patch tokens ``[B, N, D]``."""

    def __init__(self, dim: int, num_classes: Sequence[int], cfg: ObjectHeadsConfig) -> None:
        """``num_classes[a]``: the values of attribute ``a`` plus one (the empty class)."""
        super().__init__()
        self.cfg = cfg
        self.classifiers = nn.ModuleList(nn.Linear(dim, n) for n in num_classes)
        self.box = nn.Linear(dim, 4)

    def loss(self, tokens: torch.Tensor, classes: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """The weighted auxiliary loss ``w * (...)`` of the module docstring.

        ``tokens`` ``[B, N, D]``; ``classes`` ``[B, N, A]`` long (0 = empty); ``boxes`` ``[B, N, 4]``.
        """
        if classes.shape[:2] != tokens.shape[:2] or classes.shape[2] != len(self.classifiers):
            raise ValueError(
                f"object heads: targets {tuple(classes.shape)} do not match tokens {tuple(tokens.shape[:2])} x "
                f"{len(self.classifiers)} attributes (one patch per grid cell is needed)"
            )
        flat = tokens.flatten(0, 1).float()
        total = sum(F.cross_entropy(head(flat), classes[..., a].flatten()) for a, head in enumerate(self.classifiers))
        occupied = classes[..., 0].flatten() > 0
        if self.cfg.box_weight and bool(occupied.any()):
            pred = self.box(flat[occupied])
            total = total + self.cfg.box_weight * F.smooth_l1_loss(pred, boxes.flatten(0, 1)[occupied].float(),
                                                                   beta=self.cfg.box_beta)
        return self.cfg.weight * total


class ObjectHeads(AuxHead):
    """The ``object_heads`` auxiliary head: :class:`PatchHeads` on the encoder's last tapped layer, and
    with ``towers: true`` one more set on each tower of a fused encoder."""

    config_cls = ObjectHeadsConfig
    batch_keys = ("cell_classes", "cell_boxes")
    data = "ShapesWorld"

    def __init__(self, cfg: ObjectHeadsConfig, spec: HeadSpec) -> None:
        super().__init__()
        classes = [len(values) + 1 for values in CELL_ATTRIBUTES.values()]
        self.grid = spec.grid
        self.patches = PatchHeads(spec.dim, classes, cfg)
        self.reads_towers = cfg.towers
        self.towers = nn.ModuleList()
        if cfg.towers:
            if not spec.tower_dims:
                raise HeadError("object_heads.towers: true needs a fused encoder (model.encoder.name: fused)")
            for t, tokens in enumerate(spec.tower_tokens):
                if tokens != spec.num_tokens:
                    raise HeadError(f"object_heads.towers: towers[{t}] gives {tokens} tokens on the common "
                                         f"grid, expected {spec.num_tokens} (one per patch of the fusion)")
            self.towers.extend(PatchHeads(dim, classes, cfg) for dim in spec.tower_dims)

    def sample_targets(self, data: Any) -> SampleTargets:
        """ShapesWorld's per-cell targets (:func:`train.data.cell_targets.cell_targets`); the encoder's patch
        grid must be the scene grid (``data.grid``) or a multiple of it."""
        grid = getattr(data, "grid", None)
        if not isinstance(grid, int) or self.grid[0] != self.grid[1] or self.grid[0] % grid:
            raise HeadError(f"model.aux_heads (object_heads): need k x k encoder patches per ShapesWorld cell, but "
                            f"the encoder's patch grid is {self.grid} and data.grid is {grid}")

        def targets(sample: Mapping[str, Any]) -> dict[str, torch.Tensor]:
            classes, boxes = cell_targets(sample, grid)
            return {"cell_classes": classes, "cell_boxes": boxes}

        return targets

    def loss(self, inputs: HeadInputs, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        classes, boxes = batch["cell_classes"], batch["cell_boxes"]
        cells = math.isqrt(classes.shape[1])
        total = self.patches.loss(cell_means(inputs.tokens, self.grid, cells), classes, boxes)
        for heads, tokens in zip(self.towers, inputs.towers, strict=True):
            total = total + heads.loss(cell_means(tokens, self.grid, cells), classes, boxes)
        return total


def cell_means(tokens: torch.Tensor, grid: tuple[int, int], cells: int) -> torch.Tensor:
    """Row-major patch tokens ``[B, gh * gw, D]`` on a ``grid`` that is ``k`` times ``cells`` per side ->
    ``[B, cells**2, D]``, each cell the mean of its ``k x k`` patches (unchanged when ``k`` is 1)."""
    if grid == (cells, cells):
        return tokens
    b, _, d = tokens.shape
    maps = tokens.transpose(1, 2).reshape(b, d, *grid)
    return F.avg_pool2d(maps, grid[0] // cells).flatten(2).transpose(1, 2)
