"""FlorenceEncoder: DaViT blocks, projected image tokens and prompt states against transformers'
own Florence-2 forward; grids, widths, folders and errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from transformers import (
    AutoImageProcessor,
    CLIPImageProcessor,
    Florence2Config,
    Florence2ForConditionalGeneration,
)

from encoders.base import EncoderError
from encoders.florence import FlorenceConfig, FlorenceEncoder

VISION = dict(
    depths=[1, 1, 2, 1], embed_dim=[8, 16, 32, 64], num_heads=[1, 2, 2, 4], num_groups=[1, 2, 2, 4],
    window_size=2, projection_dim=32, drop_path_rate=0.0, max_position_embeddings=16,
)
TEXT = dict(
    d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
    encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=100, max_position_embeddings=64, pad_token_id=1,
)
IMAGE_TOKEN = 99
PROMPTS = [[0, 5, 6, 7, 2], [0, 8, 2]]  # bos ... eos, of different lengths (padding must be masked)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A transformers-format Florence-2 checkpoint (with its image processor) at 64 px."""
    path = tmp_path_factory.mktemp("florence2")
    torch.manual_seed(0)
    config = Florence2Config(vision_config=VISION, text_config=TEXT, image_token_id=IMAGE_TOKEN)
    Florence2ForConditionalGeneration(config).save_pretrained(path)
    CLIPImageProcessor(size={"height": 64, "width": 64}, do_center_crop=False).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def reference(folder: Path) -> Florence2ForConditionalGeneration:
    return Florence2ForConditionalGeneration.from_pretrained(folder).eval()


def _enc(folder: Path, **kw: Any) -> FlorenceEncoder:
    return FlorenceEncoder(FlorenceConfig(path=str(folder), **kw))


def test_davit_blocks_equal_library_backbone(folder: Path, reference: Any) -> None:
    enc = _enc(folder, layers=[-1])
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = enc(x)
        ref = reference.model.vision_tower(x, output_hidden_states=True)
    assert enc.layers == [4] and enc.grid_size == (2, 2) and enc.num_patches == 4 and enc.embed_dim == 64
    torch.testing.assert_close(out[4], ref.last_hidden_state.flatten(2).transpose(1, 2), atol=1e-6, rtol=0)


def test_stage_taps_on_their_own_grid(folder: Path, reference: Any) -> None:
    enc = _enc(folder, layers=[2, 3])
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = enc(x)
        hidden = reference.model.vision_tower(x, output_hidden_states=True).hidden_states
    assert enc.grid_size == (4, 4) and enc.embed_dim == 32
    for block in (2, 3):
        torch.testing.assert_close(out[block], hidden[block + 1].flatten(2).transpose(1, 2), atol=1e-6, rtol=0)


def test_image_features_equal_get_image_features(folder: Path, reference: Any) -> None:
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = reference.model.get_image_features(x).pooler_output  # [B, 1 + 4, 32]
        kept = _enc(folder, layers=[], image_features=True, drop_prefix=False)(x)[5]
        dropped = _enc(folder, layers=[], image_features=True)(x)[5]
    torch.testing.assert_close(kept, ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(dropped, ref[:, 1:], atol=1e-6, rtol=0)


def test_prompt_states_equal_florence2_encoder_outputs(folder: Path, reference: Any) -> None:
    """Breadth features: the library's encoder run on ``[<image> x 5; prompt]``, image positions."""
    enc = _enc(folder, layers=[], image_features=True, prompts=PROMPTS, drop_prefix=False)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = enc(x)
        for k, prompt in enumerate(PROMPTS):
            ids = torch.tensor([[IMAGE_TOKEN] * 5 + prompt] * 2)
            ref = reference.model(input_ids=ids, pixel_values=x).encoder_last_hidden_state[:, :5]
            torch.testing.assert_close(out[6 + k], ref, atol=1e-5, rtol=0)
    assert enc.layers == [5, 6, 7] and not torch.allclose(out[6], out[7])


def test_common_grid_is_explicit(folder: Path) -> None:
    with pytest.raises(EncoderError, match=r"grid: the tapped layers lie on grids \[\(2, 2\), \(4, 4\)\]"):
        _enc(folder, layers=[3, 4])
    enc = _enc(folder, layers=[3, 4], grid=[2, 2], grid_mode="area")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        out = enc(x)
        own = _enc(folder, layers=[3])(x)[3]  # on its 4x4 grid
    pooled = torch.nn.functional.avg_pool2d(own.transpose(1, 2).reshape(1, 32, 4, 4), 2).flatten(2).transpose(1, 2)
    torch.testing.assert_close(out[3], pooled, atol=1e-6, rtol=0)
    assert enc.layer_dims == {3: 32, 4: 64}
    with pytest.raises(EncoderError, match="widths .*fused encoder"):
        _ = enc.embed_dim


def test_preprocess_is_the_folder_processor(folder: Path, astronaut: Image.Image) -> None:
    expected = AutoImageProcessor.from_pretrained(folder)(images=astronaut, return_tensors="pt")["pixel_values"][0]
    out = _enc(folder).preprocess(astronaut)
    assert out.shape == (3, 64, 64)
    torch.testing.assert_close(out, expected, atol=0, rtol=0)


def test_random_init_and_errors(folder: Path, tmp_path: Path) -> None:
    proc = {"image_processor_type": "CLIPImageProcessor", "size": {"height": 64, "width": 64}, "do_center_crop": False}
    enc = FlorenceEncoder(FlorenceConfig(vision=VISION, text=TEXT, processor=proc, prompts=[[0, 2]]))
    assert enc.frozen and not enc.train().training and enc.fsdp_unit.__name__ == "Florence2VisionBlock"
    with pytest.raises(EncoderError, match=f"encoder.path: {tmp_path} is not a folder with a transformers"):
        _enc(tmp_path)
    with pytest.raises(EncoderError, match=r"prompts\[0\]: token ids \[100\] outside the vocabulary of 100"):
        _enc(folder, prompts=[[0, 100]])
    with pytest.raises(EncoderError, match="drop_prefix: keeping the global token"):
        _enc(folder, layers=[4], image_features=True, drop_prefix=False)
    with pytest.raises(EncoderError, match="must equal vision.projection_dim"):
        FlorenceEncoder(FlorenceConfig(vision=VISION, text={**TEXT, "d_model": 16}, processor=proc, prompts=[[0]]))
    with pytest.raises(ValueError, match="tap a block, or set image_features or prompts"):
        FlorenceConfig(layers=[])
