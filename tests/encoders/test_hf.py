"""HFVisionEncoder: parity with transformers' own forward and image processors, prefix handling,
local folders (single- and dual-tower checkpoints), errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor, CLIPConfig, CLIPImageProcessor, CLIPModel, SiglipImageProcessor

from encoders.base import EncoderError
from encoders.hf import HFVisionConfig, HFVisionEncoder, block_list

ARCH = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, image_size=32, patch_size=8)
SIGLIP_PROC = {"image_processor_type": "SiglipImageProcessor", "size": {"height": 32, "width": 32}}
CROP_PROC = {"size": {"shortest_edge": 40}, "crop_size": {"height": 32, "width": 32}}
CASES: dict[str, tuple[dict[str, Any], dict[str, Any], int]] = {  # model_type: (extra arch, processor, prefix)
    "clip_vision_model": ({}, {"image_processor_type": "CLIPImageProcessor", **CROP_PROC}, 1),
    "siglip_vision_model": ({}, SIGLIP_PROC, 0),
    "dinov2": ({}, {"image_processor_type": "BitImageProcessor", **CROP_PROC}, 1),
    "dinov2_with_registers": ({"num_register_tokens": 4}, {"image_processor_type": "BitImageProcessor", **CROP_PROC}, 5),
}


def _enc(model_type: str = "siglip_vision_model", **kw: Any) -> HFVisionEncoder:
    extra, processor, _ = CASES[model_type]
    return HFVisionEncoder(HFVisionConfig(model_type=model_type, arch={**ARCH, **extra}, processor=processor, **kw))


def _block_outputs(enc: HFVisionEncoder, x: torch.Tensor) -> dict[int, torch.Tensor]:
    seen: dict[int, torch.Tensor] = {}
    blocks = block_list(enc.model, enc.model.config.num_hidden_layers, "test")
    handles = [
        blk.register_forward_hook(lambda _m, _i, o, i=i: seen.__setitem__(i, o[0] if isinstance(o, tuple) else o))
        for i, blk in enumerate(blocks)
    ]
    with torch.no_grad():
        enc.model(pixel_values=x)
    for handle in handles:
        handle.remove()
    return seen


@pytest.mark.parametrize("model_type", list(CASES))
def test_taps_equal_library_blocks_and_prefix_is_counted(model_type: str) -> None:
    prefix = CASES[model_type][2]
    enc = _enc(model_type, layers=[-1, 0])
    x = torch.randn(2, 3, 32, 32)
    ref = _block_outputs(enc, x)
    with torch.no_grad():
        out = enc(x)
        full = _enc(model_type, layers=[-1], drop_prefix=False)
        full.load_state_dict(enc.state_dict())
        kept = full(x)[2]
    assert enc.layers == [2, 0] and list(out) == [2, 0]
    assert enc.num_patches == 16 and full.num_patches == 16 + prefix
    for layer in (2, 0):
        assert out[layer].shape == (2, 16, 32)
        torch.testing.assert_close(out[layer], ref[layer][:, prefix:], atol=1e-6, rtol=0)
    torch.testing.assert_close(kept, ref[2], atol=1e-6, rtol=0)


def test_clip_last_layer_equals_last_hidden_state() -> None:
    """CLIPVisionModel's ``last_hidden_state`` is the raw output of the last block."""
    enc = _enc("clip_vision_model", drop_prefix=False)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(enc(x)[2], enc.model(pixel_values=x).last_hidden_state, atol=1e-6, rtol=0)


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A dual-tower CLIPModel checkpoint with its image processor, as LLaVA users have it."""
    folder = tmp_path_factory.mktemp("clip")
    text = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=64)
    CLIPModel(CLIPConfig(vision_config=ARCH, text_config=text, projection_dim=8)).save_pretrained(folder)
    CLIPImageProcessor(**CROP_PROC).save_pretrained(folder)
    return folder


def test_dual_tower_folder_loads_vision_tower_and_its_processor(clip_folder: Path, astronaut: Image.Image) -> None:
    reference = CLIPModel.from_pretrained(clip_folder).eval()
    enc = HFVisionEncoder(HFVisionConfig(path=str(clip_folder), layers=[-1], drop_prefix=False))
    assert type(enc.model).__name__ == "CLIPVisionModel"
    pixels = enc.preprocess(astronaut)
    expected = AutoImageProcessor.from_pretrained(clip_folder)(images=astronaut, return_tensors="pt")["pixel_values"]
    assert pixels.shape == (3, 32, 32)
    torch.testing.assert_close(pixels, expected[0], atol=0, rtol=0)
    with torch.no_grad():
        out = enc(pixels[None])[2]
        ref = reference.vision_model(pixel_values=pixels[None]).last_hidden_state
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)


def test_processor_overrides_apply_to_folder_processor(clip_folder: Path) -> None:
    enc = HFVisionEncoder(HFVisionConfig(path=str(clip_folder), processor={"image_mean": [0.5, 0.5, 0.5]}))
    assert list(enc._processor.image_mean) == [0.5, 0.5, 0.5]


def test_processor_from_config_equals_library_class(astronaut: Image.Image) -> None:
    enc = _enc("siglip_vision_model")
    expected = SiglipImageProcessor(size={"height": 32, "width": 32})(images=astronaut, return_tensors="pt")
    torch.testing.assert_close(enc.preprocess(astronaut), expected["pixel_values"][0], atol=0, rtol=0)


def test_errors(tmp_path: Path, clip_folder: Path) -> None:
    with pytest.raises(EncoderError, match=f"encoder.path: {tmp_path / 'nope'} is not a folder"):
        HFVisionEncoder(HFVisionConfig(path=str(tmp_path / "nope")))
    (tmp_path / "config_only").mkdir()
    (tmp_path / "config_only" / "config.json").write_text((clip_folder / "config.json").read_text())
    with pytest.raises(EncoderError, match="encoder.path: cannot load .*config_only"):
        HFVisionEncoder(HFVisionConfig(path=str(tmp_path / "config_only")))
    with pytest.raises(EncoderError, match="processor: random init; give the processor config"):
        HFVisionEncoder(HFVisionConfig(model_type="siglip_vision_model", arch=ARCH))
    with pytest.raises(EncoderError, match="'NopeProcessor' is not a transformers image processor"):
        HFVisionEncoder(HFVisionConfig(arch=ARCH, processor={"image_processor_type": "NopeProcessor"}))
    shortest = {"image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": 32}, "do_center_crop": False}
    with pytest.raises(EncoderError, match="output size depends on the image's aspect ratio"):
        HFVisionEncoder(HFVisionConfig(arch=ARCH, processor=shortest))
    with pytest.raises(EncoderError, match="cannot build a 'nope' config"):
        HFVisionEncoder(HFVisionConfig(model_type="nope", processor=SIGLIP_PROC))
    with pytest.raises(EncoderError, match="out of range for a 3-block encoder"):
        _enc(layers=[-4])


def test_frozen_default_and_properties() -> None:
    enc = _enc("dinov2_with_registers")
    assert enc.frozen and not any(p.requires_grad for p in enc.parameters())
    assert not enc.train().training
    assert (enc.embed_dim, enc.grid_size, enc.image_size) == (32, (4, 4), (32, 32))
    assert enc.fsdp_unit.__name__ == "Dinov2WithRegistersLayer"
