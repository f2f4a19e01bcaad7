"""MLLM: vision encoder -> projector -> any Hugging Face causal LM, LLaVA-style token splicing.

One forward (LLaVA, Liu et al. 2023, Eq. 1-2): ``Z_v = concat_l E_l(x)`` over the tapped encoder
layers (channels), ``H_v = P(Z_v)``; the collated ``input_ids`` already hold ``num_image_tokens``
copies of the image token per image, so the text embeddings ``H_t = Emb(input_ids)`` have ``H_v``
scattered into exactly those positions, and the LLM (held, not subclassed) runs on
``inputs_embeds``. The loss is the LLM's own next-token cross-entropy over ``labels != -100``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from PIL import Image
from torch import nn

from mllm.config import LLMConfig, ModelConfig, from_dict, read_yaml, to_dict
from mllm.registry import ENCODERS, PROJECTORS
from train.data.templates import encode_prompt, get_template, image_token_id

log = logging.getLogger("mllm")

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "mllm_config.yaml"
LLM_DIR = "llm"  # the LLM's config.json (weights live in WEIGHTS_FILE under "llm.")
TOKENIZER_DIR = "tokenizer"
GROUPS = ("encoder", "projector", "llm")


class ModelError(ValueError):
    """The model cannot be built, fed or loaded as asked; the message names the field or file."""


def build_llm(cfg: LLMConfig, tokenizer: Any, llm_config: Any = None) -> nn.Module:
    """A causal LM: random init from ``model_type`` + ``arch``, a saved config, or a local folder.

    The vocabulary always matches ``tokenizer`` (a pretrained LLM is resized to take the added
    ``<image>`` token), and the special-token ids come from the tokenizer.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    dtype = getattr(torch, cfg.dtype, None)
    if not isinstance(dtype, torch.dtype):
        raise ModelError(f"model.llm.dtype: expected a torch dtype name such as float32 or bfloat16, got {cfg.dtype!r}")
    kwargs = {"attn_implementation": cfg.attn_implementation, "dtype": dtype}
    if llm_config is not None:
        return AutoModelForCausalLM.from_config(llm_config, **kwargs)
    if cfg.path is not None:
        if not Path(cfg.path).is_dir():
            raise ModelError(f"model.llm.path: {cfg.path} is not a folder with a Hugging Face causal LM")
        llm = AutoModelForCausalLM.from_pretrained(cfg.path, local_files_only=True, **kwargs)
        if llm.get_input_embeddings().num_embeddings < len(tokenizer):
            llm.resize_token_embeddings(len(tokenizer))
        return llm
    ids = {f"{k}_token_id": getattr(tokenizer, f"{k}_token_id") for k in ("pad", "bos", "eos")}
    try:
        config = AutoConfig.for_model(cfg.model_type, vocab_size=len(tokenizer), **ids, **cfg.arch)
    except (ValueError, TypeError) as err:
        raise ModelError(f"model.llm: cannot build a {cfg.model_type!r} config from arch {cfg.arch}: {err}") from err
    return AutoModelForCausalLM.from_config(config, **kwargs)


