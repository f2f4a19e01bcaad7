"""The public Python surface: ``from mllm import MLLM, load_config, ...``, light to import, and a saved
model that prompts from Python exactly as it was trained (the image marker's place travels with it)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mllm
from mllm import run
from train.data.shapesworld import ShapesWorld
from train.templates import encode_prompt

SMALL = ["model.encoder.depth=1", "model.llm.arch.num_hidden_layers=1", "data.test_images=2"]


def test_every_public_name_resolves_and_import_stays_light() -> None:
    for name in mllm.__all__:
        assert getattr(mllm, name) is not None
    assert mllm.MLLM.__module__ == "mllm.model" and mllm.UserError.__module__ == "common.errors"
    with pytest.raises(AttributeError, match="module 'mllm' has no attribute 'nope'"):
        mllm.nope  # noqa: B018
    code = "import sys, mllm; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_a_saved_model_prompts_from_python_as_it_was_trained(tmp_path: Path) -> None:
    cfg = mllm.load_config("tiny", SMALL)
    assert cfg.data.image_first is False  # tiny trains question first: "{question}\n<image>"
    torch.manual_seed(0)
    model = run.build_model(cfg, run.build_tokenizer_for(cfg))
    model.save_pretrained(tmp_path / "model")
    loaded = mllm.MLLM.from_pretrained(tmp_path / "model").eval()
    assert loaded.cfg.image_first is False
    image = ShapesWorld(cfg.data).split("test")[0]["image"]
    question = "what colour is the circle?"
    plain = loaded.generate_ids([image], [question], max_new_tokens=4)
    as_trained = loaded.generate_ids([image], [f"{question}\n<image>"], max_new_tokens=4)
    torch.testing.assert_close(plain, as_trained)
    args = (loaded.tokenizer, question, loaded.template, loaded.cfg.image_token, loaded.num_image_tokens)
    n = loaded.num_image_tokens
    # the same prompt ids as the ShapesWorld training turn, which an image-first default would not give
    assert encode_prompt(*args, image_first=False) == encode_prompt(*args[:1], f"{question}\n<image>", *args[2:])
    assert encode_prompt(*args, image_first=False)[-n - 1:] != encode_prompt(*args, image_first=True)[-n - 1:]
