"""OpenClipEncoder: parity with open_clip's own forward and transforms, taps, weights files, errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import open_clip
import pytest
import torch
from open_clip.transform import PreprocessCfg, image_transform_v2
from PIL import Image
from safetensors.torch import save_file

from encoders.base import EncoderError
from encoders.clip import OpenClipConfig, OpenClipEncoder

TEXT = dict(context_length=8, vocab_size=64, width=16, heads=2, layers=1)
VIT: dict[str, Any] = dict(vision_cfg=dict(image_size=32, patch_size=8, width=32, layers=3, head_width=16), text_cfg=TEXT, embed_dim=16)
CONVNEXT: dict[str, Any] = dict(vision_cfg=dict(timm_model_name="convnext_atto", image_size=64), text_cfg=TEXT, embed_dim=16)


def _enc(overrides: dict[str, Any] = VIT, **kw: Any) -> OpenClipEncoder:
    return OpenClipEncoder(OpenClipConfig(overrides=overrides, **kw))


def test_normed_last_layer_reproduces_open_clip_image_features() -> None:
    """``LN_post`` of the last tap, CLS token times ``proj``, is exactly ``visual(x)``."""
    enc = _enc(drop_prefix=False, norm=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = enc(x)
        ref = enc.visual(x)
    assert list(out) == [2] and out[2].shape == (2, 1 + 16, 32)
    torch.testing.assert_close(out[2][:, 0] @ enc.visual.proj, ref, atol=1e-6, rtol=0)


def test_raw_taps_equal_residual_blocks_read_by_hooks() -> None:
    enc = _enc(layers=[-1, 0, -2])
    seen: dict[int, torch.Tensor] = {}
    for i, blk in enumerate(enc.visual.transformer.resblocks):
        blk.register_forward_hook(lambda _m, _i, o, i=i: seen.__setitem__(i, o))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        enc.visual(x)
        ref = dict(seen)
        out = enc(x)
    assert enc.layers == [2, 0, 1] and list(out) == [2, 0, 1]
    for layer, tokens in out.items():
        assert tokens.shape == (2, 16, 32)
        torch.testing.assert_close(tokens, ref[layer][:, 1:], atol=1e-6, rtol=0)
    assert not torch.allclose(out[0], out[2])


def test_convnext_stage_equals_timm_forward_features() -> None:
    enc = _enc(CONVNEXT)
    assert enc.grid_size == (2, 2) and enc.embed_dim == 320 and enc.num_patches == 4
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = enc(x)[3]
        ref = enc.visual.trunk.forward_features(x)  # [B, C, 2, 2]
    torch.testing.assert_close(out, ref.flatten(2).transpose(1, 2), atol=1e-6, rtol=0)
    with pytest.raises(EncoderError, match="span stages of widths"):
        _enc(CONVNEXT, layers=[2, 3])


def test_preprocess_equals_open_clip_val_transform(astronaut: Image.Image) -> None:
    enc = _enc()
    _, _, ref = open_clip.create_model_and_transforms("ViT-B-32", pretrained=None, **VIT)
    out = enc.preprocess(astronaut)
    assert out.shape == (3, 32, 32)
    torch.testing.assert_close(out, ref(astronaut), atol=0, rtol=0)


def test_tag_preprocessing_comes_from_open_clip_table(astronaut: Image.Image) -> None:
    """SigLIP's webli tag: mean = std = 0.5 and squash resizing, with no download."""
    enc = OpenClipEncoder(OpenClipConfig(model="ViT-B-16-SigLIP", tag="webli", overrides=VIT))
    cfg = PreprocessCfg(size=32, mean=(0.5,) * 3, std=(0.5,) * 3, interpolation="bicubic", resize_mode="squash")
    torch.testing.assert_close(enc.preprocess(astronaut), image_transform_v2(cfg, is_train=False)(astronaut), atol=0, rtol=0)
    with pytest.raises(EncoderError, match="tag: 'nope' is not an open_clip pretrained tag"):
        OpenClipEncoder(OpenClipConfig(tag="nope", overrides=VIT))


def test_weights_file_round_trip_and_mismatch(tmp_path: Path) -> None:
    source = open_clip.create_model("ViT-B-32", pretrained=None, **VIT).eval()
    save_file(source.state_dict(), str(tmp_path / "clip.safetensors"))
    enc = _enc(weights=str(tmp_path / "clip.safetensors"), drop_prefix=False, norm=True)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(enc(x)[2][:, 0] @ enc.visual.proj, source.visual(x), atol=1e-6, rtol=0)
    wide = {**VIT, "vision_cfg": {**VIT["vision_cfg"], "width": 48}}
    with pytest.raises(EncoderError, match="clip.safetensors does not match ViT-B-32"):
        _enc(wide, weights=str(tmp_path / "clip.safetensors"))


def test_bad_paths_and_names(tmp_path: Path) -> None:
    with pytest.raises(EncoderError, match=f"weights: file {tmp_path / 'missing.pt'} does not exist"):
        _enc(weights=str(tmp_path / "missing.pt"))
    with pytest.raises(EncoderError, match="model: folder .* does not exist"):
        OpenClipEncoder(OpenClipConfig(model=f"local-dir:{tmp_path / 'nothing'}"))
    with pytest.raises(EncoderError, match="model: cannot build open_clip model 'ViT-Nope'"):
        OpenClipEncoder(OpenClipConfig(model="ViT-Nope"))
    with pytest.raises(ValueError, match="downloads from the hub"):
        OpenClipConfig(model="hf-hub:timm/ViT-B-16-SigLIP")
    with pytest.raises(ValueError, match="preprocess.crop: unknown key"):
        OpenClipConfig(preprocess={"crop": 1})
    with pytest.raises(EncoderError, match="out of range for a 3-block encoder"):
        _enc(layers=[3])


def test_frozen_by_default_and_stays_in_eval_mode() -> None:
    enc = _enc()
    assert enc.frozen and not any(p.requires_grad for p in enc.parameters())
    enc.train()
    assert not enc.training and not enc.visual.training
    trainable = _enc(frozen=False).train()
    assert trainable.training and all(p.requires_grad for p in trainable.parameters())


def test_properties() -> None:
    enc = _enc(drop_prefix=False)
    assert (enc.embed_dim, enc.grid_size, enc.num_patches, enc.image_size) == (32, (4, 4), 17, (32, 32))
    assert enc.layer_dims == {2: 32}
    assert enc.fsdp_unit is type(enc.visual.transformer.resblocks[0])


def test_image_size_override_resizes_tower_and_transform(astronaut: Image.Image) -> None:
    """MG-LLaVA runs ConvNeXt CLIP at 768 px instead of its native 320: ``image_size`` forces it."""
    enc = _enc({"text_cfg": TEXT, "embed_dim": 16}, model="convnext_tiny", image_size=96)
    assert enc.image_size == (96, 96) and enc.grid_size == (3, 3) and enc.embed_dim == 768
    assert enc.preprocess(astronaut).shape == (3, 96, 96)
    with torch.no_grad():
        assert enc(torch.randn(1, 3, 96, 96))[3].shape == (1, 9, 768)
    with pytest.raises(ValueError, match="with overrides.vision_cfg, set image_size inside vision_cfg"):
        OpenClipConfig(overrides=CONVNEXT, image_size=96)
