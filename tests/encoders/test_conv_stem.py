"""Conv stem (Xiao et al. 2021) in a timm ViT, an open_clip ViT and Florence-2's DaViT: layer widths, token grid, values, errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from encoders.base import EncoderError
from encoders.clip import OpenClipConfig, OpenClipEncoder
from encoders.conv_stem import ConvStemEmbed
from encoders.dino import TimmViTConfig, TimmViTEncoder
from encoders.florence import FlorenceConfig, FlorenceEncoder


def _enc(**kw: object) -> TimmViTEncoder:
    cfg = dict(image_size=64, patch_size=16, embed_dim=32, depth=2, num_heads=2, stem="conv")
    return TimmViTEncoder(TimmViTConfig(**{**cfg, **kw})).eval()


def test_stem_layers_and_token_grid() -> None:
    enc = _enc()
    stem = enc.model.patch_embed
    assert isinstance(stem, ConvStemEmbed) and stem.grid_size == (4, 4) and stem.num_patches == 16
    convs = [m for m in stem.proj if isinstance(m, nn.Conv2d)]
    # log2(16) = 4 stride-2 3x3 convs, widths doubling up to embed_dim, then a 1x1 projection
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.stride) for c in convs] == [
        (3, 8, (3, 3), (2, 2)), (8, 8, (3, 3), (2, 2)), (8, 16, (3, 3), (2, 2)), (16, 32, (3, 3), (2, 2)),
        (32, 32, (1, 1), (1, 1)),
    ]
    assert sum(isinstance(m, nn.BatchNorm2d) for m in stem.proj) == 4
    out = enc(torch.randn(3, 3, 64, 64))
    assert out[1].shape == (3, 16, 32)


def test_stem_width_sets_the_first_conv_and_doubles_up_to_the_embedding() -> None:
    convs = [m for m in _enc(embed_dim=128, stem_width=32).model.patch_embed.proj if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(3, 32), (32, 64), (64, 128), (128, 128), (128, 128)]
    paper = ConvStemEmbed(img_size=224, patch_size=16, embed_dim=768, first_width=64)  # Xiao et al.'s ViT-B/16 stem
    assert [m.out_channels for m in paper.proj if isinstance(m, nn.Conv2d)] == [64, 128, 256, 512, 768]
    with pytest.raises(EncoderError, match="stem_width: expected a positive number of channels, got 0"):
        _enc(stem_width=0)


def test_stem_is_equivariant_to_shifts_by_one_patch() -> None:
    """A shift by the total stride (16 px) moves each interior token by one grid cell, unchanged:
    tokens (1, 1) and (1, 2) of a 4x4 grid see 31-px fields that never reach the zero padding."""
    torch.manual_seed(0)
    stem = _enc().model.patch_embed.proj.eval()
    x = torch.zeros(1, 3, 64, 64)
    x[:, :, 18:30, 20:27] = torch.randn(3, 12, 7)
    shifted = torch.roll(x, shifts=16, dims=3)  # the rolled-in columns are zeros
    with torch.no_grad():
        a, b = stem(x), stem(shifted)
    torch.testing.assert_close(b[..., 1, 2], a[..., 1, 1], atol=1e-5, rtol=0)
    torch.testing.assert_close(b[..., 2, 2], a[..., 2, 1], atol=1e-5, rtol=0)
    assert not torch.allclose(a[..., 1, 1], a[..., 1, 2], atol=1e-3)


def test_gradients_reach_the_stem() -> None:
    enc = _enc().train()
    enc(torch.randn(4, 3, 64, 64))[1].square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in enc.model.patch_embed.parameters())


def test_stem_errors() -> None:
    with pytest.raises(EncoderError, match="power-of-two patch size"):
        _enc(image_size=56, patch_size=14)
    with pytest.raises(ValueError, match="stem: expected patch or conv"):
        TimmViTConfig(stem="resnet")
    with pytest.raises(ValueError, match="stem_width: sets the conv stem's channels; this encoder has stem: patch"):
        TimmViTConfig(stem_width=32)
    with pytest.raises(ValueError, match="no pretrained weights"):
        TimmViTConfig(stem="conv", weights="vit.safetensors")


CLIP_VIT = dict(
    vision_cfg=dict(image_size=32, patch_size=8, width=32, layers=2, head_width=16),
    text_cfg=dict(context_length=8, vocab_size=64, width=16, heads=2, layers=1), embed_dim=16,
)


def test_open_clip_vit_takes_the_stem_in_place_of_its_patchify() -> None:
    """The tapped block equals Block_0(LN_pre([cls; Stem(x)] + pos)) recomputed from the tower's own parts."""
    enc = OpenClipEncoder(OpenClipConfig(model="ViT-B-16", overrides=CLIP_VIT, stem="conv", stem_width=8, layers=[0])).eval()
    visual = enc.visual
    convs = [m for m in visual.conv1 if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.stride) for c in convs] == [
        (3, 8, (2, 2)), (8, 16, (2, 2)), (16, 32, (2, 2)), (32, 32, (1, 1)),
    ]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = enc(x)[0]
        tokens = visual.conv1(x).flatten(2).transpose(1, 2)  # [2, 16, 32]
        cls = visual.class_embedding.expand(2, 1, -1)
        seq = visual.ln_pre(torch.cat([cls, tokens], dim=1) + visual.positional_embedding)
        ref = visual.transformer.resblocks[0](seq)[:, 1:]
    assert out.shape == (2, 16, 32)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)


