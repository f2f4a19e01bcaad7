"""The ``fused`` encoder entry: a config parsed once into typed parts, built into
``FusedEncoder(towers, fusion, grid)`` from modules the encoder and fusion tables build."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from encoders.fused import FusedEncoder
from mllm.config import EncoderPart
from mllm.fused import FusedConfig, FusedFromParts
from mllm.registry import ENCODERS

TOWER = {"name": "timm_vit", "model_name": "vit_tiny_patch16_224", "depth": 1, "num_heads": 2, "layers": [-1]}


def _fused(**kw: object) -> FusedFromParts:
    value = {"name": "fused", "towers": [{**TOWER, "image_size": 32, "patch_size": 8, "embed_dim": 8},
                                         {**TOWER, "image_size": 32, "patch_size": 16, "embed_dim": 4}],
             "fusion": {"name": "concat"}, **kw}
    part = EncoderPart.from_value(value, "model.encoder")
    torch.manual_seed(0)
    return ENCODERS.build(part.name, part.cfg)


def test_built_from_typed_parts_and_concat_by_hand() -> None:
    enc = _fused(grid=[2, 2])
    assert isinstance(enc, FusedEncoder) and isinstance(enc.cfg, FusedConfig)
    assert [t.embed_dim for t in enc.towers] == [8, 4] and (enc.embed_dim, enc.num_patches) == (12, 4)
    pixels = torch.randn(2, 6, 32, 32)
    with torch.no_grad():
        out = enc(pixels)[0]
        a = enc.towers[0](pixels[:, :3])[enc.towers[0].layers[-1]]  # [2, 16, 8] on its 4x4 grid
        b = enc.towers[1](pixels[:, 3:])[enc.towers[1].layers[-1]]  # [2, 4, 4] on 2x2
    # area resampling 4x4 -> 2x2 is the mean of each 2x2 block of tokens; concat joins the channels
    blocks = a.reshape(2, 2, 2, 2, 2, 8).permute(0, 1, 3, 2, 4, 5).reshape(2, 4, 4, 8).mean(2)
    assert out.shape == (2, 4, 12)
    torch.testing.assert_close(out, torch.cat([blocks, b], dim=-1), atol=1e-6, rtol=0)
    pooled = F.avg_pool2d(a.transpose(1, 2).reshape(2, 8, 4, 4), 2).flatten(2).transpose(1, 2)
    torch.testing.assert_close(blocks, pooled, atol=1e-6, rtol=0)


def test_same_modules_as_composing_by_hand() -> None:
    enc = _fused(grid=[2, 2])
    by_hand = FusedEncoder(list(enc.towers), enc.fusion, grid=[2, 2])
    pixels = torch.randn(1, 6, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(by_hand(pixels)[0], enc(pixels)[0])
    assert list(enc.state_dict()) == list(by_hand.state_dict())  # checkpoint names do not depend on the roof