class MLLM(nn.Module):
    """Encoder (``ENCODERS``) -> projector (``PROJECTORS``) -> ``AutoModelForCausalLM``."""

    def __init__(self, cfg: ModelConfig, tokenizer: Any, llm_config: Any = None) -> None:
        """``llm_config`` (a transformers config) replaces ``cfg.llm``'s source; used when loading."""
        super().__init__()
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.template = get_template(cfg.template)
        self.image_token_id = image_token_id(tokenizer, cfg.image_token)
        if tokenizer.pad_token_id is None or tokenizer.eos_token_id is None:
            raise ModelError("tokenizer: a pad and an eos token are needed (padding and generation stop)")
        self.encoder = ENCODERS.build(cfg.encoder.name, cfg.encoder.cfg)
        self.llm = build_llm(cfg.llm, tokenizer, llm_config)
        in_dim = self.encoder.embed_dim * len(self.encoder.layers)
        self.projector = PROJECTORS.build(
            cfg.projector.name, cfg.projector.cfg, in_dim=in_dim, out_dim=self.llm.config.get_text_config().hidden_size
        )
        self.num_image_tokens: int = self.projector.num_output_tokens(self.encoder.num_patches)
        if self.llm.get_input_embeddings().num_embeddings < len(tokenizer):
            raise ModelError(f"model.llm: vocabulary smaller than the tokenizer's {len(tokenizer)} tokens")

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        return self.encoder.preprocess(image)

    # --- the data path ------------------------------------------------------------------------
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W] -> [B, num_image_tokens, D_llm]``: tapped layers concatenated, projected."""
        param = next(self.encoder.parameters())
        feats = self.encoder(pixel_values.to(device=param.device, dtype=param.dtype))
        tokens = torch.cat([feats[layer] for layer in self.encoder.layers], dim=-1)
        return self.projector(tokens)

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor) -> torch.Tensor:
        """Text embeddings with the projected visual tokens scattered into the image-token slots."""
        if pixel_values.shape[0] != input_ids.shape[0]:
            raise ModelError(f"one image per row: got {pixel_values.shape[0]} images for {input_ids.shape[0]} rows")
        image_mask = input_ids == self.image_token_id
        per_row = image_mask.sum(dim=1)
        bad = (per_row != self.num_image_tokens).nonzero().flatten()
        if bad.numel():
            row = int(bad[0])
            raise ModelError(
                f"row {row} of input_ids holds {int(per_row[row])} image tokens; expected "
                f"{self.num_image_tokens} (one image x the encoder's tokens after the projector)"
            )
        # The image token may lie outside a pretrained LLM's trained rows: look up pad instead.
        text_ids = input_ids.masked_fill(image_mask, self.tokenizer.pad_token_id)
        embeds = self.llm.get_input_embeddings()(text_ids)
        visual = self.encode_images(pixel_values).to(embeds.dtype)
        # masked_scatter fills slots in row-major order, so image i lands in row i's slots.
        return embeds.masked_scatter(image_mask.unsqueeze(-1), visual)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        """The LLM's ``CausalLMOutputWithPast``; ``.loss`` is shifted cross-entropy over ``labels``."""
        embeds = self.embed(input_ids, pixel_values)
        return self.llm(inputs_embeds=embeds, attention_mask=attention_mask, labels=labels, **kwargs)

    @torch.no_grad()
    def generate_ids(
        self, images: Sequence[Image.Image], prompts: Sequence[str], max_new_tokens: int = 32, **kwargs: Any
    ) -> torch.Tensor:
        """New token ids ``[B, T]`` (pad after each row's eos): left-padded batch, greedy unless
        ``kwargs`` say otherwise, the LLM's own KV cache. The caller sets ``eval()`` mode."""
        if len(images) != len(prompts) or not prompts:
            raise ModelError(f"generate: expected as many images as prompts (>= 1), got {len(images)} and {len(prompts)}")
        rows = [
            encode_prompt(self.tokenizer, p, self.template, self.cfg.image_token, self.num_image_tokens)
            for p in prompts
        ]
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=self.device)
        attention_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=self.device)
        pixel_values = torch.stack([self.preprocess(im) for im in images])
        embeds = self.embed(input_ids, pixel_values)
        options = {"do_sample": False, "pad_token_id": pad, "eos_token_id": self.tokenizer.eos_token_id, **kwargs}
        # Given inputs_embeds and no input_ids, a decoder-only LM returns only the new tokens.
        return self.llm.generate(
            inputs_embeds=embeds, attention_mask=attention_mask, max_new_tokens=max_new_tokens, **options
        )

    def generate(
        self, images: Sequence[Image.Image], prompts: Sequence[str], max_new_tokens: int = 32, **kwargs: Any
    ) -> list[str]:
        """Answers to ``prompts`` about ``images`` (the eval protocol): :meth:`generate_ids`, decoded
        without special tokens and stripped."""
        if not prompts and not images:
            return []
        out = self.generate_ids(images, prompts, max_new_tokens, **kwargs)
        return [text.strip() for text in self.tokenizer.batch_decode(out, skip_special_tokens=True)]

    # --- training groups ----------------------------------------------------------------------
    def set_trainable(self, groups: Sequence[str]) -> dict[str, tuple[int, int]]:
        """Train exactly ``groups`` (of encoder / projector / llm), freeze the rest; log a table.

        Returns ``{group: (trainable params, total params)}``.
        """
        unknown = sorted(set(groups) - set(GROUPS))
        if unknown:
            raise ModelError(f"trainable: unknown group {unknown[0]!r}; expected some of: {', '.join(GROUPS)}")
        if "encoder" in groups and getattr(self.cfg.encoder.cfg, "frozen", False):
            raise ModelError("trainable lists 'encoder' but model.encoder.frozen is true; drop one of them")
        counts = {}
        for name in GROUPS:
            module: nn.Module = getattr(self, name)
            module.requires_grad_(name in groups)
            total = sum(p.numel() for p in module.parameters())
            counts[name] = (total if name in groups else 0, total)
        lines = [f"{'group':<10} {'state':<9} {'params':>12}"]
        lines += [f"{n:<10} {'trainable' if t else 'frozen':<9} {total:>12,}" for n, (t, total) in counts.items()]
        trainable = sum(t for t, _ in counts.values())
        lines.append(f"{'total':<10} {'':<9} {sum(c for _, c in counts.values()):>12,} ({trainable:,} trainable)")
        log.info("trainable parameters:\n%s", "\n".join(lines))
        return counts

    # --- checkpoints --------------------------------------------------------------------------
    def save_pretrained(self, directory: str | os.PathLike[str]) -> Path:
        """Write weights, configs and tokenizer into ``directory``, atomically.

        Everything goes to a temp folder beside the target, which is then renamed into place, so a
        folder named ``directory`` is always complete (an older one is replaced only afterwards).
        """
        from safetensors.torch import save_model

        target = Path(directory)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
        try:
            save_model(self, str(tmp / WEIGHTS_FILE))  # drops tied duplicates (lm_head = embeddings)
            (tmp / CONFIG_FILE).write_text(yaml.safe_dump(to_dict(self.cfg), sort_keys=False))
            self.llm.config.save_pretrained(tmp / LLM_DIR)
            self.tokenizer.save_pretrained(str(tmp / TOKENIZER_DIR))
            old = None
            if target.exists():
                old = target.parent / f".{target.name}.old-{tmp.name.rsplit('-', 1)[-1]}"
                os.replace(target, old)
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return target

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike[str]) -> MLLM:
        """Load a folder written by :meth:`save_pretrained` (CPU, no network)."""
        from safetensors.torch import load_model
        from transformers import AutoConfig, AutoTokenizer

        root = Path(directory)
        if not root.is_dir():
            raise FileNotFoundError(f"{root}: checkpoint folder not found")
        for name in (WEIGHTS_FILE, CONFIG_FILE, f"{LLM_DIR}/config.json", TOKENIZER_DIR):
            if not (root / name).exists():
                raise FileNotFoundError(f"{root / name}: missing from the checkpoint (written by save_pretrained)")
        cfg = from_dict(ModelConfig, read_yaml(root / CONFIG_FILE), where=str(root / CONFIG_FILE))
        # The saved tensors supersede the encoder's original weights file, which may be gone.
        if dataclasses.is_dataclass(cfg.encoder.cfg) and hasattr(cfg.encoder.cfg, "weights"):
            cfg.encoder.cfg = dataclasses.replace(cfg.encoder.cfg, weights=None)
        tokenizer = AutoTokenizer.from_pretrained(str(root / TOKENIZER_DIR), local_files_only=True)
        llm_config = AutoConfig.from_pretrained(str(root / LLM_DIR), local_files_only=True)
        model = cls(cfg, tokenizer, llm_config=llm_config)
        try:
            load_model(model, str(root / WEIGHTS_FILE), strict=True)
        except RuntimeError as err:
            raise ModelError(f"{root / WEIGHTS_FILE}: does not match {root / CONFIG_FILE}: {err}") from err
        return model
