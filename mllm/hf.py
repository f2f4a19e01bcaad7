"""Interop with transformers' LLaVA checkpoints: :func:`import_llava` reads a
``LlavaForConditionalGeneration`` folder into an :class:`~mllm.model.MLLM` checkpoint, and
:func:`export_llava` writes one back, so that plain transformers loads it.

Both compute the same function (LLaVA-1.5: Liu et al. 2023, "Improved Baselines with Visual Instruction
Tuning", arXiv:2310.03744; the projected tokens are spliced at the ``<image>`` placeholder as in LLaVA,
Liu et al. 2023, arXiv:2304.08485):
``H_v = W_2 GELU(W_1 concat_k h_k[s:] + b_1) + b_2`` scattered into the ``<image>`` slots of the text
embeddings, then the LLM. The parts correspond one to one:

=====================================  ==========================================================
ours (``MLLM``)                        transformers ``LlavaForConditionalGeneration``
=====================================  ==========================================================
``encoder`` ``hf_vision`` (``.model``)  ``model.vision_tower`` (the same ``AutoModel`` class)
``encoder.layers`` = blocks ``l``       ``vision_feature_layer`` ``k`` (int or list, concatenated)
``encoder.drop_prefix``                 ``vision_feature_select_strategy`` ``default`` / ``full``
``projector`` ``mlp`` depth 2           ``model.multi_modal_projector`` (``projector_hidden_act: gelu``)
  ``layers.0`` / ``layers.2``             ``linear_1`` / ``linear_2`` (``multimodal_projector_bias``)
``llm.<base_model_prefix>`` / ``llm.lm_head``  ``model.language_model`` / ``lm_head``
``image_token`` / ``num_image_tokens``  ``image_token_index`` / ``image_seq_length``
=====================================  ==========================================================

Feature layers: a transformers tower's ``hidden_states`` holds ``depth + 1`` entries, ``[0]`` the
embedding output and ``[i]`` the output of block ``i - 1``; Llava picks ``hidden_states[k]``, our
encoder taps block ``l`` as ``hidden_states[l + 1]``. So ``k < 0`` is ``l = k`` (the same number:
LLaVA's ``-2`` is our ``-2``), ``k > 0`` is ``l = k - 1``, and ``k = 0`` (the embeddings) has no
counterpart. CLS policy: ``default`` drops exactly one leading token, which is our ``drop_prefix``
only for a tower with exactly one prefix token (CLIP's CLS; on SigLIP, which has none, ``default``
would drop a patch and is refused); ``full`` keeps every token. A bias-free Llava projector imports
with zero biases (the same function). Anything else the format cannot express — another encoder
(timm, open_clip, fused), another projector, injectors, an LLM head that rescales or soft-caps its
logits — is refused with an error before anything is written; output folders are written to a temp
folder beside the target and renamed into place, and an existing target is refused.

The table names modules as they are in memory. Files are read and written by transformers itself
(``from_pretrained`` / ``save_pretrained``), so whatever key layout the installed version uses on
disk (5.x still writes 4.x's ``language_model.model.*``) is handled by its own conversion rules.
Import holds the Llava model and ours in memory; export holds ours only (the Llava is built on the
``meta`` device and takes our tensors without copying them where the dtype already matches). An
export in bf16 / fp16 casts the tower and projector to the LLM's dtype, as llava-hf checkpoints are.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from common.atomic import atomic_folder
from common.errors import UserError
from encoders.base import EncoderError
from encoders.hf import HFVisionEncoder, build_image_processor, processed_size
from mllm.config import ConfigError, ModelConfig, from_dict
from mllm.model import MLLM, ModelError
from projectors.mlp import MLPProjector
from train.templates import TemplateError

ENCODER = "hf_vision"  # the registry name of the one encoder Llava can hold
LLAVA_MAX_LENGTH = 2048  # LLaVA-1.5's model_max_length, for training an imported model
_NOT_ARCH = ("model_type", "transformers_version", "architectures", "dtype", "_name_or_path")
_LLM_IDS = ("vocab_size", "pad_token_id", "bos_token_id", "eos_token_id")  # build_llm takes these from the tokenizer


class HFInteropError(UserError, ValueError):
    """The model or folder cannot be converted; the message names the file or field and why."""


# --- index conventions ------------------------------------------------------------------------
def llava_layer_to_ours(k: int, depth: int, where: str = "vision_feature_layer") -> int:
    """Llava's ``hidden_states`` index ``k`` -> our block index (negative stays negative)."""
    if not -depth <= k <= depth or k == 0:
        raise HFInteropError(
            f"{where}: {k} selects {'the embedding output' if k in (0, -depth - 1) else 'no hidden state'} of a "
            f"{depth}-block tower; our encoder taps block outputs, Llava's hidden_states[1..{depth}] (or -{depth}..-1)"
        )
    return k if k < 0 else k - 1


