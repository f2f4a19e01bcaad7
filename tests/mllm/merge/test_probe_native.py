"""``mllm probe MODEL --images DIR``: the image-only probe protocol on every transformers MLLM family of
tests/hf_families.py and on a tiny checkpoint of ours (mllm/merge/probe.py, mllm/hf_native.py).

The reference share of one image is computed here by indexing the attentions of the model's own
eager forward (transformers' ``apply_chat_template`` with the image in the message, no padding; ours:
the prompt ids its ``generate`` prefills), with the visual tokens named per family by their token
text. The probe's shares over a left-padded batch of 4 equal the mean of those one-image shares.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from hf_families import FAMILIES, IMAGES, save_family
from PIL import Image

from mllm import cli, run
from mllm.hf_native import NativeMLLM, image_prompt_batch
from mllm.merge.probe import DEFAULT_PROMPT, QUERIES, visual_attention_share
from mllm.model import MLLM

# The token a family's processor repeats once per visual token; the tokens around it carry no pixels.
VISUAL_TOKEN = {"llava": "<image>", "llava_onevision": "<image>", "qwen2_vl": "<|image_pad|>",
                "qwen2_5_vl": "<|image_pad|>", "qwen3_vl": "<|image_pad|>", "idefics3": "<image>",
                "smolvlm": "<image>", "internvl": "<IMG_CONTEXT>", "gemma3": "<image_soft_token>"}
PADDED = {"qwen2_vl", "qwen2_5_vl", "qwen3_vl", "internvl", "llava_onevision"}  # image sizes change token counts
LAYERS = 2  # hf_families.LM and the tiny checkpoint below


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    for i, image in enumerate(IMAGES[:4]):
        image.save(folder / f"{i}.png")
    (folder / "captions.txt").write_text("not an image: skipped by its suffix")
    return folder


def indexed_shares(attentions: tuple[torch.Tensor, ...], ids: torch.Tensor, visual_id: int) -> list[float]:
    """Per layer, for one unpadded row: mean over heads and text queries after the first visual token of
    the probability on visual keys over the row's whole probability (text + visual keys)."""
    visual = ids == visual_id
    queries = [t for t in range(int(visual.nonzero()[0]), len(ids)) if not visual[t]]
    out = []
    for att in attentions:
        rows = att[0][:, queries].double()  # [H, Q, T]
        out.append(float((rows[..., visual].sum(-1) / rows.sum(-1)).mean()))
    return out


