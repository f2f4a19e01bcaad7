"""HF LLaVA interop: import a transformers Llava folder, export ours, identical logits both ways.

Tiny random Llavas (CLIP / SigLIP towers of 3 blocks at 32 px, patch 8 -> 16 patches; Llama /
Qwen2 / Mistral LLMs of 2 layers) are saved with ``save_pretrained`` together with a
``LlavaProcessor`` built from the locally trained word tokenizer (``<image>`` = id 4).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from transformers import (
    AutoProcessor,
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    MistralConfig,
    Qwen2Config,
    SiglipImageProcessor,
    SiglipVisionConfig,
)

from mllm.cli import main
from mllm.config import ModelConfig, from_dict
from mllm.hf import HFInteropError, export_llava, import_llava, llava_layer_to_ours, ours_to_llava_layer
from mllm.model import MLLM
from train.data.collate import Collator
from train.templates import encode_prompt

TOWER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, image_size=32, patch_size=8)
VISION = {  # (config, image processor, prefix tokens)
    "clip": (CLIPVisionConfig(**TOWER), CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}), 1),
    "siglip": (SiglipVisionConfig(**TOWER), SiglipImageProcessor(size={"height": 32, "width": 32}), 0),
}
LM = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
          initializer_range=0.2, pad_token_id=0, bos_token_id=1, eos_token_id=2)
TEXT = {"llama": (LlamaConfig, {"tie_word_embeddings": True}), "qwen2": (Qwen2Config, {}),
        "mistral": (MistralConfig, {"head_dim": 8})}
CASES = {  # vision, text, vision_feature_layer, strategy, projector bias
    #   -> our layers, drop_prefix, image tokens; vision_feature_layer exported back
    "clip-llama": (("clip", "llama", -2, "default", True), ([1], True, 16, -2)),
    "siglip-qwen2": (("siglip", "qwen2", [-1, 1], "full", True), ([2, 0], False, 16, [-1, -3])),
    "clip-mistral": (("clip", "mistral", 2, "full", False), ([1], False, 17, -2)),
}
CONV = [
    {"from": "human", "value": "<image>\nwhat colour is the circle?"}, {"from": "gpt", "value": "red"},
    {"from": "human", "value": "how many square?"}, {"from": "gpt", "value": "2"},
]


def _image(colour: tuple[int, int, int], size: tuple[int, int] = (32, 32)) -> Image.Image:
    im = Image.new("RGB", size, colour)
    im.paste((255, 255, 0), (4, 4, 16, 12))
    return im


def write_llava(folder: Path, tokenizer: Any, vision: str, text: str, feature: Any = -2, strategy: str = "default",
                bias: bool = True, act: str = "gelu") -> LlavaForConditionalGeneration:
    """A random tiny Llava with its processor, saved like a llava-hf folder."""
    vision_cfg, processor, prefix = VISION[vision]
    text_cls, text_extra = TEXT[text]
    config = LlavaConfig(
        vision_config=copy.deepcopy(vision_cfg), text_config=text_cls(**LM, **text_extra, vocab_size=len(tokenizer)),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_layer=feature,
        vision_feature_select_strategy=strategy, multimodal_projector_bias=bias, projector_hidden_act=act,
    )
    model = LlavaForConditionalGeneration(config).eval()
    model.save_pretrained(folder)
    LlavaProcessor(image_processor=processor, tokenizer=tokenizer, patch_size=8, vision_feature_select_strategy=strategy,
                   num_additional_image_tokens=prefix).save_pretrained(folder)
    return model


def _batch(model: MLLM, colours: tuple[tuple[int, int, int], ...] = ((255, 0, 0), (0, 0, 255))) -> dict[str, Any]:
    collate = Collator(model.tokenizer, model.template, model.cfg.image_token, model.num_image_tokens,
                       model.preprocess, 64)
    return collate([{"id": "a", "image": _image(colours[0]), "conversations": CONV[:2]},
                    {"id": "b", "image": _image(colours[1], (40, 32)), "conversations": CONV}])


@torch.no_grad()
def ours_logits(model: MLLM, batch: dict[str, Any]) -> torch.Tensor:
    return model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"]).logits


@torch.no_grad()
def hf_logits(model: LlavaForConditionalGeneration, batch: dict[str, Any]) -> torch.Tensor:
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                 pixel_values=batch["pixel_values"]).logits


@dataclass
class Converted:
    case: str
    original: LlavaForConditionalGeneration
    ours: MLLM
    exported_dir: Path


@pytest.fixture(scope="module", params=sorted(CASES))
def converted(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, word_tokenizer: Any) -> Converted:
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp(request.param)
    original = write_llava(root / "llava", word_tokenizer, *CASES[request.param][0])
    import_llava(root / "llava", root / "ckpt")
    export_llava(root / "ckpt", root / "exported")
    return Converted(request.param, original, MLLM.from_pretrained(root / "ckpt").eval(), root / "exported")


def test_import_maps_layers_cls_and_projector(converted: Converted) -> None:
    (_, _, _, _, bias), (layers, drop, tokens, _) = CASES[converted.case]
    ours = converted.ours
    assert ours.cfg.encoder.name == "hf_vision" and ours.encoder.layers == layers
    assert ours.cfg.encoder.cfg.drop_prefix is drop and ours.num_image_tokens == tokens
    proj = converted.original.model.multi_modal_projector
    torch.testing.assert_close(ours.projector.layers[2].weight, proj.linear_2.weight, atol=0, rtol=0)
    expected_bias = proj.linear_1.bias if bias else torch.zeros(32)
    torch.testing.assert_close(ours.projector.layers[0].bias, expected_bias, atol=0, rtol=0)


def test_imported_model_gives_llava_logits(converted: Converted) -> None:
    batch = _batch(converted.ours)
    reference = hf_logits(converted.original, batch)
    torch.testing.assert_close(ours_logits(converted.ours, batch), reference, atol=1e-5, rtol=0)
    # The images matter: other pixels change the logits well beyond the tolerance.
    other = _batch(converted.ours, ((0, 200, 0), (90, 90, 90)))
    assert (hf_logits(converted.original, other) - reference).abs().max() > 1e-3


def test_export_loads_with_plain_transformers(converted: Converted) -> None:
    exported = LlavaForConditionalGeneration.from_pretrained(converted.exported_dir, local_files_only=True).eval()
    batch = _batch(converted.ours)
    torch.testing.assert_close(hf_logits(exported, batch), ours_logits(converted.ours, batch), atol=1e-5, rtol=0)
    # Import then export is the identity on the weights; the feature layer comes back in negative form.
    original, back = converted.original.state_dict(), exported.state_dict()
    assert set(original) <= set(back)  # plus zero projector biases where the original had none
    for key, tensor in original.items():
        torch.testing.assert_close(back[key], tensor, atol=0, rtol=0, msg=key)
    (_, _, _, strategy, _), (_, _, _, feature) = CASES[converted.case]
    assert exported.config.vision_feature_layer == feature
    assert exported.config.vision_feature_select_strategy == strategy
    assert exported.config.image_seq_length == converted.ours.num_image_tokens


def test_exported_processor_matches_our_inputs(converted: Converted) -> None:
    """``AutoProcessor`` on the exported folder expands ``<image>`` to our token count and
    preprocesses like our encoder, so a plain transformers pipeline reproduces our logits."""
    ours = converted.ours
    processor = AutoProcessor.from_pretrained(converted.exported_dir, local_files_only=True)
    image, question = _image((255, 0, 0), (48, 32)), "what colour is the circle?"
    inputs = processor(images=image, text=f"<s>USER: <image>\n{question} ASSISTANT:", return_tensors="pt")
    ids = encode_prompt(ours.tokenizer, question, "plain", "<image>", ours.num_image_tokens)
    assert inputs["input_ids"][0].tolist() == ids
    torch.testing.assert_close(inputs["pixel_values"][0], ours.preprocess(image), atol=0, rtol=0)
    exported = LlavaForConditionalGeneration.from_pretrained(converted.exported_dir, local_files_only=True).eval()
    batch = {**inputs, "attention_mask": torch.ones_like(inputs["input_ids"])}
    torch.testing.assert_close(hf_logits(exported, batch), ours_logits(ours, batch), atol=1e-5, rtol=0)


def _hf_encoder(model_type: str = "clip_vision_model", **kw: Any) -> dict[str, Any]:
    processor = {"image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": 32},
                 "crop_size": {"height": 32, "width": 32}}
    return {"name": "hf_vision", "model_type": model_type, "arch": TOWER, "processor": processor, **kw}


def _native(tmp_path: Path, tokenizer: Any, **parts: Any) -> Path:
    """Our model (CLIP tower, mlp, Qwen2 by default; ``parts`` replace ModelConfig keys), saved."""
    llm = {"model_type": "qwen2", "arch": {k: v for k, v in LM.items() if not k.endswith("token_id")}}
    cfg = from_dict(ModelConfig, {"encoder": _hf_encoder(), "projector": {"name": "mlp"}, "llm": llm, **parts})
    return MLLM(cfg, tokenizer).save_pretrained(tmp_path / "ckpt")


def test_native_model_exports_two_layers(tmp_path: Path, word_tokenizer: Any) -> None:
    ckpt = _native(tmp_path, word_tokenizer, encoder=_hf_encoder(layers=[-1, 0]))
    export_llava(ckpt, tmp_path / "llava")
    ours = MLLM.from_pretrained(ckpt).eval()
    exported = LlavaForConditionalGeneration.from_pretrained(tmp_path / "llava", local_files_only=True).eval()
    assert exported.config.vision_feature_layer == [-1, -3]  # blocks 2 and 0 of 3, concatenated in that order
    assert exported.config.vision_feature_select_strategy == "default"
    batch = _batch(ours)
    torch.testing.assert_close(hf_logits(exported, batch), ours_logits(ours, batch), atol=1e-5, rtol=0)


def test_bf16_tied_export_keeps_llm_weights_and_tie(tmp_path: Path, word_tokenizer: Any) -> None:
    arch = {**{k: v for k, v in LM.items() if not k.endswith("token_id")}, "tie_word_embeddings": True}
    ckpt = _native(tmp_path, word_tokenizer, llm={"model_type": "llama", "dtype": "bfloat16", "arch": arch})
    export_llava(ckpt, tmp_path / "llava")
    ours = MLLM.from_pretrained(ckpt)
    exported = LlavaForConditionalGeneration.from_pretrained(tmp_path / "llava", local_files_only=True)
    assert exported.dtype == torch.bfloat16 and exported.config.tie_word_embeddings
    assert exported.lm_head.weight is exported.model.language_model.embed_tokens.weight
    for key, tensor in ours.llm.model.state_dict().items():
        torch.testing.assert_close(exported.model.language_model.state_dict()[key], tensor, atol=0, rtol=0, msg=key)
    # The tower and projector are cast to the LLM's bf16 (ours stay fp32), as llava-hf checkpoints are.
    proj = exported.model.multi_modal_projector.linear_1.weight
    torch.testing.assert_close(proj, ours.projector.layers[0].weight.to(torch.bfloat16), atol=0, rtol=0)


REGISTERS = {"name": "hf_vision", "model_type": "dinov2_with_registers", "arch": {**TOWER, "num_register_tokens": 4},
             "processor": {"image_processor_type": "BitImageProcessor", "size": {"shortest_edge": 32},
                           "crop_size": {"height": 32, "width": 32}}}
TIMM = {"name": "timm_vit", "image_size": 32, "patch_size": 16, "embed_dim": 32, "depth": 2, "num_heads": 2}
GRANITE = {"model_type": "granite", "arch": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                                             "num_attention_heads": 4, "logits_scaling": 4.0}}
REFUSED_EXPORTS = {  # name: (ModelConfig parts, match)
    "timm_encoder": ({"encoder": TIMM}, "Llava holds one transformers vision model"),
    "linear_projector": ({"projector": {"name": "linear"}}, "Linear-GELU-Linear"),
    "mlp3_projector": ({"projector": {"name": "mlp", "depth": 3}}, "Linear-GELU-Linear"),
    "register_tokens_dropped": ({"encoder": REGISTERS}, "drops 5 prefix tokens"),
    "injector": ({"injectors": [{"name": "gated_xattn"}]}, "Llava only splices"),
    "scaled_logits": ({"llm": GRANITE}, "GraniteForCausalLM head transforms the logits"),
}


@pytest.mark.parametrize("name", sorted(REFUSED_EXPORTS))
def test_inexpressible_export_is_refused_and_writes_nothing(name: str, tmp_path: Path, word_tokenizer: Any) -> None:
    parts, match = REFUSED_EXPORTS[name]
    ckpt = _native(tmp_path, word_tokenizer, **parts)
    with pytest.raises(HFInteropError, match=match):
        export_llava(ckpt, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no output, no temp folder


REFUSED_IMPORTS = {  # name: (write_llava arguments, match)
    "siglip_default_drops_a_patch": (("siglip", "qwen2", -1, "default"), "would drop a patch"),
    "embedding_layer": (("clip", "llama", 0, "full"), "selects the embedding output"),
    "relu_projector": (("clip", "llama", -2, "default", True, "relu"), "projector_hidden_act 'relu'"),
}


@pytest.mark.parametrize("name", sorted(REFUSED_IMPORTS))
def test_inexpressible_import_is_refused_and_writes_nothing(name: str, tmp_path: Path, word_tokenizer: Any) -> None:
    args, match = REFUSED_IMPORTS[name]
    write_llava(tmp_path / "llava", word_tokenizer, *args)
    with pytest.raises(HFInteropError, match=match):
        import_llava(tmp_path / "llava", tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llava"]


def test_layer_index_mapping_hand_cases() -> None:
    # A 3-block tower: hidden_states = [embeddings, block0, block1, block2].
    assert [llava_layer_to_ours(k, 3) for k in (-1, -2, -3, 1, 2, 3)] == [-1, -2, -3, 0, 1, 2]
    assert [ours_to_llava_layer(b, 3) for b in (0, 1, 2)] == [-3, -2, -1]
    for bad in (0, -4, 4):
        with pytest.raises(HFInteropError, match="vision_feature_layer"):
            llava_layer_to_ours(bad, 3)


def test_cli_convert_both_ways_and_refuses_existing_output(tmp_path: Path, word_tokenizer: Any,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    original = write_llava(tmp_path / "llava", word_tokenizer, "clip", "llama")
    assert main(["convert", "--from-hf", str(tmp_path / "llava"), "--out", str(tmp_path / "ckpt")]) == 0
    assert main(["convert", "--to-hf", str(tmp_path / "ckpt"), "--out", str(tmp_path / "back")]) == 0
    back = LlavaForConditionalGeneration.from_pretrained(tmp_path / "back", local_files_only=True).eval()
    batch = _batch(MLLM.from_pretrained(tmp_path / "ckpt"))
    torch.testing.assert_close(hf_logits(back, batch), hf_logits(original, batch), atol=1e-5, rtol=0)
    assert main(["convert", "--to-hf", str(tmp_path / "ckpt"), "--out", str(tmp_path / "back")]) == 2
    assert "already exists" in capsys.readouterr().err



CORRUPT = {  # file: (bytes written over it, the error after the file's path)
    "model.safetensors": (b"\xff" * 16,
                          "not a readable safetensors file (Error while deserializing header: header too large)"),
    "config.json": (b'{"model_type": "llava", ', "not a readable JSON file (Expecting property name enclosed in "
                    "double quotes: line 1 column 25 (char 24))"),
}


@pytest.mark.parametrize("name", sorted(CORRUPT))
def test_corrupt_file_in_import_is_one_line_naming_it(name: str, tmp_path: Path, word_tokenizer: Any,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    write_llava(tmp_path / "llava", word_tokenizer, "clip", "llama")
    garbage, expected = CORRUPT[name]
    (tmp_path / "llava" / name).write_bytes(garbage)
    with pytest.raises(HFInteropError) as err:
        import_llava(tmp_path / "llava", tmp_path / "out")
    assert str(err.value) == f"{tmp_path / 'llava' / name}: {expected}"
    assert main(["convert", "--from-hf", str(tmp_path / "llava"), "--out", str(tmp_path / "out")]) == 2
    lines = [line for line in capsys.readouterr().err.replace("\r", "\n").splitlines() if line.strip()]
    assert lines[-1] == f"mllm convert: error: {err.value}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llava"]
