"""Prompt templates, and tokenisation that builds the label mask while it appends (prismatic style).

A :class:`Template` renders a LLaVA-JSON conversation into :class:`Segment`s — text pieces, or the
tokenizer's own BOS/EOS ids — each marked as a training target or not. :func:`encode_segments`
tokenises them one by one and appends ``labels = ids`` for targets and ``-100`` otherwise, so the
mask is never recovered by searching strings afterwards (the LLaVA #1706/#1166 failure mode).
Every ``<image>`` marker in the text becomes ``num_image_tokens`` copies of the image token id.

``plain`` renders ``<s>USER: <image>\\n{q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT: {a2}</s>``:
the loss covers each answer and the ``</s>`` closing it (every turn), nothing else. ``chat`` renders
through the tokenizer's own chat template (:class:`ChatTemplate`); ``auto`` is ``chat`` when the
tokenizer has a chat template and ``plain`` otherwise.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from common.errors import UserError

IGNORE_INDEX = -100  # label of positions that carry no loss (torch cross-entropy's ignore_index)
IMAGE_MARKER = "<image>"  # the placeholder LLaVA's conversation JSON puts in the human turn


class TemplateError(UserError, ValueError):
    """A conversation does not fit the template, or tokenisation is inconsistent."""


@dataclass(frozen=True)
class Segment:
    """One piece of a rendered conversation: ``text`` to tokenise, or a ``special`` token id."""

    text: str = ""
    special: Literal["bos", "eos"] | None = None
    target: bool = False  # supervised: these ids are also the labels


class Template:
    """Renders conversations (training) and single questions (generation) into segments."""

    name: str = ""

    def render(self, conversations: Sequence[Mapping[str, Any]]) -> list[Segment]:
        raise NotImplementedError

    def render_prompt(self, question: str) -> list[Segment]:
        """The prompt for one question, ending where the assistant's answer begins."""
        raise NotImplementedError

    def vocabulary_texts(self) -> list[str]:
        """The text the template itself adds (role names, separators), for building a tokenizer's
        vocabulary alongside the data's own texts."""
        empty = [{"from": "human", "value": ""}, {"from": "gpt", "value": ""}] * 2
        return [seg.text for seg in self.render(empty) if seg.text]


def pair_turns(conversations: Sequence[Mapping[str, Any]]) -> list[tuple[str, str]]:
    """``[(human, gpt), ...]`` from LLaVA's alternating turns; anything else is an error."""
    if not conversations or len(conversations) % 2:
        raise TemplateError(f"expected alternating human/gpt turns, got {len(conversations)} turns")
    pairs = []
    for i in range(0, len(conversations), 2):
        human, gpt = conversations[i], conversations[i + 1]
        if human.get("from") != "human" or gpt.get("from") != "gpt":
            raise TemplateError(
                f"turns {i}, {i + 1}: expected 'human' then 'gpt', got {human.get('from')!r}, {gpt.get('from')!r}"
            )
        if IMAGE_MARKER in gpt["value"]:
            raise TemplateError(f"turn {i + 1}: an {IMAGE_MARKER} marker in an assistant answer")
        pairs.append((str(human["value"]), str(gpt["value"])))
    return pairs


class PlainTemplate(Template):
    """``<s>USER: {q} ASSISTANT: {a}</s>`` per turn (Vicuna-v1 roles, no system prompt)."""

    name = "plain"

    def _header(self, question: str) -> Segment:
        return Segment(f"USER: {question} ASSISTANT:")

    def render(self, conversations: Sequence[Mapping[str, Any]]) -> list[Segment]:
        segments = [Segment(special="bos")]
        for question, answer in pair_turns(conversations):
            segments += [self._header(question), Segment(f" {answer}", target=True),
                         Segment(special="eos", target=True)]
        return segments

    def render_prompt(self, question: str) -> list[Segment]:
        return [Segment(special="bos"), self._header(question)]


ROLES = {"human": "user", "gpt": "assistant"}  # LLaVA JSON roles -> chat-template roles


class ChatTemplate(Template):
    """The tokenizer's own chat template (``tokenizer.apply_chat_template``), labels built turn by turn.

    With ``m`` the conversation as chat messages, turn k renders ``P_k = chat(m[:2k+1], generation
    prompt)`` (history + question + assistant header) and ``F_k = chat(m[:2k+2])`` (+ the answer and
    the template's end of turn). The template must only append: ``F_{k-1}`` a prefix of ``P_k`` and
    ``P_k`` a prefix of ``F_k``. Turn k then contributes ``P_k[len F_{k-1}:]`` unsupervised and
    ``F_k[len P_k:]`` (answer + end-of-turn marker, e.g. ChatML's ``<|im_end|>\\n``) as the target,
    so system prompts, user turns and headers never carry loss. A template that rewrites earlier
    turns when a later one is added (e.g. dropping past reasoning) is an error, not a wrong mask.
    """

    name = "chat"

    def __init__(self, tokenizer: Any) -> None:
        if not getattr(tokenizer, "chat_template", None):
            raise TemplateError("template 'chat': the tokenizer has no chat_template")
        self.tokenizer = tokenizer

    def _chat(self, messages: list[dict[str, str]], generation_prompt: bool) -> str:
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
        if not isinstance(text, str):
            raise TemplateError(f"template 'chat': apply_chat_template returned {type(text).__name__}, not text")
        return text

    def render(self, conversations: Sequence[Mapping[str, Any]]) -> list[Segment]:
        messages: list[dict[str, str]] = []
        segments: list[Segment] = []
        done = ""  # F_{k-1}: the rendered conversation so far
        for k, (question, answer) in enumerate(pair_turns(conversations)):
            messages.append({"role": ROLES["human"], "content": question})
            prompt = self._chat(messages, generation_prompt=True)
            messages.append({"role": ROLES["gpt"], "content": answer})
            full = self._chat(messages, generation_prompt=False)
            if not prompt.startswith(done) or not full.startswith(prompt):
                raise TemplateError(
                    f"template 'chat': turn {k} does not extend the text rendered before it; the chat "
                    "template rewrites earlier turns, so labels cannot be built turn by turn"
                )
            segments += [Segment(prompt[len(done):]), Segment(full[len(prompt):], target=True)]
            done = full
        return segments

    def render_prompt(self, question: str) -> list[Segment]:
        return [Segment(self._chat([{"role": ROLES["human"], "content": question}], generation_prompt=True))]


