"""FusedEncoder: per-tower transforms packed into one tensor, explicit grid alignment, the fusion's
output as the only layer, train/eval of frozen towers, and YAML parts parsed once into typed parts."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from encoders.base import EncoderError, VisionEncoder
from encoders.fused import FusedEncoder
from mllm.config import ConfigError, EncoderPart, FusionPart
from mllm.fused import FusedConfig

TEXT = dict(context_length=8, vocab_size=64, width=16, heads=2, layers=1)
CLIP_TOWER: dict[str, Any] = {  # open_clip ViT, 32 px / patch 8 -> 4x4 grid, width 32, CLIP mean/std
    "name": "open_clip",
    "overrides": {"vision_cfg": dict(image_size=32, patch_size=8, width=32, layers=2, head_width=16), "text_cfg": TEXT, "embed_dim": 16},
    "layers": [-1],
}
SIGLIP_TOWER: dict[str, Any] = {  # transformers SigLIP, 48 px / patch 24 -> 2x2 grid, width 16, mean/std 0.5
    "name": "hf_vision",
    "model_type": "siglip_vision_model",
    "arch": dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=48, patch_size=24),
    "processor": {"image_processor_type": "SiglipImageProcessor", "size": {"height": 48, "width": 48}},
    "layers": [-1],
}


@pytest.fixture()
def fused(build_encoder: Callable[[EncoderPart], VisionEncoder]) -> Callable[..., FusedEncoder]:
    def make(**kw: Any) -> FusedEncoder:
        value = {"name": "fused", "towers": [CLIP_TOWER, SIGLIP_TOWER], "fusion": {"name": "concat"}, **kw}
        encoder = build_encoder(EncoderPart.from_value(value, "model.encoder"))
        assert isinstance(encoder, FusedEncoder)
        return encoder

    return make


def test_per_tower_transforms_are_packed_losslessly(astronaut: Image.Image, fused: Callable[..., FusedEncoder]) -> None:
    enc = fused(grid=[2, 2])
    clip, siglip = enc.towers
    packed = enc.preprocess(astronaut)
    assert packed.shape == (6, 48, 48) and enc.image_size == (48, 48)
    assert torch.equal(packed[:3, :32, :32], clip.preprocess(astronaut))
    assert torch.equal(packed[3:], siglip.preprocess(astronaut))
    assert not packed[:3, 32:].any() and not packed[:3, :, 32:].any()  # zero padding around the 32 px tower
    assert not torch.allclose(packed[:3, :32, :32], packed[3:, :32, :32])  # different mean/std


def test_forward_resamples_then_fuses(astronaut: Image.Image, fused: Callable[..., FusedEncoder]) -> None:
    enc = fused(grid=[2, 2], grid_mode="area")
    clip, siglip = enc.towers
    batch = torch.stack([enc.preprocess(astronaut), enc.preprocess(astronaut.rotate(90))])
    with torch.no_grad():
        out = enc(batch)
        a = clip(batch[:, :3, :32, :32])[1]  # [2, 16, 32] on 4x4
        b = siglip(batch[:, 3:])[1]  # [2, 4, 16] on 2x2
    pooled = F.avg_pool2d(a.transpose(1, 2).reshape(2, 32, 4, 4), 2).flatten(2).transpose(1, 2)
    assert list(out) == [0] and enc.layers == [0]
    torch.testing.assert_close(out[0], torch.cat([pooled, b], dim=-1), atol=1e-6, rtol=0)
    assert (enc.embed_dim, enc.grid_size, enc.num_patches) == (48, (2, 2), 4)
    assert enc.fsdp_unit is clip.fsdp_unit


def test_grid_mismatch_is_never_silent(fused: Callable[..., FusedEncoder]) -> None:
    with pytest.raises(EncoderError, match=r"needs one token grid, found towers\[0\] \(4, 4\) .*set the fused encoder's grid"):
        fused()
    with pytest.raises(EncoderError, match=r"towers\[0\]: keeps 1 prefix token\(s\), which cannot be resampled"):
        fused(towers=[{**CLIP_TOWER, "drop_prefix": False}, SIGLIP_TOWER], grid=[2, 2])


def test_ftz_needs_no_common_grid(fused: Callable[..., FusedEncoder]) -> None:
    enc = fused(fusion={"name": "ftz", "heads": 2})
    assert (enc.embed_dim, enc.grid_size, enc.num_patches) == (32, (4, 4), 16)  # the anchor's


def test_wrong_pixels_are_refused(fused: Callable[..., FusedEncoder]) -> None:
    with pytest.raises(EncoderError, match="pixels have 3 channels, expected 6"):
        fused(grid=[2, 2])(torch.randn(1, 3, 48, 48))


def test_frozen_towers_stay_in_eval_while_the_fusion_trains(fused: Callable[..., FusedEncoder]) -> None:
    enc = fused(fusion={"name": "comm"}, grid=[2, 2]).train()
    assert enc.training and enc.fusion.training
    assert not any(t.training for t in enc.towers)
    assert not any(p.requires_grad for p in enc.towers.parameters())
    assert all(p.requires_grad for p in enc.fusion.parameters())


def test_parts_are_validated_by_the_config_layer(fused: Callable[..., FusedEncoder]) -> None:
    part = EncoderPart.from_value({"name": "fused", "towers": [CLIP_TOWER], "fusion": {"name": "concat"}}, "model.encoder")
    assert isinstance(part.cfg, FusedConfig) and part.cfg.grid_mode == "area"
    assert [type(t) for t in part.cfg.towers] == [EncoderPart] and isinstance(part.cfg.fusion, FusionPart)
    assert part.cfg.towers[0].cfg.layers == [-1]  # a typed tower config, not a mapping
    with pytest.raises(ConfigError, match=r"towers\[0\]: expected a mapping with a 'name' key"):
        EncoderPart.from_value({"name": "fused", "towers": [{"layers": [-1]}], "fusion": {"name": "concat"}}, "e")
    with pytest.raises(ConfigError, match=r"e.name: unknown encoder fusion 'nope' \(expected one of: comm, concat"):
        FusionPart.from_value({"name": "nope"}, "e")
    with pytest.raises(ConfigError, match="e.mlp_ratio: expected a number"):
        FusionPart.from_value({"name": "comm", "mlp_ratio": "big"}, "e")
    with pytest.raises(ConfigError, match="e.grid_mode: expected one of"):
        EncoderPart.from_value({"name": "fused", "towers": [CLIP_TOWER], "fusion": {"name": "concat"}, "grid_mode": "x"}, "e")
    with pytest.raises(ConfigError, match=r"encoder.towers\[0\].widht: unknown key"):
        fused(towers=[{**CLIP_TOWER, "widht": 3}, SIGLIP_TOWER])


def test_forward_towers_returns_the_tower_features_and_keeps_nothing(fused: Callable[..., FusedEncoder]) -> None:
    enc = fused(grid=[2, 2])
    pixels = torch.randn(2, 6, 48, 48)
    with torch.no_grad():
        out, towers = enc.forward_towers(pixels)
        feats = enc.tower_features(pixels)
        torch.testing.assert_close(out[0], enc(pixels)[0])
    assert [t.shape for t in towers] == [(2, 4, 32), (2, 4, 16)]  # each tower's last layer on the 2x2 grid
    for tower, layers in zip(towers, feats, strict=True):
        torch.testing.assert_close(tower, layers[-1])
    before = dict(vars(enc))
    enc(pixels)
    assert vars(enc).keys() == before.keys()  # no state left on the module by a call
