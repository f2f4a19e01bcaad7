"""``device_map="auto"``: one of our checkpoints spread over devices (mllm/placement.py).

The planning is checked against accelerate's own map of the LLM for two (absent) GPUs given as
``max_memory``; the loading and the dispatch hooks run for real on the CPU with the decoder layers that
do not fit left in the checkpoint files (disk offload), and generate the same answers as the model
loaded whole.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hf_families import IMAGES, QUESTIONS

from mllm import run
from mllm.config import load_config
from mllm.model import MLLM
from mllm.placement import PlacementError, device_of, plan_device_map

SMALL = [
    "model.encoder.image_size=32", "model.encoder.embed_dim=32", "model.encoder.depth=1", "model.encoder.num_heads=2",
    "model.llm.arch.hidden_size=32", "model.llm.arch.intermediate_size=64", "model.llm.arch.num_hidden_layers=4",
    "model.llm.arch.num_attention_heads=2", "model.llm.arch.num_key_value_heads=2", "data.image_size=32",
]
LAYER_BYTES = 41216  # one decoder layer of SMALL in float32: 10304 parameters


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    cfg = load_config("tiny", SMALL)
    folder = tmp_path_factory.mktemp("ckpt") / "model"
    run.build_model(cfg, run.build_tokenizer_for(cfg)).save_pretrained(folder)
    return folder


def test_device_of_takes_the_longest_mapped_prefix() -> None:
    placed = {"llm.model.layers.0": 0, "llm.model.layers.1": 1, "llm": "cpu", "encoder": 0}
    assert device_of(placed, "llm.model.layers.1.mlp.up_proj.weight") == 1
    assert device_of(placed, "llm.model.layers.10.mlp.up_proj.weight") == "cpu"  # "layers.1" is no prefix of it
    assert device_of(placed, "encoder.blocks.0.attn.qkv.weight") == 0
    with pytest.raises(PlacementError, match="projector.weight"):
        device_of(placed, "projector.weight")


def test_plan_splits_between_decoder_layers_and_keeps_the_splice_on_one_device(checkpoint: Path) -> None:
    """A GPU with room for the encoder, embeddings and about two decoder layers, then the CPU: the first
    layers go to GPU 0, the rest to the CPU in order, none split inside; the encoder, projector and heads
    join the input embeddings on GPU 0 (no GPU is needed to plan)."""
    model = MLLM.from_pretrained(checkpoint, device="cpu")  # planning reads only the parameters' sizes
    reserve = sum(p.numel() * 4 for n, c in model.named_children() if n != "llm" for p in c.parameters())
    embed = model.llm.get_input_embeddings().weight.numel() * 4
    placed = plan_device_map(model, "auto", torch.float32,
                             max_memory={0: reserve + embed + 2 * LAYER_BYTES + 1000, "cpu": 10**9})
    layers = [device_of(placed, f"llm.model.layers.{i}.self_attn.q_proj.weight") for i in range(4)]
    k = layers.count(0)
    assert k >= 1 and layers == [0] * k + ["cpu"] * (4 - k)
    for name in ("encoder", "projector", "aux_heads"):
        assert placed[name] == device_of(placed, "llm.model.embed_tokens.weight") == 0
    assert not any(key.startswith("llm.model.layers.") and key.count(".") > 3 for key in placed)  # not split
    without_reserve = plan_device_map(model, "auto", torch.float32, max_memory={0: reserve, "cpu": 10**9})
    assert device_of(without_reserve, "llm.model.embed_tokens.weight") == "cpu"  # the encoder's room is taken


def test_a_model_that_fits_nowhere_is_refused_without_disk_offload(checkpoint: Path) -> None:
    with pytest.raises(PlacementError, match="does not fit"):
        MLLM.from_pretrained(checkpoint, device_map="auto", max_memory={"cpu": 1000})
    with pytest.raises(PlacementError, match="give one"):
        MLLM.from_pretrained(checkpoint, device="cpu", device_map="auto")
    with pytest.raises(PlacementError, match="expected one of"):
        MLLM.from_pretrained(checkpoint, device_map="everywhere")


def test_spread_model_generates_what_the_whole_model_does(checkpoint: Path) -> None:
    """Room in "CPU memory" for the encoder, embeddings and about two decoder layers: the other layers stay in
    the checkpoint's safetensors file and are read by accelerate's hooks at each forward."""
    whole = MLLM.from_pretrained(checkpoint, device="cpu").eval()
    reserve = sum(p.numel() * 4 for n, c in whole.named_children() if n != "llm" for p in c.parameters())
    embed = whole.llm.get_input_embeddings().weight.numel() * 4
    spread = MLLM.from_pretrained(checkpoint, device_map="auto", offload_to_disk=True,
                                  max_memory={"cpu": reserve + embed + 2 * LAYER_BYTES + 1000}).eval()
    on_disk = [n for n, p in spread.llm.named_parameters() if p.is_meta]
    assert on_disk and all(".layers." in n or "norm" in n or "lm_head" in n for n in on_disk)
    assert not spread.llm.model.layers[0].self_attn.q_proj.weight.is_meta
    prompts = [f"<image>\n{q}" for q in QUESTIONS[:4]]
    want = whole.generate(IMAGES[:4], prompts, max_new_tokens=5)
    assert spread.generate(IMAGES[:4], prompts, max_new_tokens=5) == want


def test_device_map_auto_through_the_commands(checkpoint: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """``--device-map auto`` on chat and eval, for our checkpoint and a transformers folder (transformers'
    own big-model loading): on a machine without GPUs everything lands on the CPU and answers as a plain
    load does; with ``--device`` as well it is refused in one line."""
    from hf_families import save_family

    from mllm import cli
    from mllm.hf_native import NativeMLLM, load_generator

    image = tmp_path / "a.png"
    IMAGES[0].save(image)
    native = save_family("llava", tmp_path / "llava")
    for folder in (checkpoint, native):
        assert cli.main(["chat", str(folder), "--image", str(image), QUESTIONS[0], "--max-new-tokens", "4",
                         "--device-map", "auto"]) == 0
        spread = capsys.readouterr().out
        assert cli.main(["chat", str(folder), "--image", str(image), QUESTIONS[0], "--max-new-tokens", "4",
                         "--device", "cpu"]) == 0
        assert capsys.readouterr().out == spread
        assert cli.main(["chat", str(folder), "--image", str(image), "what?", "--device", "cpu",
                         "--device-map", "auto"]) == 2
        assert "give one" in capsys.readouterr().err
    with pytest.raises(PlacementError, match="expected one of"):  # refused before transformers reads a tensor
        load_generator(native, device_map="everywhere")
    spread_native = load_generator(native, device_map="auto")
    assert isinstance(spread_native, NativeMLLM) and spread_native.device.type == "cpu"
    assert cli.main(["eval", str(native), "--task", "arithmetic", "--opt", "test_size=2", "--max-new-tokens", "2",
                     "--device-map", "auto", "--out", str(tmp_path / "ev")]) == 0
    assert json.loads((tmp_path / "ev" / "protocol.json").read_text())["device"] == "cpu"