TEMPLATES: dict[str, Template] = {t.name: t for t in (PlainTemplate(),)}  # templates needing no tokenizer
TOKENIZER_TEMPLATES = ("chat", "auto")  # built for a tokenizer by get_template


def get_template(template: str | Template, tokenizer: Any = None) -> Template:
    """A template by name; ``chat`` / ``auto`` read ``tokenizer``'s chat template."""
    if isinstance(template, Template):
        return template
    if template in TEMPLATES:
        return TEMPLATES[template]
    if template not in TOKENIZER_TEMPLATES:
        names = ", ".join([*TEMPLATES, *TOKENIZER_TEMPLATES])
        raise TemplateError(f"template: unknown name {template!r}; expected one of: {names}")
    if tokenizer is None:
        raise TemplateError(f"template {template!r} is built from a tokenizer; none was given")
    if template == "auto" and not getattr(tokenizer, "chat_template", None):
        return TEMPLATES["plain"]
    return ChatTemplate(tokenizer)


def _special_id(tokenizer: Any, which: str) -> int:
    token_id = getattr(tokenizer, f"{which}_token_id")
    if token_id is None:
        raise TemplateError(f"the tokenizer has no {which} token, which the template needs")
    return int(token_id)


def image_token_id(tokenizer: Any, image_token: str) -> int:
    """The id of ``image_token``, which must be a single token the tokenizer knows."""
    ids = tokenizer.convert_tokens_to_ids([image_token])
    if len(ids) != 1 or ids[0] is None or ids[0] == tokenizer.unk_token_id:
        raise TemplateError(f"image_token: {image_token!r} is not a token of the tokenizer")
    return int(ids[0])


def _tokenise_text(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_segments(
    tokenizer: Any, segments: Sequence[Segment], image_token: str, num_image_tokens: int
) -> tuple[list[int], list[int]]:
    """Append each segment's ids, and its labels as they are appended; expand image markers.

    Each run of text between fixed ids (BOS/EOS, image tokens) is also tokenised as one string: if
    that differs from the piecewise result (a tokenizer merging across a segment boundary) the
    labels would be misaligned, so it is an error rather than a silently wrong mask.
    """
    image_id = image_token_id(tokenizer, image_token)
    input_ids: list[int] = []
    labels: list[int] = []
    run: list[str] = []  # the current run of text pieces, tokenised from input_ids[run_start:]
    run_start = 0

    def append(ids: list[int], target: bool) -> None:
        input_ids.extend(ids)
        labels.extend(ids if target else [IGNORE_INDEX] * len(ids))

    def append_text(text: str, target: bool) -> None:
        nonlocal run_start
        if not run:
            run_start = len(input_ids)
        run.append(text)
        append(_tokenise_text(tokenizer, text), target)

    def end_run() -> None:
        whole = "".join(run)
        # A run of one piece was tokenised whole already (a prompt's runs mostly are): nothing to compare.
        if len(run) > 1 and _tokenise_text(tokenizer, whole) != input_ids[run_start:]:
            raise TemplateError(
                f"tokenising {whole!r} piece by piece differs from tokenising it whole; "
                "the template's segment boundaries split tokens"
            )
        run.clear()

    for seg in segments:
        if seg.special is not None:
            end_run()
            append([_special_id(tokenizer, seg.special)], seg.target)
            continue
        head, *after_images = seg.text.split(IMAGE_MARKER)
        if after_images and seg.target:
            raise TemplateError(f"an {IMAGE_MARKER} marker inside a target segment")
        append_text(head, seg.target)
        for piece in after_images:
            end_run()
            append([image_id] * num_image_tokens, False)
            append_text(piece, seg.target)
    end_run()
    return input_ids, labels


def encode_conversation(
    tokenizer: Any,
    conversations: Sequence[Mapping[str, Any]],
    template: str | Template,
    image_token: str,
    num_image_tokens: int,
) -> tuple[list[int], list[int]]:
    """Training ids and labels of a LLaVA-JSON conversation (labels -100 off the answers)."""
    segments = get_template(template, tokenizer).render(conversations)
    return encode_segments(tokenizer, segments, image_token, num_image_tokens)


def encode_prompt(
    tokenizer: Any, question: str, template: str | Template, image_token: str, num_image_tokens: int,
    image_first: bool = True,
) -> list[int]:
    """Generation prompt ids, ending at the assistant header.

    As in LLaVA's evaluation, a question without an ``<image>`` marker gets ``"<image>\n"``
    prepended (``image_first``; else ``"\n<image>"`` appended), so the prompt matches the first
    training turn exactly.
    """
    if IMAGE_MARKER not in question:
        question = f"{IMAGE_MARKER}\n{question}" if image_first else f"{question}\n{IMAGE_MARKER}"
    segments = get_template(template, tokenizer).render_prompt(question)
    return encode_segments(tokenizer, segments, image_token, num_image_tokens)[0]