def ours_to_llava_layer(block: int, depth: int) -> int:
    """Our resolved block ``0..depth-1`` -> Llava's negative ``hidden_states`` index (LLaVA's ``-2`` style)."""
    return block - depth


# --- shared checks ----------------------------------------------------------------------------
def _tower_prefix(config: Any, image_size: tuple[int, int], where: str) -> int:
    """Prefix tokens (CLS, registers) of the tower built from ``config``, from a shapes-only forward on
    the ``meta`` device; also checks that ``hidden_states`` starts with the embedding output."""
    from transformers import AutoModel

    with torch.device("meta"):
        shadow = AutoModel.from_config(config)
        try:
            hidden = shadow(pixel_values=torch.empty(1, 3, *image_size), output_hidden_states=True).hidden_states
        except (RuntimeError, ValueError) as err:
            raise HFInteropError(f"{where}: the {config.model_type} tower rejects {image_size} images: {err}") from err
    depth = int(config.num_hidden_layers)
    if len(hidden) != depth + 1:
        raise HFInteropError(
            f"{where}: the {config.model_type} tower returns {len(hidden)} hidden states for {depth} blocks, not "
            "embeddings + one per block, so Llava's vision_feature_layer would not mean our encoder layers"
        )
    patch = int(config.patch_size)
    return int(hidden[-1].shape[1]) - (image_size[0] // patch) * (image_size[1] // patch)


def _check_plain_head(llm: nn.Module, where: str) -> None:
    """Llava's logits are ``lm_head(language_model(x))``; refuse a causal LM that does more (logit
    scaling, soft-capping), checked on a few tokens rather than by model name."""
    base = getattr(llm, llm.base_model_prefix)
    ids = torch.arange(1, 5, device=llm.device).unsqueeze(0) % llm.config.get_text_config().vocab_size
    with torch.no_grad():
        full = llm(input_ids=ids).logits
        plain = llm.get_output_embeddings()(base(input_ids=ids).last_hidden_state)
    if not torch.allclose(full.float(), plain.float(), rtol=1e-3, atol=1e-5):
        raise HFInteropError(
            f"{where}: the {type(llm).__name__} head transforms the logits beyond its output projection (scaling or "
            "soft-capping), which Llava's lm_head cannot express"
        )


def _check_target(out: Path) -> None:
    if out.exists():
        raise HFInteropError(f"--out {out}: already exists; give a new folder (nothing is overwritten)")


def _arch(config: Any, drop: tuple[str, ...] = ()) -> dict[str, Any]:
    """A config's non-default fields, as our ``arch`` mapping (``AutoConfig.for_model(model_type, **arch)``)."""
    return {k: v for k, v in config.to_diff_dict().items() if k not in _NOT_ARCH + drop}


def _projector_linears(model: MLLM) -> tuple[nn.Linear, nn.Linear]:
    """Our projector's two Linear layers, Llava's ``linear_1`` and ``linear_2``."""
    return model.projector.layers[0], model.projector.layers[2]


# --- import -----------------------------------------------------------------------------------
def import_llava(llava_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str]) -> Path:
    """Read a transformers Llava folder (config, safetensors, tokenizer, image processor) and save it as
    our checkpoint at ``out_dir`` (:meth:`MLLM.save_pretrained` layout). Returns ``out_dir``."""
    from transformers import (
        AutoConfig,
        AutoImageProcessor,
        AutoTokenizer,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    src, out = Path(llava_dir), Path(out_dir)
    _check_target(out)
    if not (src / "config.json").is_file():
        raise HFInteropError(f"--from-hf {src}: not a folder with a transformers config.json")
    config = _read_config(src, AutoConfig)
    if not isinstance(config, LlavaConfig):
        raise HFInteropError(f"{src / 'config.json'}: model_type {config.model_type!r}; expected 'llava'")
    where = str(src / "config.json")
    if config.projector_hidden_act != "gelu":
        raise HFInteropError(f"{where}: projector_hidden_act {config.projector_hidden_act!r}; our mlp projector "
                             "uses exact GELU ('gelu')")
    vision = config.vision_config
    feature = config.vision_feature_layer
    layers = [llava_layer_to_ours(k, int(vision.num_hidden_layers), f"{where}: vision_feature_layer")
              for k in (feature if isinstance(feature, list) else [feature])]
    try:
        tokenizer = AutoTokenizer.from_pretrained(src, local_files_only=True)
        image_processor = AutoImageProcessor.from_pretrained(src, local_files_only=True)
    except (OSError, ValueError) as err:
        raise HFInteropError(f"{src}: cannot load its tokenizer and image processor: {_one_line(err)}") from err
    image_size = processed_size(image_processor, str(src))
    strategy = config.vision_feature_select_strategy
    prefix = _tower_prefix(vision, image_size, where)
    if strategy == "default" and prefix != 1:
        raise HFInteropError(
            f"{where}: vision_feature_select_strategy 'default' drops the first token, but the {vision.model_type} "
            f"tower has {prefix} prefix tokens, so it would drop {'a patch' if prefix == 0 else 'only part of them'}; "
            "our encoder drops all prefix tokens or none"
        )
    image_token = tokenizer.convert_ids_to_tokens(config.image_token_id) if config.image_token_id < len(tokenizer) else None
    if not isinstance(image_token, str):
        raise HFInteropError(f"{where}: image_token_index {config.image_token_id} is not a token of the tokenizer")
    llava, info = _read_llava(src, LlavaForConditionalGeneration)
    if info["missing_keys"]:
        raise HFInteropError(f"{src}: the checkpoint lacks weights for {sorted(info['missing_keys'])[:3]}")
    text = copy.deepcopy(config.text_config)
    text.tie_word_embeddings = bool(config.tie_word_embeddings)  # Llava's own flag decides the tie
    llm_dtype = str(llava.model.language_model.dtype).removeprefix("torch.")
    try:
        cfg = from_dict(ModelConfig, {
            "encoder": {"name": ENCODER, "model_type": vision.model_type, "arch": _arch(vision),
                        "processor": json.loads(image_processor.to_json_string()), "layers": layers,
                        "drop_prefix": strategy == "default", "frozen": True},  # LLaVA trains with the tower frozen
            "projector": {"name": "mlp", "depth": 2},
            "llm": {"model_type": text.model_type, "arch": _arch(text, _LLM_IDS), "dtype": llm_dtype},
            "image_token": image_token, "template": "auto", "max_length": LLAVA_MAX_LENGTH,
        }, where=where)
        model = MLLM(cfg, tokenizer, llm_config=text)
    except (ConfigError, EncoderError, ModelError, TemplateError) as err:
        raise HFInteropError(f"{src}: {err}") from err
    if model.image_token_id != config.image_token_id:
        raise HFInteropError(f"{where}: image_token_index {config.image_token_id} is not one token of the tokenizer")
    _copy_from_llava(model, llava)
    _check_plain_head(model.llm, where)
    return model.save_pretrained(out)


def _one_line(err: BaseException) -> str:
    """A library's message, first line only (some run to a paragraph of advice)."""
    return next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)