def test_open_clip_stem_errors() -> None:
    with pytest.raises(ValueError, match="stem: expected patch or conv"):
        OpenClipConfig(stem="resnet")
    with pytest.raises(ValueError, match="no pretrained weights"):
        OpenClipConfig(stem="conv", weights="clip.safetensors")
    with pytest.raises(ValueError, match="no pretrained weights"):
        OpenClipConfig(model="local-dir:/ckpt/clip", stem="conv")
    convnext = dict(vision_cfg=dict(timm_model_name="convnext_atto", image_size=64), text_cfg=CLIP_VIT["text_cfg"], embed_dim=16)
    with pytest.raises(EncoderError, match="stem: conv replaces a ViT's patchify; convnext_base is a TimmModel"):
        OpenClipEncoder(OpenClipConfig(model="convnext_base", overrides=convnext, stem="conv"))


FLORENCE_VISION = dict(
    depths=[1, 1], embed_dim=[16, 32], num_heads=[1, 2], num_groups=[1, 2], window_size=2, projection_dim=32,
    drop_path_rate=0.0, max_position_embeddings=16,
)
PROCESSOR = dict(image_processor_type="CLIPImageProcessor", size={"height": 64, "width": 64}, do_center_crop=False)


def test_florence_davit_takes_the_stem_in_place_of_its_stage_one_embed() -> None:
    """Stride 4 -> two 3x3 stride-2 convs; same grids as the 7x7/4 embed; block 0 = Block_0(LN(Stem(x)))."""
    patch = FlorenceEncoder(FlorenceConfig(vision=FLORENCE_VISION, processor=PROCESSOR, layers=[0, 1], grid=[2, 2]))
    enc = FlorenceEncoder(
        FlorenceConfig(vision=FLORENCE_VISION, processor=PROCESSOR, layers=[0, 1], grid=[2, 2], stem="conv", stem_width=8)
    ).eval()
    embed = enc.davit.convs[0]
    convs = [m for m in embed.conv if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.stride) for c in convs] == [
        (3, 8, (3, 3), (2, 2)), (8, 16, (3, 3), (2, 2)), (16, 16, (1, 1), (1, 1)),
    ]
    assert enc._tap_grids == patch._tap_grids == {0: (16, 16), 1: (8, 8)}
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        stem = embed.norm(embed.conv(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # post-norm, as DaViT's stage 1
        ref = enc.davit.blocks[0][0](stem)
        out = enc.davit(x, output_hidden_states=True).hidden_states[1]
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)
    assert enc(x)[0].shape == (2, 4, 16)


def test_florence_stem_errors() -> None:
    with pytest.raises(ValueError, match="no pretrained weights"):
        FlorenceConfig(path="/ckpt/florence2", stem="conv")
    with pytest.raises(ValueError, match="stem: expected patch or conv"):
        FlorenceConfig(stem="resnet")
    odd = {**FLORENCE_VISION, "patch_size": [7, 3], "patch_stride": [3, 2], "patch_padding": [3, 1]}
    with pytest.raises(EncoderError, match="power-of-two patch size"):
        FlorenceEncoder(FlorenceConfig(vision=odd, processor=PROCESSOR, stem="conv"))
