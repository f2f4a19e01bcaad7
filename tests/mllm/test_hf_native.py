"""Any transformers image-text-to-text folder behind the eval protocol (mllm/hf_native.py).

Per family, a tiny random model of tests/hf_families.py is saved to a temporary folder. Then:
``NativeMLLM.generate`` equals transformers' own greedy ``generate`` run one sample at a time (inputs
from ``processor.apply_chat_template`` with the image in the message), and batch sizes 1 and 8 give
identical predictions. ``mllm chat`` runs on one native folder and on a tiny checkpoint of ours.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from hf_families import FAMILIES, IMAGES, LM, MAX_NEW, QUESTIONS, byte_tokenizer, llava, save_family
from PIL import Image

from mllm import cli, run
from mllm.hf_native import NativeMLLM, chat_content, load_generator
from mllm.model import MLLM, ModelError


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def native_folder(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_family(request.param, tmp_path_factory.mktemp(request.param))


def reference(model: Any, processor: Any, image: Image.Image, question: str) -> list[int]:
    """transformers' own path for one sample: the processor's chat template with the image in the
    message, greedy ``generate``, the new tokens."""
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}]
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=False)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


def test_generate_equals_transformers_one_by_one_and_batching_changes_nothing(native_folder: Path) -> None:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    native = load_generator(native_folder, device="cpu")
    assert isinstance(native, NativeMLLM) and native.tokenizer.padding_side == "left"
    model = AutoModelForImageTextToText.from_pretrained(native_folder, local_files_only=True).eval()
    processor = AutoProcessor.from_pretrained(native_folder, local_files_only=True)
    tokenizer = processor.tokenizer
    prompts = [f"<image>\n{q}" for q in QUESTIONS]
    want_ids = [reference(model, processor, im, q) for im, q in zip(IMAGES, QUESTIONS, strict=True)]
    want = [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in want_ids]
    assert len({tuple(ids) for ids in want_ids}) > 1  # the answers depend on the input
    one = [native.generate([im], [p], max_new_tokens=MAX_NEW)[0] for im, p in zip(IMAGES, prompts, strict=True)]
    eight = native.generate(IMAGES, prompts, max_new_tokens=MAX_NEW)
    assert one == want
    assert eight == want


def test_eval_runs_every_generated_task_and_batch_size_changes_nothing(native_folder: Path, tmp_path: Path) -> None:
    """``mllm eval`` on a transformers folder: ShapesWorld (its default scenes, images) batched by 1 and
    8 gives the same predictions; the text-only arithmetic task (no image marker) runs too."""
    import json

    preds = {}
    for bs in (1, 8):
        run.evaluate_checkpoint(native_folder, "shapesworld", tmp_path / f"sw{bs}", batch_size=bs, max_new_tokens=4,
                                limit=8)
        lines = (tmp_path / f"sw{bs}" / "predictions.jsonl").read_text().splitlines()
        preds[bs] = [json.loads(line)["prediction"] for line in lines]
    assert len(preds[1]) == 8 and preds[1] == preds[8]
    metrics = run.evaluate_checkpoint(native_folder, "arithmetic", tmp_path / "ar", options=["test_size=3"],
                                      batch_size=2, max_new_tokens=3)
    assert metrics["n"] == 3


def test_chat_content_places_the_image_where_the_marker_is() -> None:
    assert chat_content("<image>\nwhat?") == [{"type": "image"}, {"type": "text", "text": "what?"}]
    assert chat_content("what?\n<image>") == [{"type": "text", "text": "what?"}, {"type": "image"}]
    assert chat_content("3 + 4") == [{"type": "text", "text": "3 + 4"}]


def test_chat_on_a_native_folder(native_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    image = tmp_path / "a.png"
    IMAGES[0].save(image)
    assert cli.main(["chat", str(native_folder), "--image", str(image), QUESTIONS[0], "--max-new-tokens", "3"]) == 0
    answer = capsys.readouterr().out.rstrip("\n")
    native = NativeMLLM.from_pretrained(native_folder, device="cpu")
    assert answer == native.generate([IMAGES[0]], [f"<image>\n{QUESTIONS[0]}"], max_new_tokens=3)[0]


SMALL = [
    "model.encoder.image_size=32", "model.encoder.embed_dim=32", "model.encoder.depth=1", "model.encoder.num_heads=2",
    "model.llm.arch.hidden_size=32", "model.llm.arch.intermediate_size=64", "model.llm.arch.num_hidden_layers=1",
    "model.llm.arch.num_attention_heads=2", "model.llm.arch.num_key_value_heads=2", "data.image_size=32",
]


def test_chat_on_our_checkpoint_and_its_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from mllm.config import load_config

    cfg = load_config("tiny", SMALL)
    run.build_model(cfg, run.build_tokenizer_for(cfg)).save_pretrained(tmp_path / "model")
    image = tmp_path / "a.png"
    IMAGES[0].save(image)
    assert cli.main(["chat", str(tmp_path / "model"), "--image", str(image), "what colour is the circle?",
                     "--max-new-tokens", "3"]) == 0
    answer = capsys.readouterr().out.rstrip("\n")
    ours = load_generator(tmp_path / "model")
    assert isinstance(ours, MLLM)
    assert answer == ours.generate([IMAGES[0]], ["<image>\nwhat colour is the circle?"], max_new_tokens=3)[0]

    (tmp_path / "bad.png").write_bytes(b"not an image")
    for bad in (tmp_path / "missing.png", tmp_path / "bad.png"):
        assert cli.main(["chat", str(tmp_path / "model"), "--image", str(bad), "what?"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and str(bad) in err[0]
    assert cli.main(["chat", str(tmp_path), "--image", str(image), "what?"]) == 2  # neither ours nor transformers'
    assert "not a model folder" in capsys.readouterr().err
    with pytest.raises(ModelError, match="dtype"):
        load_generator(tmp_path / "model", dtype="int8")


def test_native_loading_errors_and_dtype(tmp_path: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = byte_tokenizer([])
    LlamaForCausalLM(LlamaConfig(**LM, vocab_size=len(tokenizer))).save_pretrained(tmp_path / "lm")
    tokenizer.save_pretrained(tmp_path / "lm")
    with pytest.raises(ModelError, match="cannot load it as an image-text-to-text model"):
        load_generator(tmp_path / "lm")  # a text-only LLM folder
    with pytest.raises(ModelError, match="config.json: not found"):
        NativeMLLM.from_pretrained(tmp_path)
    with pytest.raises(ModelError, match="not a model folder"):
        load_generator(tmp_path / "nowhere")


def test_dtype_is_the_callers_choice(tmp_path: Path) -> None:
    model, processor = llava(tmp_path)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    native = load_generator(tmp_path, device="cpu", dtype="bfloat16")
    assert native.dtype == torch.bfloat16 and native.device.type == "cpu"
    assert len(native.generate(IMAGES[:2], [f"<image>\n{q}" for q in QUESTIONS[:2]], max_new_tokens=2)) == 2
