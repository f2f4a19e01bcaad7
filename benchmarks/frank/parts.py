"""The pieces the FRANK toy experiment trains and measures (orchestrated by benchmarks/frank/study.py).

* :func:`pretrain_base` -- theta_0: a Llama-family LM trained from scratch with full-sequence
  next-token loss on text covering both domains (ShapesWorld Q/A rendered as text, one-step
  arithmetic facts, arithmetic questions with direct answers).
* :func:`finetune_reasoner` -- theta_R: theta_0 fine-tuned on arithmetic chains (answer tokens only).
* :func:`train_mllm` -- theta_V: vision encoder + projector + a copy of theta_0, trained on ShapesWorld
  in phases (LLaVA-style: the vision side alone, then with the LLM's decoder blocks at a low rate, or
  LoRA adapters on them merged back when it is saved).
  Both fine-tunes keep theta_0's (tied) embeddings and final norm frozen, so every task vector lives
  in the decoder blocks, the only tensors FRANK (arXiv 2505.16151) defines a rule for; the merges then
  differ only where the methods differ.
* :class:`TextGenerator` -- the eval runner's generator protocol for an LLM on text prompts (the
  arithmetic task, for the reasoner and for every MLLM's language model).
* :func:`probe_batches` -- the probe set (ShapesWorld images + one question) for
  :func:`mllm.merge.probe.run_probe`, which measures the per-layer visual attention share.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from mllm.config import LLMConfig, RunConfig
from train.templates import IGNORE_INDEX, encode_segments, get_template

log = logging.getLogger("frank_toy")


class TextLM(nn.Module):
    """A causal LM as the trainer's loss model; the collator's image keys (none here) are dropped."""

    def __init__(self, llm: nn.Module) -> None:
        super().__init__()
        self.llm = llm

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                **_: Any) -> Any:
        return self.llm(input_ids=input_ids, attention_mask=attention_mask, labels=labels)


def freeze_shared(llm: nn.Module) -> None:
    """Keep the token embeddings (tied with lm_head) and the final norm at theta_0's values."""
    llm.get_input_embeddings().requires_grad_(False)
    llm.get_output_embeddings().requires_grad_(False)
    llm.model.norm.requires_grad_(False)


class TextCollator:
    """Full-sequence LM batches: ``<s> text </s>``, right-padded, loss on every real token."""

    def __init__(self, tokenizer: Any, max_length: int) -> None:
        self.tokenizer, self.max_length = tokenizer, max_length

    def __call__(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        tok = self.tokenizer
        rows = [[tok.bos_token_id, *tok(t, add_special_tokens=False)["input_ids"], tok.eos_token_id][: self.max_length]
                for t in texts]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), tok.pad_token_id)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, IGNORE_INDEX)}


HISTORY = "history.json"  # in a training run's folder: the trainer's logged points (loss per log_every steps)


def _fit(model: nn.Module, data: Any, collate: Any, train_cfg: Any, run_dir: Path) -> nn.Module:
    from train.trainer import Trainer

    trainer = Trainer(model, data, collate, train_cfg, run_dir)
    (run_dir / HISTORY).write_text(json.dumps(trainer.fit(), indent=1))
    return trainer.unwrapped()


def pretrain_base(tokenizer: Any, arch: dict[str, Any], corpus: Sequence[str], train_cfg: Any, out: Path,
                  max_length: int) -> None:
    """theta_0 from scratch; writes a Hugging Face folder (weights, config, tokenizer) at ``out``."""
    from accelerate.utils import set_seed

    from mllm.model import build_llm

    set_seed(train_cfg.seed)
    llm = build_llm(LLMConfig(model_type="llama", arch=arch, attn_implementation="sdpa"), tokenizer)
    model = _fit(TextLM(llm), list(corpus), TextCollator(tokenizer, max_length), train_cfg, out.parent / f"{out.name}-run")
    model.llm.save_pretrained(out)
    tokenizer.save_pretrained(str(out))