def _read_config(src: Path, auto_config: Any) -> Any:
    """``src/config.json`` as a transformers config; unreadable JSON or an unknown model is one error naming it."""
    path = src / "config.json"
    try:
        json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:  # ValueError: JSONDecodeError, UnicodeDecodeError
        raise HFInteropError(f"{path}: not a readable JSON file ({_one_line(err)})") from err
    try:
        return auto_config.from_pretrained(src, local_files_only=True)
    except (OSError, ValueError, KeyError) as err:
        raise HFInteropError(f"{path}: not a transformers model config ({_one_line(err)})") from err


def _read_llava(src: Path, llava_cls: Any) -> tuple[Any, dict[str, Any]]:
    """The Llava model of ``src`` and its loading info; a corrupt weight file is one error naming it."""
    from safetensors import SafetensorError, safe_open

    for path in sorted(src.glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt"):  # reads and checks the header only
                pass
        except (SafetensorError, OSError) as err:
            raise HFInteropError(f"{path}: not a readable safetensors file ({_one_line(err)})") from err
    try:
        return llava_cls.from_pretrained(src, local_files_only=True, dtype="auto", output_loading_info=True)
    except (SafetensorError, OSError, ValueError) as err:
        raise HFInteropError(f"{src}: cannot load the Llava weights ({_one_line(err)})") from err


@torch.no_grad()
def _copy_from_llava(model: MLLM, llava: Any) -> None:
    """Llava's weights into ``model``, module by module (strict: every tensor has its place)."""
    model.encoder.model.load_state_dict(llava.model.vision_tower.state_dict(), strict=True)
    proj = llava.model.multi_modal_projector
    for ours, theirs in zip(_projector_linears(model), (proj.linear_1, proj.linear_2), strict=True):
        ours.weight.copy_(theirs.weight)
        if theirs.bias is None:  # multimodal_projector_bias: false is a zero bias here
            ours.bias.zero_()
        else:
            ours.bias.copy_(theirs.bias)
    prefix = model.llm.base_model_prefix
    state = {f"{prefix}.{k}": v for k, v in llava.model.language_model.state_dict().items()}
    state |= {f"lm_head.{k}": v for k, v in llava.lm_head.state_dict().items()}
    model.llm.load_state_dict(state, strict=True)


# --- export -----------------------------------------------------------------------------------
def export_llava(ckpt_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str]) -> Path:
    """Write our checkpoint ``ckpt_dir`` as a transformers Llava folder at ``out_dir`` (config,
    safetensors, tokenizer and a ``LlavaProcessor``, loadable with ``AutoProcessor``). Returns ``out_dir``."""
    from transformers import LlavaProcessor

    out = Path(out_dir)
    _check_target(out)
    model = MLLM.from_pretrained(ckpt_dir).eval()
    config, prefix = _llava_config(model, str(ckpt_dir))
    llava = _as_llava(model, config, str(ckpt_dir))
    encoder: HFVisionEncoder = model.encoder  # type: ignore[assignment]
    processor = LlavaProcessor(
        image_processor=build_image_processor(encoder.cfg.path, encoder.cfg.processor, "encoder"),
        tokenizer=model.tokenizer, patch_size=int(config.vision_config.patch_size),
        vision_feature_select_strategy=config.vision_feature_select_strategy, image_token=model.cfg.image_token,
        num_additional_image_tokens=prefix,
    )

    with atomic_folder(out) as tmp:
        llava.save_pretrained(tmp)  # transformers' own writer: its weight names, shards and generation config
        processor.save_pretrained(tmp)
    return out


