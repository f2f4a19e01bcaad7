"""Any transformers image-text-to-text folder behind the eval model protocol, and the loader that picks.

A folder that ``AutoModelForImageTextToText`` and ``AutoProcessor`` load (LLaVA-1.5, LLaVA-OneVision,
Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Idefics3, SmolVLM, Gemma 3, InternVL in transformers' format, ...) runs as it is:
:class:`NativeMLLM` answers ``generate(images, prompts, **kw) -> list[str]``, the protocol of
``eval/runner.py``, so every task and ``mllm chat`` serve it with no per-family code.

The runner's prompts are our user turns, with :data:`IMAGE_MARKER` where the image goes (LLaVA's
``"<image>\\n" + question``). Each becomes one chat message for the processor's own chat template: a
user turn holding the image and the text pieces in their order, then the generation prompt. The
processor expands the image into the family's placeholder tokens; the batch is left-padded so every
row's new tokens start at the same column and greedy decoding of a row does not depend on its batch
mates; only the new tokens are decoded.

:func:`load_generator` picks by what a folder holds: ``mllm_config.yaml`` is ours
(:meth:`mllm.model.MLLM.from_pretrained`), a transformers ``config.json`` is native. For the visual
attention probe (:mod:`mllm.merge.probe`) both kinds answer alike: :func:`image_prompt_batch` builds a
forward batch of images with one prompt, and a :class:`NativeMLLM` exposes what the probe reads of
ours: ``image_token_id``, ``llm`` and a forward (calling it on the batch).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from mllm.model import CONFIG_FILE, AnswersText, ModelError, resolve_device, resolve_dtype
from mllm.placement import check_placement

IMAGE_MARKER = "<image>"  # where the image goes in an eval prompt (eval.tasks.base.IMAGE_MARKER)
HF_CONFIG = "config.json"


def chat_content(prompt: str) -> list[dict[str, str]]:
    """One of our prompts as a chat message's content: an image item at each :data:`IMAGE_MARKER`, the
    text between markers as text items (stripped: the newline after LLaVA's marker belongs to its own
    format, a chat template places the image itself)."""
    content: list[dict[str, str]] = []
    for i, piece in enumerate(prompt.split(IMAGE_MARKER)):
        if i > 0:
            content.append({"type": "image"})
        if piece.strip():
            content.append({"type": "text", "text": piece.strip()})
    return content


class NativeMLLM(AnswersText):
    """A transformers image-text-to-text model and its processor, answering as :class:`mllm.model.MLLM` does.

    Decoding is greedy unless ``generate``'s keywords say otherwise; the model runs in eval mode.
    """

    def __init__(self, model: Any, processor: Any) -> None:
        self.model = model.eval()
        self.processor = processor
        self.tokenizer = processor.tokenizer
        # Left padding: the prompts end in the same column, so new tokens of every row start together.
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token

    @classmethod
    def from_pretrained(
        cls, folder: str | os.PathLike[str], device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None, trust_remote_code: bool = False, device_map: str | None = None,
    ) -> NativeMLLM:
        """Load ``folder`` with ``AutoModelForImageTextToText`` and ``AutoProcessor`` (local files only)
        onto ``device`` (default: CUDA when available, else CPU) in ``dtype`` (default: the checkpoint's), or
        spread over the GPUs and the CPU with ``device_map="auto"`` (transformers' big-model loading)."""
        from transformers import AutoModelForImageTextToText, AutoProcessor

        root = Path(folder)
        if not (root / HF_CONFIG).is_file():
            raise ModelError(f"{root / HF_CONFIG}: not found (expected a transformers model folder)")
        check_placement(device, device_map)
        torch_dtype = resolve_dtype(dtype) or "auto"
        # transformers reads every tensor straight to its device: the whole model to one, or spread by "auto"
        where = device_map if device_map is not None else resolve_device(device)
        try:
            processor = AutoProcessor.from_pretrained(str(root), local_files_only=True,
                                                      trust_remote_code=trust_remote_code)
            model = AutoModelForImageTextToText.from_pretrained(
                str(root), local_files_only=True, dtype=torch_dtype, trust_remote_code=trust_remote_code,
                device_map=where,
            )
        except (ValueError, KeyError) as err:  # transformers: unknown model type / no processor class for it
            raise ModelError(f"{root}: transformers cannot load it as an image-text-to-text model: {err}") from err
        except ImportError as err:  # a family's processor needs an optional package (SmolVLM: num2words)
            raise ModelError(f"{root}: its processor needs a package that is not installed: {err}") from err
        if not hasattr(processor, "tokenizer") or not hasattr(processor, "apply_chat_template"):
            raise ModelError(f"{root}: AutoProcessor gives a {type(processor).__name__}, not a multimodal processor")
        return cls(model, processor)

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    def eval(self) -> NativeMLLM:
        self.model.eval()
        return self

    @property
    def image_token_id(self) -> int:
        """The id of the placeholder the processor repeats once per visual token (``config.image_token_id``,
        or ``image_token_index`` in older configs); tokens wrapped around them (Gemma 3's
        ``<start_of_image>``, Qwen-VL's ``<|vision_start|>``, ...) are not it."""
        for key in ("image_token_id", "image_token_index"):
            value = getattr(self.model.config, key, None)
            if isinstance(value, int):
                return value
        raise ModelError(f"{type(self.model).__name__}: its config names no image token "
                         "(image_token_id / image_token_index)")

    @property
    def llm(self) -> Any:
        """The language model (the decoder stack, whose config is the text config), as ``llm`` of
        :class:`mllm.model.MLLM`."""
        return self.model.get_decoder()

    def __call__(self, **batch: Any) -> Any:
        """The transformers model's forward on a processor batch (:meth:`inputs`) and its keywords."""
        return self.model(**batch)

    def build_prompts(self, prompts: Sequence[str]) -> list[str]:
        """Each prompt as the chat template renders a user turn of it, ready for the answer."""
        if self.processor.chat_template is None and self.tokenizer.chat_template is None:
            raise ModelError("the processor has no chat template (chat_template.jinja / chat_template.json)")
        return [
            self.processor.apply_chat_template([{"role": "user", "content": chat_content(p)}],
                                               add_generation_prompt=True, tokenize=False)
            for p in prompts
        ]

    def inputs(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> Any:
        """The processor's left-padded batch on the model's device (floating tensors in its dtype).

        Images go as one list per prompt (the form every processor accepts, and the one that tells
        Gemma 3's which image is whose); a prompt without a marker is text only and gets none."""
        if len(images) != len(prompts) or not prompts:
            raise ModelError(f"generate: expected as many images as prompts (>= 1), got {len(images)} and {len(prompts)}")
        per_prompt = [[image] * prompt.count(IMAGE_MARKER) for image, prompt in zip(images, prompts, strict=True)]
        batch = self.processor(text=self.build_prompts(prompts), images=per_prompt if any(per_prompt) else None,
                               return_tensors="pt", padding=True)
        return batch.to(self.device, dtype=self.dtype) if hasattr(batch, "to") else batch

    @torch.no_grad()
    def generate_ids(
        self, images: Sequence[Image.Image], prompts: Sequence[str], max_new_tokens: int = 32, **kwargs: Any
    ) -> torch.Tensor:
        """New token ids ``[B, T]``: greedy unless ``kwargs`` say otherwise, the model's own KV cache."""
        batch = self.inputs(images, prompts)
        options = {"do_sample": False, "pad_token_id": self.tokenizer.pad_token_id, **kwargs}
        out = self.model.generate(**batch, max_new_tokens=max_new_tokens, **options)
        return out[:, batch["input_ids"].shape[1]:]



def is_native(folder: str | os.PathLike[str]) -> bool:
    """Whether ``folder`` is a transformers model folder rather than one of ours."""
    root = Path(folder)
    return not (root / CONFIG_FILE).is_file() and (root / HF_CONFIG).is_file()


def load_generator(
    folder: str | os.PathLike[str], device: str | torch.device | None = None, dtype: str | torch.dtype | None = None,
    device_map: str | None = None,
) -> Any:
    """The model in ``folder``, in eval mode, for ``generate``: ours when it holds ``mllm_config.yaml``,
    a :class:`NativeMLLM` when it holds a transformers ``config.json``; anything else is refused
    naming the folder. ``device_map="auto"`` spreads it over the devices instead of ``device``."""
    root = Path(folder)
    if (root / CONFIG_FILE).is_file():
        from mllm.model import MLLM

        return MLLM.from_pretrained(root, device=device, dtype=dtype, device_map=device_map).eval()
    if (root / HF_CONFIG).is_file():
        return NativeMLLM.from_pretrained(root, device=device, dtype=dtype, device_map=device_map)
    what = "folder not found" if not root.is_dir() else f"neither {CONFIG_FILE} (ours) nor {HF_CONFIG} (transformers)"
    raise ModelError(f"{root}: not a model folder ({what})")


def one_image_prompt(prompt: str) -> str:
    """``prompt`` when it places at most one image (:data:`IMAGE_MARKER`; none: the image goes first);
    refused in one line otherwise."""
    if prompt.count(IMAGE_MARKER) > 1:
        raise ModelError(f"prompt: one image per prompt; {prompt!r} holds {prompt.count(IMAGE_MARKER)} {IMAGE_MARKER}")
    return prompt


def image_prompt_batch(model: Any, images: Sequence[Image.Image], prompt: str) -> Any:
    """The forward batch of ``images``, each with the one ``prompt``, on the device of ``model`` (from
    :func:`load_generator`), built as its ``generate`` builds its prompts: the image goes where the
    prompt's :data:`IMAGE_MARKER` is, first when it has none (LLaVA's ``"<image>\\n" + question``; ours
    follows its ``image_first``), ours spliced into its template's image-token slots, a transformers
    model's through :meth:`NativeMLLM.inputs`."""
    one_image_prompt(prompt)
    if isinstance(model, NativeMLLM):
        question = prompt if IMAGE_MARKER in prompt else f"{IMAGE_MARKER}\n{prompt}"
        return model.inputs(images, [question] * len(images))
    from train.templates import encode_prompt

    row = encode_prompt(model.tokenizer, prompt, model.template, model.cfg.image_token, model.num_image_tokens,
                        model.cfg.image_first)
    ids = torch.tensor([row] * len(images), device=model.device)  # one prompt, fixed image slots: no padding
    pixels = torch.stack([model.preprocess(image) for image in images]).to(model.device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels}


def read_image(path: str | os.PathLike[str]) -> Image.Image:
    """An image file as RGB; a missing or unreadable file is one :class:`ModelError` naming it."""
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (OSError, ValueError) as err:
        raise ModelError(f"{path}: cannot read the image: {err}") from err