def finetune_reasoner(base: Path, data: Any, train_cfg: Any, out: Path, max_length: int) -> None:
    """theta_R: theta_0 trained on the arithmetic chains of ``data`` (text-only conversations)."""
    from accelerate.utils import set_seed
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from train.data.collate import Collator

    set_seed(train_cfg.seed)
    tokenizer = AutoTokenizer.from_pretrained(str(base), local_files_only=True)
    llm = AutoModelForCausalLM.from_pretrained(str(base), local_files_only=True, attn_implementation="sdpa")
    freeze_shared(llm)
    collate = Collator(tokenizer, "plain", "<image>", 0, _no_image, max_length)
    model = _fit(TextLM(llm), data, collate, train_cfg, out.parent / f"{out.name}-run")
    model.llm.save_pretrained(out)
    tokenizer.save_pretrained(str(out))


def _no_image(image: Image.Image) -> torch.Tensor:
    raise AssertionError("text-only data holds no image")


def train_mllm(phases: Sequence[RunConfig], out: Path) -> None:
    """theta_V: ``model.llm.path`` = theta_0; each phase trains its groups on ShapesWorld with a fresh
    optimizer, from where the previous one left the model (run folders ``{out}-0``, ``{out}-1``, ...)."""
    from accelerate.utils import set_seed

    from mllm import run
    from train.data.shapesworld import ShapesWorld

    set_seed(phases[0].train.seed)
    model = run.build_model(phases[0], run.build_tokenizer_for(phases[0]))
    for i, cfg in enumerate(phases):
        run.freeze(model, cfg)
        if not model.has_lora:  # with LoRA only the adapters train: the shared tensors stay theta_0's anyway
            freeze_shared(model.llm)
        model = _fit(model, ShapesWorld(cfg.data).split("train"), run.make_collator(model, cfg), cfg.train,
                     out.parent / f"{out.name}-{i}")
    model.save_pretrained(out)


class TextGenerator:
    """``generate(images, prompts)`` of an LLM on text prompts (images ignored), plain template,
    left-padded batch, greedy decoding, the LLM's KV cache."""

    def __init__(self, llm: nn.Module, tokenizer: Any, template: str = "plain") -> None:
        self.llm, self.tokenizer, self.template = llm, tokenizer, get_template(template, tokenizer)

    @torch.no_grad()
    def generate(self, images: list[Image.Image], prompts: list[str], max_new_tokens: int = 32,
                 **kwargs: Any) -> list[str]:
        tok = self.tokenizer
        rows = [encode_segments(tok, self.template.render_prompt(p), "<image>", 0)[0] for p in prompts]
        width = max(len(r) for r in rows)
        ids = torch.tensor([[tok.pad_token_id] * (width - len(r)) + r for r in rows])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        options = {"do_sample": False, "pad_token_id": tok.pad_token_id, "eos_token_id": tok.eos_token_id, **kwargs}
        out = self.llm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, **options)
        return [t.strip() for t in tok.batch_decode(out[:, width:], skip_special_tokens=True)]


def probe_batches(model: Any, images: Sequence[Image.Image], question: str,
                  batch_size: int = 16) -> Iterator[dict[str, torch.Tensor]]:
    """Probe batches for :func:`mllm.merge.probe.run_probe`: every image with the same question, laid out
    as the model's ``generate`` does (the image before or after the question, as it was trained)."""
    from train.templates import encode_prompt

    row = encode_prompt(model.tokenizer, question, model.template, model.cfg.image_token, model.num_image_tokens,
                        model.cfg.image_first)
    for start in range(0, len(images), batch_size):
        chunk = list(images[start:start + batch_size])
        ids = torch.tensor([row] * len(chunk))
        yield {"input_ids": ids, "attention_mask": torch.ones_like(ids),
               "pixel_values": torch.stack([model.preprocess(im) for im in chunk])}