def _llava_config(model: MLLM, where: str) -> tuple[Any, int]:
    """The ``LlavaConfig`` expressing ``model`` and its tower's prefix-token count; refuses what it cannot."""
    from transformers import LlavaConfig

    name = model.cfg.encoder.name
    if not isinstance(model.encoder, HFVisionEncoder):
        raise HFInteropError(f"{where}: model.encoder is {name!r} ({type(model.encoder).__name__}); Llava holds one "
                             f"transformers vision model, our encoder {ENCODER!r}")
    if not isinstance(model.projector, MLPProjector) or model.projector.cfg.depth != 2:
        raise HFInteropError(f"{where}: model.projector is {model.cfg.projector.name!r}; Llava's projector is "
                             "Linear-GELU-Linear, our 'mlp' with depth 2")
    if model.injectors or not model.cfg.splice:
        raise HFInteropError(f"{where}: model.injectors / model.splice: false; Llava only splices visual tokens "
                             "into the sequence")
    encoder = model.encoder
    vision = copy.deepcopy(encoder.model.config)
    text = copy.deepcopy(model.llm.config)
    vision.name_or_path = text.name_or_path = ""  # local paths of this machine mean nothing in the export
    prefix = _tower_prefix(vision, encoder.image_size, f"{where}: model.encoder")
    dropped = prefix if encoder.cfg.drop_prefix else 0
    if dropped > 1:
        raise HFInteropError(f"{where}: model.encoder.drop_prefix drops {prefix} prefix tokens; Llava's 'default' "
                             "strategy drops exactly one (CLS) and 'full' none (set drop_prefix: false)")
    depth = int(vision.num_hidden_layers)
    feature = [ours_to_llava_layer(block, depth) for block in encoder.layers]
    _check_plain_head(model.llm, f"{where}: model.llm")
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=model.image_token_id,
        image_seq_length=model.num_image_tokens, projector_hidden_act="gelu",
        vision_feature_select_strategy="default" if dropped else "full",
        vision_feature_layer=feature[0] if len(feature) == 1 else feature, multimodal_projector_bias=True,
        tie_word_embeddings=bool(text.tie_word_embeddings),
    )
    config.dtype = next(model.llm.parameters()).dtype
    return config, prefix


