"""MLLM: vision encoder -> projector -> any Hugging Face causal LM, LLaVA-style token splicing.

One forward (LLaVA, Liu et al. 2023, Eq. 1-2): ``Z_v = concat_l E_l(x)`` over the tapped encoder
layers (channels), ``H_v = P(Z_v)``; the collated ``input_ids`` already hold ``num_image_tokens``
copies of the image token per image, so the text embeddings ``H_t = Emb(input_ids)`` have ``H_v``
scattered into exactly those positions, and the LLM (held, not subclassed) runs on
``inputs_embeds``. The loss is the next-token cross-entropy over ``labels != -100``, reduced per
token (as the LLM's own loss) or per sample (``model.loss_reduction``, :mod:`mllm.loss`).
Text-only rows (``has_image`` false) hold no image tokens and get no image.

Injectors (``model.injectors``, :mod:`mllm.injection`) hook the LLM's decoder layers and read a
:class:`~mllm.injection.base.VisualContext` opened around each LLM call (one forward, or one whole
``generate``); ``model.splice: false`` keeps visual tokens out of the sequence (then only the
injectors see the image). An injector's auxiliary loss is added to the LM loss in training.

LoRA (peft) wraps the LLM for parameter-efficient stages; :meth:`MLLM.save_pretrained` merges the
adapters into the weights first (``merge_and_unload``), so a saved model is always a plain one that
loads, exports and merges without peft.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from PIL import Image
from torch import nn

from common.atomic import atomic_folder
from common.errors import UserError
from mllm.config import LLMConfig, ModelConfig
from mllm.heads.base import AuxHead, HeadInputs, HeadSpec
from mllm.injection.base import (
    InjectionError,
    InjectionSpec,
    VisualContext,
    build_injectors,
    check_needs,
    inject,
    visual_grid,
)
from mllm.loss import causal_lm_loss, supervised_positions
from mllm.numbers import init_number_embeddings
from mllm.placement import check_placement, dispatch, load_device, plan_device_map
from mllm.registry import AUX_HEADS, ENCODERS, INJECTORS, PROJECTORS
from mllm.schema import ConfigError, Part, from_dict, read_yaml, to_dict
from train.templates import IGNORE_INDEX, encode_prompt, get_template, image_token_id

log = logging.getLogger("mllm")

WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"  # shards (save_pretrained with max_shard_size)
CONFIG_FILE = "mllm_config.yaml"
LLM_DIR = "llm"  # the LLM's config.json (weights live in WEIGHTS_FILE under "llm.")
TOKENIZER_DIR = "tokenizer"
GROUPS = ("encoder", "projector", "llm", "injectors")  # "injectors" is counted only when there are some


class ModelError(UserError, ValueError):
    """The model cannot be built, fed or loaded as asked; the message names the field or file."""


def resolve_attn_implementation(requested: str) -> str:
    """``auto`` -> ``flash_attention_2`` when flash-attn is installed and CUDA is available, else ``sdpa``."""
    if requested != "auto":
        return requested
    flash = importlib.util.find_spec("flash_attn") is not None and torch.cuda.is_available()
    choice = "flash_attention_2" if flash else "sdpa"
    log.info("LLM attention: %s (model.llm.attn_implementation=auto; flash-attn %s, CUDA %s)", choice,
             "installed" if importlib.util.find_spec("flash_attn") else "not installed",
             "available" if torch.cuda.is_available() else "not available")
    return choice


def _without_weight_files(cfg: Any) -> Any:
    """``cfg`` with every ``weights`` file dropped, through nested parts (a fused encoder's towers): a
    checkpoint's own tensors supersede them, and the files may be gone. Folders holding an
    architecture (``path``) stay."""
    if isinstance(cfg, Part):
        return type(cfg)(cfg.name, _without_weight_files(cfg.cfg))
    if isinstance(cfg, list):
        return [_without_weight_files(v) for v in cfg]
    if not dataclasses.is_dataclass(cfg):
        return cfg
    changes = {f.name: _without_weight_files(getattr(cfg, f.name)) for f in dataclasses.fields(cfg) if f.init}
    if "weights" in changes:
        changes["weights"] = None
    return dataclasses.replace(cfg, **changes)


def build_llm(cfg: LLMConfig, tokenizer: Any, llm_config: Any = None) -> nn.Module:
    """A causal LM: random init from ``model_type`` + ``arch``, a saved config, or a local folder.

    The vocabulary always matches ``tokenizer`` (a pretrained LLM is resized to take the added
    ``<image>`` token), and the special-token ids come from the tokenizer.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    dtype = getattr(torch, cfg.dtype, None)
    if not isinstance(dtype, torch.dtype):
        raise ModelError(f"model.llm.dtype: expected a torch dtype name such as float32 or bfloat16, got {cfg.dtype!r}")
    kwargs = {"attn_implementation": resolve_attn_implementation(cfg.attn_implementation), "dtype": dtype}
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


class AnswersText:
    """The eval protocol's ``generate(images, prompts) -> list[str]`` for any model with a ``tokenizer``
    and a ``generate_ids`` returning the new token ids (ours, and transformers' MLLMs in mllm/hf_native.py)."""

    tokenizer: Any

    def generate_ids(
        self, images: Sequence[Image.Image], prompts: Sequence[str], max_new_tokens: int = 32, **kwargs: Any
    ) -> torch.Tensor:
        raise NotImplementedError

    def generate(
        self, images: Sequence[Image.Image], prompts: Sequence[str], max_new_tokens: int = 32, **kwargs: Any
    ) -> list[str]:
        """Answers to ``prompts`` about ``images``: :meth:`generate_ids`, decoded without special tokens
        and stripped."""
        if not prompts and not images:
            return []
        out = self.generate_ids(images, prompts, max_new_tokens, **kwargs)
        return [text.strip() for text in self.tokenizer.batch_decode(out, skip_special_tokens=True)]


class MLLM(AnswersText, nn.Module):
    """Encoder (``ENCODERS``) -> projector (``PROJECTORS``) -> ``AutoModelForCausalLM``."""

    def __init__(self, cfg: ModelConfig, tokenizer: Any, llm_config: Any = None, encoder: nn.Module | None = None) -> None:
        """``llm_config`` (a transformers config) replaces ``cfg.llm``'s source, and ``encoder`` (built from
        ``cfg.encoder``) is used as given; both when loading (:meth:`from_pretrained`)."""
        super().__init__()
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.template = get_template(cfg.template, tokenizer)
        self.image_token_id = image_token_id(tokenizer, cfg.image_token)
        if tokenizer.pad_token_id is None or tokenizer.eos_token_id is None:
            raise ModelError("tokenizer: a pad and an eos token are needed (padding and generation stop)")
        self.encoder = encoder if encoder is not None else ENCODERS.build(cfg.encoder.name, cfg.encoder.cfg)
        self.llm = build_llm(cfg.llm, tokenizer, llm_config)
        if cfg.number_init == "sincos" and llm_config is None and cfg.llm.path is None:  # a random init only
            std = float(getattr(self.llm.config.get_text_config(), "initializer_range", 0.02))
            init_number_embeddings(self.llm.get_input_embeddings(), tokenizer, std)
        needs = [(f"model.injectors[{i}] ({p.name})", INJECTORS.get(p.name).needs) for i, p in enumerate(cfg.injectors)]
        try:
            check_needs(needs, cfg.splice)
        except InjectionError as err:
            raise ModelError(str(err)) from err
        if not cfg.splice and not needs:
            raise ModelError("model.splice is false and no model.injectors read the image: the LLM would never see it")
        self._wants_tokens = cfg.splice or any("tokens" in n for _, n in needs)
        # A per-layer consumer (DEHVF) projects one encoder layer at a time; otherwise layers are concatenated.
        per_layer = any("layers" in n for _, n in needs)
        if per_layer and len(set(self.encoder.layer_dims.values())) != 1:
            raise ModelError(f"model.encoder: layers of widths {self.encoder.layer_dims} cannot be mixed per LLM layer")
        in_dim = self.encoder.embed_dim if per_layer else sum(self.encoder.layer_dims.values())
        self.projector = PROJECTORS.build(
            cfg.projector.name, cfg.projector.cfg, in_dim=in_dim, out_dim=self.llm.config.get_text_config().hidden_size
        )
        self.num_visual_tokens: int = self.projector.num_output_tokens(self.encoder.num_patches)
        self.num_image_tokens: int = self.num_visual_tokens if cfg.splice else 0  # image-token slots per image
        text = self.llm.config.get_text_config()
        spec = InjectionSpec(
            hidden_size=text.hidden_size, num_layers=text.num_hidden_layers, num_visual_tokens=self.num_visual_tokens,
            visual_grid=visual_grid(self.encoder, self.projector, self.num_visual_tokens),
            encoder_layers=tuple(self.encoder.layers), encoder_dim=self.encoder.embed_dim,
        )
        try:  # each injector built from its config and these sizes, then hooked into the LLM
            self.injectors = nn.ModuleList(build_injectors(cfg.injectors, spec, self.llm))
        except InjectionError as err:
            raise ModelError(str(err)) from err
        self.aux_heads = nn.ModuleList(self._build_heads(cfg))
        if self.llm.get_input_embeddings().num_embeddings < len(tokenizer):
            raise ModelError(f"model.llm: vocabulary smaller than the tokenizer's {len(tokenizer)} tokens")

    def _build_heads(self, cfg: ModelConfig) -> list[AuxHead]:
        """Each ``model.aux_heads`` entry, sized for the encoder's last tapped layer (and its towers)."""
        tapped = self.encoder.layer_dims[self.encoder.layers[-1]]
        towers = getattr(self.encoder, "specs", [])
        spec = HeadSpec(tapped, tuple(self.encoder.grid_size), self.encoder.num_patches,
                        tuple(t.dims[-1] for t in towers), tuple(t.num_tokens for t in towers))
        return [AUX_HEADS.build(part.name, part.cfg, spec=spec) for part in cfg.aux_heads]

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        return self.encoder.preprocess(image)

    def param_counts(self) -> tuple[int, int]:
        """``(N_text, N_vision)``: parameters run once per LLM token (LLM with tied embeddings once, injectors)
        and once per image patch (encoder, projector, auxiliary heads)."""
        vision = sum(p.numel() for part in (self.encoder, self.projector, self.aux_heads) for p in part.parameters())
        return sum(p.numel() for p in self.parameters()) - vision, vision

    def flops_counter(self) -> Callable[[Mapping[str, Any], int], float]:
        """Model FLOPs of one training step on ``(batch, T)``: ``6 (N_text T + N_vision I P)`` for ``T`` attended
        LLM tokens (the caller's count) and the batch's ``I`` images of ``P`` patches -- 2N forward and 4N backward per token (Kaplan et al., 2020,
        arXiv 2001.08361, Sec. 2.1; PaLM's MFU, Chowdhery et al., 2022, arXiv 2204.02311, App. B), attention's
        sequence-length term left out. The encoder runs per image patch, not per LLM token, so it is counted
        against patches. Parameters are counted now, before any sharding."""
        n_text, n_vision = self.param_counts()
        patches = self.encoder.num_patches

        def count(batch: Mapping[str, Any], tokens: int) -> float:
            pixels = batch.get("pixel_values")
            return 6.0 * (n_text * tokens + n_vision * (0 if pixels is None else pixels.shape[0]) * patches)

        return count

    @property
    def _no_split_modules(self) -> list[str]:
        """Block classes for FSDP: accelerate's TRANSFORMER_BASED_WRAP reads this when its config names none."""
        return [*(getattr(self.llm, "_no_split_modules", None) or []), self.encoder.fsdp_unit.__name__]

    # --- the data path ------------------------------------------------------------------------
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W] -> [B, num_visual_tokens, D_llm]``: tapped layers concatenated, projected."""
        return self.project_layers(self.encoder_features(pixel_values))

    def encoder_features(self, pixel_values: torch.Tensor) -> dict[int, torch.Tensor]:
        """The encoder's tapped layers ``{layer: [B, N, D]}``."""
        return self._encode(pixel_values, towers=False)[0]

    def _encode(self, pixel_values: torch.Tensor, towers: bool) -> tuple[dict[int, torch.Tensor], list[torch.Tensor]]:
        """:meth:`encoder_features`, and with ``towers`` each tower's last tapped layer of a fused encoder
        (returned by its ``forward_towers``; ``[]`` otherwise)."""
        param = next(self.encoder.parameters())
        pixels = pixel_values.to(device=param.device, dtype=param.dtype)
        return self.encoder.forward_towers(pixels) if towers else (self.encoder(pixels), [])

    def project_layers(self, feats: dict[int, torch.Tensor]) -> torch.Tensor:
        return self.projector(torch.cat([feats[layer] for layer in self.encoder.layers], dim=-1))

    def embed(
        self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None, has_image: torch.Tensor | None = None,
        visual: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Text embeddings with the projected visual tokens scattered into the image-token slots.

        ``pixel_values`` holds one image per row, or, with ``has_image`` (bool ``[B]``), one per row
        whose flag is set, in row order; ``None`` when no row has an image. ``visual``: those
        images' projected tokens when already computed. With ``splice: false``: text only.
        """
        rows = input_ids.shape[0]
        n_images = 0 if pixel_values is None else pixel_values.shape[0]
        if has_image is None:
            if pixel_values is not None and n_images != rows:
                raise ModelError(f"one image per row: got {n_images} images for {rows} rows")
            has_image = torch.full((rows,), pixel_values is not None, device=input_ids.device)
        elif n_images != int(has_image.sum()):
            raise ModelError(f"got {n_images} images for {int(has_image.sum())} rows flagged has_image")
        image_mask = input_ids == self.image_token_id
        per_row = image_mask.sum(dim=1)
        expected = has_image.to(per_row.device).long() * self.num_image_tokens
        bad = (per_row != expected).nonzero().flatten()
        if bad.numel():
            row = int(bad[0])
            why = "one image x the encoder's tokens after the projector" if expected[row] else "a row without image"
            raise ModelError(
                f"row {row} of input_ids holds {int(per_row[row])} image tokens; expected {int(expected[row])} ({why})"
            )
        # The image token may lie outside a pretrained LLM's trained rows: look up pad instead.
        text_ids = input_ids.masked_fill(image_mask, self.tokenizer.pad_token_id)
        embeds = self.llm.get_input_embeddings()(text_ids)
        if pixel_values is None:
            if self.training and torch.is_grad_enabled():
                # A text-only batch would leave the encoder and projector out of the graph, and DDP /
                # FSDP ranks must all reduce the same parameters: add one blank image with weight 0.
                blank = torch.zeros(1, 3, *self.encoder.image_size, device=embeds.device)
                embeds = embeds + 0.0 * self.encode_images(blank).sum().to(embeds.dtype)
            return embeds
        if not self.cfg.splice:
            return embeds
        visual = (self.encode_images(pixel_values) if visual is None else visual).to(embeds.dtype)
        # masked_scatter fills slots in row-major order, so the i-th image lands in the i-th image row.
        return embeds.masked_scatter(image_mask.unsqueeze(-1), visual)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        has_image: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        """The LLM's ``CausalLMOutputWithPast``; ``.loss`` is the shifted cross-entropy over ``labels``
        (:mod:`mllm.loss`, reduced per ``model.loss_reduction``), plus in training the injectors' auxiliary
        losses and, while the encoder trains, each auxiliary head's loss on the batch keys it declares
        (one row per image; the keys are taken out of ``kwargs`` before the LLM sees them).

        In training mode with labels the logits are computed only at the positions the loss reads (their
        union over the batch, the LLM's ``logits_to_keep``): ``.logits`` is then ``[B, K, V]``, with ``K``
        the length of :func:`mllm.loss.supervised_positions`. Otherwise it covers every position."""
        targets = {key: kwargs.pop(key) for head in self.aux_heads for key in head.batch_keys if key in kwargs}
        heads = [head for head in self.aux_heads if all(key in targets for key in head.batch_keys)]
        if not (self.training and labels is not None and not self.encoder.frozen):
            heads = []
        embeds, ctx, feats = self._inputs(input_ids, attention_mask, pixel_values, has_image, labels,
                                          features=bool(heads), towers=any(h.reads_towers for h in heads))
        keep = supervised_positions(labels, IGNORE_INDEX) if labels is not None and self.training else None
        if keep is not None:
            kwargs["logits_to_keep"] = keep
        with inject(self.injectors, ctx):
            out = self.llm(inputs_embeds=embeds, attention_mask=attention_mask, **kwargs)
            if labels is not None:
                out.loss = causal_lm_loss(out.logits, labels, self.cfg.loss_reduction, keep, IGNORE_INDEX)
            aux = [loss for injector in self.injectors if (loss := injector.aux_loss()) is not None]
        if feats is not None:
            aux += [head.loss(feats, targets) for head in heads]
        if labels is not None and aux:
            out.loss = out.loss + sum(aux)
        return out

    def _inputs(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor | None,
        has_image: torch.Tensor | None, labels: torch.Tensor | None, features: bool = False, towers: bool = False,
    ) -> tuple[torch.Tensor, VisualContext | None, HeadInputs | None]:
        """``inputs_embeds``, with injectors the visual context of this call, and with ``features`` what the
        auxiliary heads read (``None`` otherwise, and for a batch without images); ``towers``: also each
        tower's features of a fused encoder, returned by its forward beside the fused output.

        The context's query tokens are the prompt: the attended tokens before the first supervised
        label (all attended tokens without labels), exactly what ``generate`` prefills.
        """
        if not self.injectors and (not features or pixel_values is None):
            return self.embed(input_ids, pixel_values, has_image), None, None
        if self.injectors and (pixel_values is None or (has_image is not None and not bool(has_image.all()))):
            raise ModelError("model.injectors need one image per row; this batch has text-only rows")
        assert pixel_values is not None
        # once, for the splice, the injectors and the heads
        feats, tower_feats = self._encode(pixel_values, towers)
        tokens = self.project_layers(feats) if self._wants_tokens else None
        embeds = self.embed(input_ids, pixel_values, has_image, visual=tokens)
        head_inputs = HeadInputs(feats[self.encoder.layers[-1]], tower_feats) if features else None
        if not self.injectors:
            return embeds, None, head_inputs
        query = attention_mask.bool()
        if labels is not None:
            query = query & ((labels != IGNORE_INDEX).long().cumsum(dim=1) == 0)
        ctx = VisualContext(
            attention_mask=attention_mask, query_mask=query,
            image_mask=(input_ids == self.image_token_id) if self.cfg.splice else None,
            tokens=tokens, layers=feats, project=self.projector,
        )
        return embeds, ctx, head_inputs

    @torch.no_grad()
    def generate_ids(
        self, images: Sequence[Image.Image], prompts: Sequence[str], max_new_tokens: int = 32, **kwargs: Any
    ) -> torch.Tensor:
        """New token ids ``[B, T]`` (pad after each row's eos): left-padded batch, greedy unless
        ``kwargs`` say otherwise, the LLM's own KV cache. The caller sets ``eval()`` mode."""
        if len(images) != len(prompts) or not prompts:
            raise ModelError(f"generate: expected as many images as prompts (>= 1), got {len(images)} and {len(prompts)}")
        rows = [
            encode_prompt(self.tokenizer, p, self.template, self.cfg.image_token, self.num_image_tokens,
                          self.cfg.image_first)
            for p in prompts
        ]
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=self.device)
        attention_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=self.device)
        pixel_values = torch.stack([self.preprocess(im) for im in images])
        embeds, ctx, _ = self._inputs(input_ids, attention_mask, pixel_values, None, None)
        options = {"do_sample": False, "pad_token_id": pad, "eos_token_id": self.tokenizer.eos_token_id, **kwargs}
        # Given inputs_embeds and no input_ids, a decoder-only LM returns only the new tokens. The
        # visual context stays open for the whole call: prefill derives, cached decoding steps reuse.
        with inject(self.injectors, ctx):
            return self.llm.generate(
                inputs_embeds=embeds, attention_mask=attention_mask, max_new_tokens=max_new_tokens, **options
            )


    # --- training groups ----------------------------------------------------------------------
    @property
    def has_lora(self) -> bool:
        return hasattr(self.llm, "peft_config")

    def add_lora(self, r: int, alpha: int, dropout: float, target_modules: str | list[str]) -> None:
        """Wrap the LLM with peft LoRA adapters, ``W x + (alpha / r) B A x`` (Hu et al. 2021, Eq. 3);
        ``B`` starts at zero, so the model's function is unchanged until training moves it."""
        from peft import LoraConfig, get_peft_model

        if self.has_lora:
            raise ModelError("the LLM already carries LoRA adapters")
        lora = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules,
                          task_type="CAUSAL_LM")
        try:
            self.llm = get_peft_model(self.llm, lora)
        except ValueError as err:  # peft: target modules not found in the model
            raise ModelError(f"train.lora.target_modules: {err}") from err

    def merge_lora(self) -> None:
        """Fold the adapters into the LLM weights (``W + (alpha / r) B A``) and drop peft's wrapper."""
        if self.has_lora:
            self.llm = self.llm.merge_and_unload()

    def enable_gradient_checkpointing(self) -> list[str]:
        """Recompute activations in backward: the LLM through transformers (non-reentrant), each
        encoder tower through its own switch (timm / open_clip ``set_grad_checkpointing``, HF
        ``gradient_checkpointing_enable``). Returns the modules switched, which are logged."""
        if self.injectors:
            raise ModelError("gradient checkpointing with model.injectors: their hooks read a per-call visual "
                             "context that is closed when backward recomputes the layers")
        options = {"use_reentrant": False}  # no need for inputs that require grad (frozen embeddings)

        def hf_enable(model: Any) -> None:  # transformers 5 renamed it; 4.x has the old name only
            if hasattr(model, "activation_checkpointing_enable"):
                model.activation_checkpointing_enable(activation_checkpointing_kwargs=options)
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)

        hf_enable(self.llm)
        switched = ["llm"]

        def visit(module: nn.Module, name: str) -> None:
            if hasattr(module, "set_grad_checkpointing"):
                module.set_grad_checkpointing(True)
                switched.append(name)
            elif hasattr(module, "gradient_checkpointing_enable"):
                hf_enable(module)
                switched.append(name)
            else:
                for child_name, child in module.named_children():
                    visit(child, f"{name}.{child_name}")

        visit(self.encoder, "encoder")
        log.info("gradient checkpointing on: %s", ", ".join(switched))
        return switched

    def set_trainable(self, groups: Sequence[str]) -> dict[str, tuple[int, int]]:
        """Train exactly ``groups`` (of encoder / projector / llm, or ``fusion``: a fused encoder's
        fusion module alone), freeze the rest; log a table. With LoRA on the LLM, ``llm`` trains
        the adapters only.

        Returns ``{group: (trainable params, total params)}``.
        """
        unknown = sorted(set(groups) - {*GROUPS, "fusion"})
        if unknown:
            raise ModelError(f"trainable: unknown group {unknown[0]!r}; expected some of: {', '.join(GROUPS)}, fusion")
        if "encoder" in groups and getattr(self.cfg.encoder.cfg, "frozen", False):
            raise ModelError("trainable lists 'encoder' but model.encoder.frozen is true; drop one of them")
        fusion = getattr(self.encoder, "fusion", None)
        if "fusion" in groups and not isinstance(fusion, nn.Module):
            raise ModelError("trainable lists 'fusion' but model.encoder has no fusion module (a fused encoder has)")
        present = [name for name in GROUPS if name != "injectors" or len(self.injectors)]
        for name in present:
            getattr(self, name).requires_grad_(name in groups)
        if "fusion" in groups:
            fusion.requires_grad_(True)
        # an encoder no group trains is frozen like a `frozen: true` tower: it stays in eval mode, so
        # its batch-norm statistics (conv stem) do not drift while the projector / LLM train
        trains_encoder = "encoder" in groups or "fusion" in groups
        self.encoder.frozen = bool(getattr(self.cfg.encoder.cfg, "frozen", False)) or not trains_encoder
        self.aux_heads.requires_grad_(not self.encoder.frozen)  # they only teach the encoder: idle while it is frozen
        self.encoder.train(self.training)
        if "llm" in groups and self.has_lora:
            for pname, param in self.llm.named_parameters():
                param.requires_grad_("lora_" in pname)
        counts = {}
        for name in present:
            params = list(getattr(self, name).parameters())
            counts[name] = (sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params))
        lines = [f"{'group':<10} {'state':<9} {'params':>12} {'trainable':>12}"]
        lines += [
            f"{n:<10} {'trainable' if t == total else 'partial' if t else 'frozen':<9} {total:>12,} {t:>12,}"
            for n, (t, total) in counts.items()
        ]
        trainable = sum(t for t, _ in counts.values())
        lines.append(f"{'total':<10} {'':<9} {sum(c for _, c in counts.values()):>12,} ({trainable:,} trainable)")
        log.info("trainable parameters:\n%s", "\n".join(lines))
        return counts

    # --- checkpoints --------------------------------------------------------------------------
    def save_pretrained(self, directory: str | os.PathLike[str], max_shard_size: int | str = "5GB") -> Path:
        """Write weights, configs and tokenizer into ``directory``, atomically.

        Weights go to one ``model.safetensors``, or, when they exceed ``max_shard_size`` (bytes, or a
        string such as ``"5GB"`` read as transformers reads it), to ``model-0000i-of-0000n.safetensors``
        shards plus ``model.safetensors.index.json`` (``weight_map``, ``metadata.total_size``), the layout
        transformers writes. Tied duplicates (``lm_head`` = embeddings) are stored once, as
        safetensors' ``save_model`` stores them. Everything goes to a temp folder beside the target,
        which is then renamed into place, so a folder named ``directory`` is always complete (an older
        one is replaced only afterwards).
        """
        from safetensors.torch import _remove_duplicate_names  # the choice save_model makes
        from transformers.utils.hub import convert_file_size_to_int

        from mllm.merge.tensors import ShardWriter, TensorSpec

        try:
            cap = convert_file_size_to_int(max_shard_size)
        except ValueError as err:
            raise ModelError(f"max_shard_size: expected bytes or a size such as '5GB', got {max_shard_size!r}") from err
        if self.has_lora:
            log.info("merging the LoRA adapters into the LLM weights before saving (peft merge_and_unload)")
            self.merge_lora()
        state = self.state_dict()
        for dropped in _remove_duplicate_names(state).values():
            for name in dropped:
                del state[name]
        with atomic_folder(directory, replace=True) as tmp:
            specs = [TensorSpec(name, tuple(t.shape), t.dtype) for name, t in state.items()]
            with ShardWriter(tmp, specs, cap) as writer:
                for name, tensor in state.items():
                    writer.write(name, tensor)
                files = writer.close()
            (tmp / CONFIG_FILE).write_text(yaml.safe_dump(to_dict(self.cfg), sort_keys=False))
            self.llm.config.save_pretrained(tmp / LLM_DIR)
            self.tokenizer.save_pretrained(str(tmp / TOKENIZER_DIR))
        if len(files) > 1:
            log.info("saved %s in %d shards of at most %s", directory, len(files), max_shard_size)
        return Path(directory)

    @classmethod
    def from_pretrained(
        cls, directory: str | os.PathLike[str], device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None, device_map: str | None = None,
        max_memory: Mapping[int | str, int | str] | None = None, offload_to_disk: bool = False,
    ) -> MLLM:
        """Load a folder written by :meth:`save_pretrained` (one file or shards; no network).

        The LLM, projector, injectors and heads are built on the meta device (accelerate's
        ``init_empty_weights``; buffers such as the rotary ``inv_freq`` are computed for real, as at a
        normal build), the encoder on the CPU (its library may move modules while building), all with
        the torch and transformers weight initialisations switched off (transformers'
        ``no_init_weights``; a library's own init, such as timm's ``trunc_normal_``, still runs on the
        encoder, whose values are then overwritten). Then each stored tensor takes the place of its
        meta parameter (``load_state_dict(assign=True)``): used as stored (CPU, stored dtype), it is the
        file's copy-on-write memory map (safetensors' ``safe_open``), whose pages are read when first
        used; cast or moved, it is read once into a fresh buffer (no map left behind) and converted. No
        random initialisation, no second copy of the weights. Tied weights are tied again
        (transformers' ``tie_weights``). ``device``: default CUDA when available, else CPU; ``dtype``:
        default the checkpoint's (each tensor as stored, and the LLM built in its stored dtype); a given
        floating dtype casts every floating tensor. The choice is logged.

        ``device_map="auto"`` (instead of ``device``) spreads the model over the GPUs, then the CPU, and with
        ``offload_to_disk`` leaves what fits nowhere in the checkpoint files (:mod:`mllm.placement`:
        accelerate's big-model inference; ``max_memory`` as accelerate's). Each tensor is read straight to its
        device.
        """
        from accelerate import init_empty_weights
        from safetensors import safe_open
        from transformers import AutoConfig, AutoTokenizer
        from transformers.initialization import no_init_weights

        from mllm.merge.tensors import MergeError, ModelReader

        root = Path(directory)
        if not root.is_dir():
            raise ModelError(f"{root}: checkpoint folder not found")
        target_dtype = resolve_dtype(dtype)
        check_placement(device, device_map)
        target_device = resolve_device(device)
        for name in (CONFIG_FILE, f"{LLM_DIR}/config.json", TOKENIZER_DIR):
            if not (root / name).exists():
                raise ModelError(f"{root / name}: missing from the checkpoint (written by save_pretrained)")
        if not (root / WEIGHTS_FILE).is_file() and not (root / INDEX_FILE).is_file():
            raise ModelError(f"{root / WEIGHTS_FILE}: missing from the checkpoint (written by save_pretrained; "
                             f"or shards listed in {INDEX_FILE})")
        try:
            reader = ModelReader(root)
        except MergeError as err:
            raise ModelError(str(err)) from err
        try:
            cfg = from_dict(ModelConfig, read_yaml(root / CONFIG_FILE))
        except ConfigError as err:
            raise ConfigError(f"{root / CONFIG_FILE}: {err}", err.key) from err
        stored = _stored_llm_dtype(reader)
        llm_dtype = target_dtype or stored
        cfg = dataclasses.replace(cfg, encoder=_without_weight_files(cfg.encoder),
                                  llm=dataclasses.replace(cfg.llm, dtype=str(llm_dtype).removeprefix("torch.")))
        tokenizer = AutoTokenizer.from_pretrained(str(root / TOKENIZER_DIR), local_files_only=True)
        llm_config = AutoConfig.from_pretrained(str(root / LLM_DIR), local_files_only=True)
        with no_init_weights():
            # The encoder is built for real (libraries such as open_clip move their modules while building,
            # which meta tensors refuse), its torch inits skipped; every other part on the meta device.
            encoder = ENCODERS.build(cfg.encoder.name, cfg.encoder.cfg)
            with init_empty_weights(include_buffers=False):
                model = cls(cfg, tokenizer, llm_config=llm_config, encoder=encoder)
        expected = model.state_dict()
        placed = None
        if device_map is not None:
            model.llm.tie_weights()  # tied parameters are one tensor, counted once by the planner
            placed = plan_device_map(model, device_map, llm_dtype, max_memory, disk=offload_to_disk)
        state, mapped, on_disk = {}, {}, {}
        for name in reader.names():
            shape, stored_dtype = reader.shape(name), reader.dtype(name)
            if name in expected and shape != tuple(expected[name].shape):
                raise ModelError(f"{reader.file_of(name)}: tensor {name!r} has shape {shape}, "
                                 f"{root / CONFIG_FILE} builds {tuple(expected[name].shape)}")
            cast = target_dtype if target_dtype is not None and stored_dtype.is_floating_point else stored_dtype
            where = target_device if placed is None or name not in expected else load_device(placed, name)
            if where is None:  # left in the checkpoint file, read by the dispatch hooks when used
                on_disk[name] = {"safetensors_file": str(reader.file_of(name)), "weight_name": name,
                                 "dtype": str(cast).removeprefix("torch.")}
            elif where.type == "cpu" and cast == stored_dtype:  # used as stored: map the file's pages
                file = reader.file_of(name)
                if file not in mapped:
                    mapped[file] = safe_open(str(file), framework="pt", device="cpu")
                state[name] = mapped[file].get_tensor(name)
            else:  # cast or moved: read into a fresh buffer, which is freed once converted
                state[name] = reader.get(name).to(device=where, dtype=cast)
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
        # A module reachable under two names (an encoder's block alias) got its tensor through the other
        # name; tied weights (lm_head = embeddings, stored once) are tied again by transformers.
        missing = [k for k in missing if _tensor(model, k).is_meta]
        llm_missing = {k.removeprefix("llm.") for k in missing if k.startswith("llm.")}
        if llm_missing:
            model.llm.tie_weights(missing_keys=llm_missing)
        missing = [k for k in missing if _tensor(model, k).is_meta and k not in on_disk]
        if missing or unexpected:
            what = f"missing {missing[:5]}" if missing else f"unexpected {unexpected[:5]}"
            raise ModelError(f"{root}: weights do not match {root / CONFIG_FILE}: {what}")
        dtypes = sorted({str(reader.dtype(n) if target_dtype is None else target_dtype).removeprefix("torch.")
                         for n in reader.names() if reader.dtype(n).is_floating_point})
        if placed is None:
            model.to(target_device)  # the buffers that are not stored (computed at build, on the CPU)
            log.info("loaded %s on %s in %s (%s)", root, target_device, "+".join(dtypes),
                     "as asked" if dtype is not None else "the checkpoint's dtype")
            return model
        model = dispatch(model, placed, on_disk)
        log.info("loaded %s spread as %s (device_map %s) in %s", root, sorted(set(map(str, placed.values()))),
                 device_map, "+".join(dtypes))
        return model



