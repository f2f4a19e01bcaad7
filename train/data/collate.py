"""Training batches: tokenise each conversation with its label mask, expand the image, pad right.

Truncation to ``max_length`` happens here, after image expansion, and is checked here: cutting
into the image tokens (the model would then find fewer placeholders than visual tokens, LLaVA
#447) or leaving a sample with no supervised token is an error naming the sample id, never a
silently zeroed sample.

Text-only samples (no image) mix freely with image samples: ``pixel_values`` then holds the images
of the rows that have one, in row order, and ``has_image`` flags those rows.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from PIL import Image

from common.errors import UserError
from train.templates import (
    IGNORE_INDEX,
    Template,
    TemplateError,
    encode_conversation,
    get_template,
    image_token_id,
)

log = logging.getLogger("mllm.data")


class CollateError(UserError, ValueError):
    """A sample cannot be turned into a valid training row; the message names its id."""


ImageTargets = Callable[[Mapping[str, Any]], Mapping[str, torch.Tensor]]


class Collator:
    """``samples -> {"input_ids", "attention_mask", "labels", "pixel_values"[, "has_image"]}``, right-padded.

    Each sample is a dict with ``id``, ``image`` (PIL) and LLaVA ``conversations`` holding one
    ``<image>`` marker, or, for a text-only sample, no ``image`` (or ``None``) and no marker.
    ``pixel_values`` (``[n_images, 3, H, W]``) is left out when no row has an image; ``has_image``
    (bool ``[B]``) is added when some row has none. A ``None`` in place of a sample (one whose image
    a data set could not read and skips) is dropped and counted in ``skipped``.
    With ``image_targets`` (each a ``sample -> {key: tensor}`` function, e.g. an auxiliary head's targets),
    the batch also holds every key they return, stacked over the rows with an image.
    """

    def __init__(
        self,
        tokenizer: Any,
        template: str | Template,
        image_token: str,
        num_image_tokens: int,
        preprocess: Callable[[Image.Image], torch.Tensor],
        max_length: int,
        image_targets: Sequence[ImageTargets] = (),
    ) -> None:
        if tokenizer.pad_token_id is None:
            raise CollateError("the tokenizer has no pad token, which right padding needs")
        if max_length < num_image_tokens + 1:
            raise CollateError(f"max_length: {max_length} leaves no room beyond {num_image_tokens} image tokens")
        self.tokenizer = tokenizer
        self.template = get_template(template, tokenizer)
        self.image_token = image_token
        self.image_id = image_token_id(tokenizer, image_token)
        self.num_image_tokens = num_image_tokens
        self.preprocess = preprocess
        self.max_length = max_length
        self.image_targets = list(image_targets)
        self.skipped = 0  # samples dropped because the data set handed None (this process)

    def encode(self, sample: Mapping[str, Any], index: int = 0) -> tuple[list[int], list[int]]:
        """Ids and labels of one sample, truncated to ``max_length`` with the checks above."""
        sid = sample.get("id", f"#{index}")
        has_image = sample.get("image") is not None
        if has_image and not isinstance(sample["image"], Image.Image):
            raise CollateError(f"sample {sid}: expected a PIL image under 'image', got {type(sample['image']).__name__}")
        try:
            ids, labels = encode_conversation(
                self.tokenizer, sample["conversations"], self.template, self.image_token, self.num_image_tokens
            )
        except (TemplateError, KeyError) as err:
            raise CollateError(f"sample {sid}: {err}") from err
        positions = [i for i, t in enumerate(ids) if t == self.image_id]
        if not has_image and positions:
            raise CollateError(
                f"sample {sid}: expected a PIL image under 'image' for its <image> marker "
                "(a text-only sample has no marker)"
            )
        if has_image and len(positions) != self.num_image_tokens:
            raise CollateError(
                f"sample {sid}: expected one <image> marker ({self.num_image_tokens} image tokens), "
                f"found {len(positions)} image tokens"
            )
        if len(ids) > self.max_length:
            if positions and positions[-1] >= self.max_length:
                raise CollateError(
                    f"sample {sid}: truncating {len(ids)} tokens to max_length={self.max_length} would cut "
                    "its image tokens; raise max_length"
                )
            ids, labels = ids[: self.max_length], labels[: self.max_length]
        if all(label == IGNORE_INDEX for label in labels):
            raise CollateError(
                f"sample {sid}: no answer token left to supervise within max_length={self.max_length}"
            )
        return ids, labels

    def __call__(self, samples: Sequence[Mapping[str, Any] | None]) -> dict[str, torch.Tensor]:
        kept = [sample for sample in samples if sample is not None]
        if len(kept) < len(samples):
            self.skipped += len(samples) - len(kept)
            log.warning("dropped %d skipped sample(s) from a batch (%d so far)", len(samples) - len(kept), self.skipped)
        if not kept:
            raise CollateError("every sample of a batch was skipped (unreadable images; see the warnings above)")
        samples = kept
        rows = [self.encode(sample, i) for i, sample in enumerate(samples)]
        width = max(len(ids) for ids, _ in rows)
        input_ids = torch.full((len(rows), width), self.tokenizer.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, (ids, labs) in enumerate(rows):
            input_ids[r, : len(ids)] = torch.tensor(ids)
            labels[r, : len(labs)] = torch.tensor(labs)
            attention_mask[r, : len(ids)] = 1
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        has_image = [sample.get("image") is not None for sample in samples]
        if any(has_image):
            with_image = [s for s, h in zip(samples, has_image, strict=True) if h]
            batch["pixel_values"] = torch.stack([self.preprocess(s["image"]) for s in with_image])
            for targets in self.image_targets:
                rows = [targets(s) for s in with_image]
                batch.update({key: torch.stack([row[key] for row in rows]) for key in rows[0]})
        if not all(has_image):
            batch["has_image"] = torch.tensor(has_image, dtype=torch.bool)
        return batch
