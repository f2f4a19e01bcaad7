"""TimmViTEncoder: parity with timm's own forward, layer taps, weights files, preprocessing."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from encoders.base import EncoderError
from encoders.dino import TimmViTConfig, TimmViTEncoder
from mllm.registry import ENCODERS

TINY = dict(image_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2)


def _enc(**kw: object) -> TimmViTEncoder:
    return TimmViTEncoder(TimmViTConfig(**{**TINY, **kw})).eval()


def test_normed_last_layer_equals_timm_forward_features() -> None:
    enc = _enc(norm=True)
    x = torch.randn(2, 3, 32, 32)
    out = enc(x)
    ref = enc.model.forward_features(x)[:, enc.model.num_prefix_tokens :]
    assert list(out) == [2] and out[2].shape == (2, 16, 32)
    torch.testing.assert_close(out[2], ref, atol=1e-6, rtol=0)


def test_taps_equal_block_outputs_read_by_hooks() -> None:
    """Raw (un-normed) block outputs, keys in the configured order, negative indices resolved."""
    enc = _enc(layers=[-1, 0, -2])
    seen: dict[int, torch.Tensor] = {}
    for i, blk in enumerate(enc.model.blocks):
        blk.register_forward_hook(lambda _m, _i, o, i=i: seen.__setitem__(i, o))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        enc.model.forward_features(x)
        ref = dict(seen)
        out = enc(x)
    assert enc.layers == [2, 0, 1] and list(out) == [2, 0, 1]
    prefix = enc.model.num_prefix_tokens
    for layer, tokens in out.items():
        torch.testing.assert_close(tokens, ref[layer][:, prefix:], atol=1e-6, rtol=0)
    assert not torch.allclose(out[0], out[2])


def test_keep_prefix_tokens_dinov2_registers() -> None:
    enc = TimmViTEncoder(
        TimmViTConfig(
            model_name="vit_small_patch14_reg4_dinov2", image_size=28, embed_dim=32, depth=2, num_heads=2,
            drop_prefix=False, norm=True,
        )
    ).eval()
    assert enc.model.num_prefix_tokens == 5  # CLS + 4 registers
    assert enc.grid_size == (2, 2) and enc.num_patches == 4 + 5
    x = torch.randn(1, 3, 28, 28)
    with torch.no_grad():
        out = enc(x)[1]
        ref = enc.model.forward_features(x)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)


def test_properties() -> None:
    enc = _enc()
    assert enc.embed_dim == 32 and enc.grid_size == (4, 4) and enc.num_patches == 16
    assert enc.image_size == (32, 32)
    assert enc.fsdp_unit is type(enc.model.blocks[0])


@pytest.mark.parametrize("layers", [[3], [-4], [0, 5]])
def test_out_of_range_layer(layers: list[int]) -> None:
    with pytest.raises(EncoderError, match="out of range for a 3-block encoder"):
        _enc(layers=layers)


def test_bad_model_and_sizes() -> None:
    with pytest.raises(EncoderError, match="model_name"):
        _enc(model_name="no_such_vit")
    with pytest.raises(EncoderError, match="image_size: 30 is not a multiple"):
        _enc(image_size=30)


def test_missing_weights_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(EncoderError, match=f"weights: file {missing} does not exist"):
        _enc(weights=str(missing))


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_saved_state_loads(tmp_path: Path, suffix: str) -> None:
    src = _enc()
    state = {k: v.contiguous() for k, v in src.model.state_dict().items()}
    path = tmp_path / f"vit{suffix}"
    save_file(state, str(path)) if suffix == ".safetensors" else torch.save(state, path)
    torch.manual_seed(123)  # a different random init, so equality proves the load
    dst = _enc(weights=str(path))
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(dst(x)[2], src(x)[2], atol=0, rtol=0)


def test_weights_resampled_to_new_image_size(tmp_path: Path) -> None:
    src = _enc()
    path = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in src.model.state_dict().items()}, str(path))
    dst = _enc(image_size=64, weights=str(path))  # pos_embed 4x4 grid -> 8x8 via timm's filter
    assert dst.model.pos_embed.shape[1] == 1 + 64
    torch.testing.assert_close(dst.model.blocks[0].attn.qkv.weight, src.model.blocks[0].attn.qkv.weight)


def test_mismatched_weights(tmp_path: Path) -> None:
    path = tmp_path / "wide.safetensors"
    wide = _enc(embed_dim=64, num_heads=2)
    save_file({k: v.contiguous() for k, v in wide.model.state_dict().items()}, str(path))
    with pytest.raises(EncoderError, match="does not match"):
        _enc(weights=str(path))


def test_frozen() -> None:
    enc = _enc(frozen=True)
    assert not any(p.requires_grad for p in enc.parameters())
    assert all(p.requires_grad for p in _enc().parameters())


def test_preprocess_squashes_without_crop_and_normalises() -> None:
    enc = _enc()  # vit_tiny_patch16_224 uses mean = std = 0.5
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    image.paste((0, 0, 255), (20, 0, 40, 20))  # right half blue
    pixels = enc.preprocess(image)
    assert pixels.shape == (3, 32, 32) and pixels.dtype == torch.float32
    # squash keeps both halves; a centre crop of the wider image would have cut the sides
    torch.testing.assert_close(pixels[:, :, :14], torch.tensor([1.0, -1.0, -1.0])[:, None, None].expand(3, 32, 14))
    torch.testing.assert_close(pixels[:, :, 18:], torch.tensor([-1.0, -1.0, 1.0])[:, None, None].expand(3, 32, 14))


def test_registry_entry() -> None:
    enc = ENCODERS.build("timm_vit", TimmViTConfig(**TINY))
    assert isinstance(enc, TimmViTEncoder) and ENCODERS.config_cls("timm_vit") is TimmViTConfig