def _as_llava(model: MLLM, config: Any, where: str) -> Any:
    """A ``LlavaForConditionalGeneration`` built from ``config`` on the ``meta`` device whose parameters
    are our tensors (in the LLM's dtype; no copy where the dtype already matches), after checking
    them name by name and shape by shape. Only for saving: non-persistent buffers stay on ``meta``."""
    from transformers import LlavaForConditionalGeneration

    llm = model.llm
    base = llm.base_model_prefix
    state = {f"model.vision_tower.{k}": v for k, v in model.encoder.model.state_dict().items()}
    for i, ours in enumerate(_projector_linears(model), start=1):
        state |= {f"model.multi_modal_projector.linear_{i}.{k}": v for k, v in ours.state_dict().items()}
    for key, tensor in llm.state_dict().items():
        head, _, rest = key.partition(".")
        if head not in (base, "lm_head"):
            raise HFInteropError(f"{where}: LLM tensor {key!r} is outside its base model ({base}) and lm_head; "
                                 "Llava has no place for it")
        state[f"model.language_model.{rest}" if head == base else key] = tensor
    with torch.device("meta"):
        reference = LlavaForConditionalGeneration(config)
    expected = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    if got != expected:
        diff = sorted(set(got) ^ set(expected)) or sorted(k for k in got if got[k] != expected[k])
        raise HFInteropError(f"{where}: our tensors do not fit Llava's (first differences: {diff[:3]})")
    reference.load_state_dict({k: v.detach().to(config.dtype) for k, v in state.items()}, strict=True, assign=True)
    if config.tie_word_embeddings:
        reference.tie_weights()
    return reference
