"""lmms-eval's model ``mllm``: any of its tasks on our checkpoints and on transformers MLLM folders.

lmms-eval (Zhang et al., 2024, "LMMs-Eval: Reality Check on the Evaluation of Large Multimodal Models",
arXiv:2407.12772) finds models outside its tree through the Python entry-point group ``lmms_eval.models``;
``pyproject.toml`` names :func:`manifest` there, so with the extra ``lmms`` installed::

    lmms-eval --model mllm --model_args pretrained=DIR --tasks textvqa_val --batch_size 8

loads ``DIR`` with :func:`mllm.hf_native.load_generator` (ours when it holds ``mllm_config.yaml``, a
transformers image-text-to-text folder otherwise). ``model_args`` also take ``device``, ``dtype`` and
``max_new_tokens`` (the budget when a task's ``generation_kwargs`` name none; 1024, as lmms-eval's
transformers models).

:class:`MLLMEval` is a "simple" lmms-eval model: lmms-eval hands it the task's prompt text and its
``doc_to_visual`` images, and it answers through ``generate(images, prompts)``, the eval protocol our
runner uses, so an lmms-eval run and ``mllm eval`` put the same prompt in front of the model. Requests
are batched by identical ``generation_kwargs``, longest prompt first; ``temperature`` 0 (the default)
is greedy decoding, above 0 sampling with it (and ``top_p``); the answer is cut at the first of the
``until`` strings, as lmms-eval's own models cut it. A prompt without ``<image>`` gets the image where
the model expects it: ours per its config's ``image_first``, a transformers model first (LLaVA's
``"<image>\\n" + question``, what lmms-eval's LLaVA models do). One image per request: our protocol's
unit; video, audio, several images or none are refused naming the task and document.

``loglikelihood`` requests (likelihood-scored multiple choice) get :func:`continuation_logprob`, one
request per forward. (lmms-eval 0.7's evaluator passes every model output through
``unwrap_generation_output``, which turns a ``(float, bool)`` pair into its string, so its own
``multiple_choice`` tasks stop there for any model until it is fixed upstream.)
``generate_until_multi_round`` raises :class:`NotImplementedError`. One process: ``accelerate launch``
data parallelism is not wired (rank 0 of 1).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from lmms_eval.utils import Collator
from PIL import Image
from tqdm.auto import tqdm

from common.errors import UserError

MODEL_ID = "mllm"  # the name lmms-eval's --model takes
IMAGE_MARKER = "<image>"  # where the image goes in a prompt (mllm.hf_native.IMAGE_MARKER)
DEFAULT_MAX_NEW_TOKENS = 1024  # lmms-eval's transformers models' budget when a task names none


class LmmsRequestError(UserError, ValueError):
    """An lmms-eval request or model argument this model cannot serve."""


def manifest() -> Any:
    """The ``lmms_eval.models`` entry point: ``mllm`` is :class:`MLLMEval`, a simple model.

    lmms-eval loads its entry points while ``lmms_eval.models`` initialises; importing that package at
    the top here would, when this module is imported first, run that loading while this module is
    half-built, and lmms-eval drops an entry point whose loading fails."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=f"{__name__}.MLLMEval")


def cut_at_stops(text: str, until: Sequence[str]) -> str:
    """``text`` up to the first occurrence of each non-empty stop string in turn (lmms-eval's rule)."""
    for stop in until:
        if stop:
            text = text.split(stop)[0]
    return text


def decoding(gen_kwargs: dict[str, Any], default_max_new_tokens: int) -> dict[str, Any]:
    """Our ``generate`` keywords for an lmms-eval task's ``generation_kwargs``: the token budget, greedy
    at ``temperature`` 0 (lmms-eval's default), sampling at that temperature (and ``top_p``) above, beam
    search when ``num_beams`` > 1. ``until`` is applied to the text afterwards (:func:`cut_at_stops`);
    lmms-eval's other keys (``do_sample`` beside the temperature, ``image_aspect_ratio``, ...) describe
    its own models' preprocessing and are not ours to honour."""
    options: dict[str, Any] = {"max_new_tokens": int(gen_kwargs.get("max_new_tokens", default_max_new_tokens))}
    temperature = float(gen_kwargs.get("temperature") or 0.0)
    if temperature > 0:
        options.update(do_sample=True, temperature=temperature)
        if gen_kwargs.get("top_p") is not None:
            options["top_p"] = float(gen_kwargs["top_p"])
    num_beams = int(gen_kwargs.get("num_beams") or 1)
    if num_beams > 1:
        options["num_beams"] = num_beams
    return options


def stop_strings(gen_kwargs: dict[str, Any]) -> list[str]:
    """A task's ``until``: one string or a list; refused in one line otherwise."""
    until = gen_kwargs.get("until", [])
    if isinstance(until, str):
        return [until]
    if not isinstance(until, list) or not all(isinstance(s, str) for s in until):
        raise LmmsRequestError(f"generation_kwargs.until: expected a string or a list of strings, got {until!r}")
    return until