def transformers_shares(folder: Path, images: list[Image.Image], visual_token: str) -> torch.Tensor:
    """``[image, layer]`` shares of transformers' own eager forward, one image at a time."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(str(folder))
    model = AutoModelForImageTextToText.from_pretrained(str(folder), attn_implementation="eager").eval()
    out = []
    for image in images:
        message = [{"role": "user", "content": [{"type": "image", "image": image},
                                                {"type": "text", "text": DEFAULT_PROMPT}]}]
        inputs = processor.apply_chat_template(message, add_generation_prompt=True, tokenize=True, return_dict=True,
                                               return_tensors="pt")
        with torch.no_grad():
            attentions = model(**inputs, output_attentions=True).attentions
        out.append(indexed_shares(attentions, inputs["input_ids"][0],
                                  processor.tokenizer.convert_tokens_to_ids(visual_token)))
    return torch.tensor(out)


def probe_doc(folder: Path, image_dir: Path, out: Path, *flags: str) -> dict[str, Any]:
    assert cli.main(["probe", str(folder), "--images", str(image_dir), "--limit", "3", "--out", str(out),
                     "--device", "cpu", *flags]) == 0
    assert (out / "probe.png").stat().st_size > 0
    doc = json.loads((out / "probe.json").read_text())
    assert len(doc["visual_share"]) == LAYERS and all(0.0 < a < 1.0 for a in doc["visual_share"])
    assert doc["images"] == {"dir": str(image_dir), "count": 3} and doc["num_samples"] == 3
    assert doc["model"] == str(folder) and doc["queries"] == QUERIES
    assert (doc["device"], doc["dtype"], doc["batch_size"]) == ("cpu", "float32", 16)
    assert "alpha" in doc["fit"] and len(doc["w_V"]["max"]) == LAYERS
    alpha, c = doc["fit"]["alpha"], doc["fit"]["C"]  # share: the fitted curve itself, clipped to [0, 1]
    assert doc["w_V"]["share"] == pytest.approx([min(1.0, c * math.exp(-alpha * k)) for k in range(1, LAYERS + 1)])
    return doc


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_probes_as_transformers_attends_one_image_at_a_time(
    family: str, image_dir: Path, tmp_path: Path
) -> None:
    folder = save_family(family, tmp_path / family)
    doc = probe_doc(folder, image_dir, tmp_path / "probe")
    reference = transformers_shares(folder, IMAGES[:4], VISUAL_TOKEN[family])
    native = NativeMLLM.from_pretrained(folder, device="cpu")
    assert doc["kind"] == type(native.model).__name__ and doc["prompt"] == DEFAULT_PROMPT
    assert doc["image_token_id"] == native.tokenizer.convert_tokens_to_ids(VISUAL_TOKEN[family])
    assert doc["visual_share"] == pytest.approx(reference[:3].mean(0).tolist(), abs=1e-5)
    batch = image_prompt_batch(native, IMAGES[:4], DEFAULT_PROMPT)
    assert bool((batch["attention_mask"] == 0).any()) == (family in PADDED)  # left padding, where sizes differ
    shares, rows = visual_attention_share(native, [batch])
    assert rows == 4 and shares == pytest.approx(reference.mean(0).tolist(), abs=1e-5)
    assert native.model.config.get_text_config()._attn_implementation == "sdpa"  # switched back


SMALL = [
    "model.encoder.image_size=32", "model.encoder.embed_dim=32", "model.encoder.depth=1", "model.encoder.num_heads=2",
    "model.llm.arch.hidden_size=32", "model.llm.arch.intermediate_size=64", f"model.llm.arch.num_hidden_layers={LAYERS}",
    "model.llm.arch.num_attention_heads=2", "model.llm.arch.num_key_value_heads=2", "data.image_size=32",
]


@pytest.fixture(scope="module")
def our_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mllm.config import load_config, save_config

    cfg = load_config("tiny", [*SMALL, "data.val_images=4"])
    folder = tmp_path_factory.mktemp("ours") / "model"
    run.build_model(cfg, run.build_tokenizer_for(cfg)).save_pretrained(folder)
    save_config(cfg, folder.parent)  # the run config beside the checkpoint: --data shapesworld reads it
    return folder


def test_our_checkpoint_probes_the_prompt_its_generate_prefills(
    our_folder: Path, image_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    prompt = "what colour is the circle?"
    doc = probe_doc(our_folder, image_dir, tmp_path / "probe", "--prompt", prompt)
    assert doc["kind"] == "ours" and doc["prompt"] == prompt
    model = MLLM.from_pretrained(our_folder, device="cpu").eval()
    assert doc["image_token_id"] == model.image_token_id
    prefilled = []
    embed = model.embed
    monkeypatch.setattr(model, "embed", lambda ids, *a, **k: prefilled.append(ids) or embed(ids, *a, **k))
    model.generate(IMAGES[:1], [prompt], max_new_tokens=1)
    reference = []
    model.llm.set_attn_implementation("eager")
    for image in IMAGES[:4]:  # one image at a time, the ids generate prefills
        pixels = model.preprocess(image)[None]
        with torch.no_grad():
            out = model(prefilled[0], torch.ones_like(prefilled[0]), pixels, output_attentions=True)
        reference.append(indexed_shares(out.attentions, prefilled[0][0], model.image_token_id))
    model.llm.set_attn_implementation("sdpa")
    expected = torch.tensor(reference)
    assert doc["visual_share"] == pytest.approx(expected[:3].mean(0).tolist(), abs=1e-5)
    batch = image_prompt_batch(model, IMAGES[:4], prompt)
    assert torch.equal(batch["input_ids"], prefilled[0].expand(4, -1))
    assert visual_attention_share(model, [batch])[0] == pytest.approx(expected.mean(0).tolist(), abs=1e-5)


def test_conversations_are_recorded_as_such(our_folder: Path, tmp_path: Path) -> None:
    argv = ["probe", str(our_folder), "--data", "shapesworld", "--limit", "2", "--out", str(tmp_path), "--device", "cpu"]
    assert cli.main(argv) == 0
    doc = json.loads((tmp_path / "probe.json").read_text())
    assert (doc["kind"], doc["data"], doc["image_root"], doc["prompt"], doc["num_samples"]) == (
        "ours", "shapesworld", None, None, 2)
    assert len(doc["visual_share"]) == LAYERS and "images" not in doc


def one_error_line(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_bad_inputs_are_one_line_and_exit_2(
    our_folder: Path, image_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    native = save_family("llava", tmp_path / "llava")
    capsys.readouterr()
    out = ["--out", str(tmp_path / "out")]
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    assert "no image files" in one_error_line(["probe", str(native), "--images", str(empty), *out], capsys)
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    IMAGES[0].save(corrupt / "a.png")
    (corrupt / "b.jpg").write_bytes(b"not a jpeg")
    line = one_error_line(["probe", str(native), "--images", str(corrupt), *out], capsys)
    assert str(corrupt / "b.jpg") in line and "cannot read the image" in line
    line = one_error_line(["probe", str(tmp_path), "--images", str(image_dir), *out], capsys)
    assert str(tmp_path) in line and "not a model folder" in line
    line = one_error_line(["probe", str(native), *out], capsys)  # conversations (shapesworld) need ours
    assert "--images DIR" in line
    line = one_error_line(["probe", str(our_folder), "--data", "shapesworld", "--prompt", "hi", *out], capsys)
    assert line.endswith("--prompt: belongs to the image-only protocol (--images DIR without --data)")
    line = one_error_line(["probe", str(native), "--images", str(image_dir), "--prompt", "<image> <image>", *out], capsys)
    assert "one image per prompt" in line
    assert not (tmp_path / "out").exists()  # nothing partial left behind