def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` -> CUDA when available, else CPU; a name is checked (``cuda`` without CUDA is a ModelError)."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ModelError(f"device: expected a torch device such as cpu, cuda or cuda:1, got {device!r}") from err
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"device: {device!r} asked, but CUDA is not available on this machine")
    return chosen


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """``None`` (or ``auto``) keeps the checkpoint's; otherwise a torch floating dtype, by name or value."""
    if dtype is None or dtype == "auto":
        return None
    value = dtype if isinstance(dtype, torch.dtype) else getattr(torch, str(dtype), None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise ModelError(f"dtype: expected a torch floating dtype name (float32, bfloat16, float16), got {dtype!r}")
    return value


def _tensor(model: nn.Module, name: str) -> torch.Tensor:
    """The parameter or buffer ``name`` (dotted) of ``model``."""
    owner, _, attr = name.rpartition(".")
    return getattr(model.get_submodule(owner), attr)


def _stored_llm_dtype(reader: Any) -> torch.dtype:
    """The dtype most of the LLM's stored floating weights have (by bytes): the checkpoint's dtype."""
    sizes: dict[torch.dtype, int] = {}
    for name in reader.names():
        dt = reader.dtype(name)
        if name.startswith("llm.") and dt.is_floating_point:
            numel = 1
            for d in reader.shape(name):
                numel *= d
            sizes[dt] = sizes.get(dt, 0) + numel * dt.itemsize
    return max(sizes, key=sizes.__getitem__) if sizes else torch.float32