def continuation_logprob(model: Any, image: Image.Image, prompt: str, continuation: str) -> tuple[float, bool]:
    """``sum_t log p(c_t | image, prompt, c_<t)`` over the continuation's tokens ``c``, and whether each
    ``c_t`` is the argmax there (greedy decoding would produce them): one forward of the prompt as
    ``generate`` builds it (:func:`mllm.hf_native.image_prompt_batch`) followed by ``c``, tokenized on
    its own as an answer's text is, with no special tokens."""
    from mllm.hf_native import image_prompt_batch

    tokens = model.tokenizer(continuation, add_special_tokens=False)["input_ids"]
    if not tokens:
        raise LmmsRequestError(f"loglikelihood: the continuation {continuation!r} has no tokens")
    batch = dict(image_prompt_batch(model, [image], prompt))
    n = batch["input_ids"].shape[1]
    tail = torch.tensor([tokens], device=batch["input_ids"].device)
    batch["input_ids"] = torch.cat([batch["input_ids"], tail], dim=1)
    batch["attention_mask"] = torch.cat([batch["attention_mask"], torch.ones_like(tail)], dim=1)
    for key in ("mm_token_type_ids", "token_type_ids"):  # per-token modality (Qwen-VL, Gemma 3): text is 0
        if key in batch:
            batch[key] = torch.cat([batch[key], torch.zeros_like(tail)], dim=1)
    logits = model(**batch).logits[0, n - 1:-1].float()  # position i predicts token i + 1
    picked = logits.log_softmax(-1).gather(-1, tail[0, :, None]).sum()
    return float(picked), bool((logits.argmax(-1) == tail[0]).all())


class MLLMEval(lmms):
    """An lmms-eval simple model over ``load_generator(pretrained)``."""

    is_simple = True

    def __init__(
        self, pretrained: str, device: str | None = None, dtype: str | None = None, batch_size: int | str = 1,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, max_batch_size: int | None = None,
    ) -> None:
        """``max_batch_size`` is lmms-eval's cap for ``batch_size=auto``, which this model does not offer:
        lmms-eval passes it to every model, so it is accepted and unused."""
        super().__init__()
        from mllm.hf_native import load_generator

        if not str(batch_size).isdigit() or int(batch_size) < 1:
            raise LmmsRequestError(f"batch_size: expected an integer >= 1, got {batch_size!r}")
        if int(max_new_tokens) < 1:
            raise LmmsRequestError(f"model_args max_new_tokens: expected >= 1, got {max_new_tokens!r}")
        self.batch_size = int(batch_size)
        self.max_new_tokens = int(max_new_tokens)
        self.model = load_generator(pretrained, device=device, dtype=dtype)

    def prompt(self, context: str) -> str:
        """``context`` as our prompt: as given when it places the image; else, for a transformers model,
        the image first; ours places a missing marker as it was trained (its ``image_first``)."""
        from mllm.hf_native import NativeMLLM

        if IMAGE_MARKER in context or not isinstance(self.model, NativeMLLM):
            return context
        return f"{IMAGE_MARKER}\n{context}"

    def image(self, doc_to_visual: Any, doc_id: int, task: str, split: str) -> Image.Image:
        """The one image of document ``doc_id``, RGB; refused in one line when it is not exactly one image."""
        visuals = doc_to_visual(self.task_dict[task][split][doc_id])
        visuals = visuals if isinstance(visuals, list) else [visuals]
        if len(visuals) != 1 or not isinstance(visuals[0], Image.Image):
            kinds = ", ".join(type(v).__name__ for v in visuals) or "none"
            raise LmmsRequestError(f"task {task} ({split}), doc {doc_id}: model {MODEL_ID} answers one image per "
                                   f"prompt, doc_to_visual gave {len(visuals)} visual(s) ({kinds})")
        return visuals[0].convert("RGB")

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Answers in request order; each request's ``args`` are lmms-eval's ``(context, generation_kwargs,
        doc_to_visual, doc_id, task, split)``."""
        order = Collator([r.args for r in requests], lambda a: (-len(a[0]), a[0]), grouping=True)
        answers: list[str] = []
        with tqdm(total=len(requests), desc="mllm generate", disable=self.rank != 0) as bar:
            for chunk in order.get_batched(n=self.batch_size):
                contexts, all_kwargs, to_visual, doc_ids, tasks, splits = zip(*chunk, strict=True)
                gen_kwargs = dict(all_kwargs[0])  # one group shares its kwargs; lmms-eval's dict is not ours to edit
                images = [self.image(*args) for args in zip(to_visual, doc_ids, tasks, splits, strict=True)]
                with torch.no_grad():
                    texts = self.model.generate(images, [self.prompt(c) for c in contexts],
                                                **decoding(gen_kwargs, self.max_new_tokens))
                until = stop_strings(gen_kwargs)
                answers.extend(cut_at_stops(text, until) for text in texts)
                bar.update(len(chunk))
        return order.get_original(answers)

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """``(log P(continuation | image, context), greedy)`` per request (:func:`continuation_logprob`);
        ``args`` are lmms-eval's ``(context, continuation or doc_to_target, doc_to_visual, doc_id, task,
        split)``, one request at a time."""
        answers = []
        for request in tqdm(requests, desc="mllm loglikelihood", disable=self.rank != 0):
            if len(request.args) != 6:  # lmms-eval's unconditional (mutual-information) requests carry no image
                raise LmmsRequestError(f"task {request.task_name}: a loglikelihood request without an image "
                                       "(multiple_choice with acc_mutual_info) is not served")
            context, target, to_visual, doc_id, task, split = request.args
            continuation = target if isinstance(target, str) else target(self.task_dict[task][split][doc_id])
            image = self.image(to_visual, doc_id, task, split)
            with torch.no_grad():
                answers.append(continuation_logprob(self.model, image, context, continuation))
        return answers

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError(f"model {MODEL_ID}: multi-round generation is not served; one question per image")
