"""TextVQA accuracy as LLaVA's m4c evaluator computes it, LLaVA-1.5 prompt, optional OCR tokens.

Files (the public release): ``data`` = ``TextVQA_0.5.1_val.json`` (``{"data": [{"question_id",
"image_id", "question", "answers": [10 strings]}]}``), images ``<image_id>.jpg`` in ``images``
(default: ``train_images/`` beside ``data``). With ``ocr`` set to the Rosetta OCR file
(``TextVQA_Rosetta_OCR_v0.2_val.json``: ``{"data": [{"image_id", "ocr_tokens": [...]}]}``) the prompt
carries the tokens as LLaVA-1.5 does ("Reference OCR token: a, b, c"), and the protocol records it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eval.metrics import textvqa_accuracy
from eval.tasks.base import (
    IMAGE_MARKER,
    LLAVA_SHORT_ANSWER,
    EvalDataError,
    EvalSample,
    FileTask,
    FileTaskConfig,
    field_of,
    image_file,
    list_field,
    read_json,
    str_list,
)
from eval.tasks.hub_copies import lmms_eval_entry


@dataclass
class TextVQAConfig(FileTaskConfig):
    ocr: str | None = None  # Rosetta OCR JSON; None = no OCR tokens in the prompt
    ocr_prompt: str = IMAGE_MARKER + "\n{question}\nReference OCR token: {ocr}\n" + LLAVA_SHORT_ANSWER


class TextVQATask(FileTask[TextVQAConfig]):
    config_cls = TextVQAConfig
    name = "textvqa"
    prompt_version = "llava-1.5"

    def __init__(self, cfg: TextVQAConfig) -> None:
        super().__init__(cfg)
        if cfg.ocr:
            if "{ocr}" not in cfg.ocr_prompt or "{question}" not in cfg.ocr_prompt:
                raise EvalDataError(f"textvqa.ocr_prompt: needs '{{question}}' and '{{ocr}}', got {cfg.ocr_prompt!r}")
            self.prompt = cfg.ocr_prompt

    def data_files(self) -> list[str]:
        return [self.cfg.data, *([self.cfg.ocr] if self.cfg.ocr else [])]

    def _ocr_tokens(self) -> dict[str, list[str]]:
        path = Path(str(self.cfg.ocr))
        tokens = {}
        for i, row in enumerate(list_field(read_json(path), "data", path)):
            where = f"{path}: data[{i}]"
            tokens[field_of(row, "image_id", str, where)] = str_list(row, "ocr_tokens", where)
        return tokens

    def samples(self) -> Iterator[EvalSample]:
        path = Path(self.cfg.data)
        rows = list_field(read_json(path), "data", path)
        ocr = self._ocr_tokens() if self.cfg.ocr else None
        folder = self.image_folder(path.parent / "train_images")
        for i, row in enumerate(rows):
            where = f"{path}: data[{i}]"
            image_id = field_of(row, "image_id", str, where)
            meta = {}
            if ocr is not None:
                if image_id not in ocr:
                    raise EvalDataError(f"{self.cfg.ocr}: no OCR tokens for image_id {image_id!r} ({where})")
                meta["ocr"] = ", ".join(ocr[image_id])
            yield EvalSample(
                id=str(field_of(row, "question_id", int, where)),
                image=image_file(folder, f"{image_id}.jpg", where),
                question=field_of(row, "question", str, where),
                reference=str_list(row, "answers", where),
                meta=meta,
            )

    def build_prompt(self, sample: EvalSample) -> str:
        return self.prompt.format(question=sample.question, ocr=sample.meta.get("ocr", ""))

    def score(self, sample: EvalSample, parsed: Any) -> float:
        return textvqa_accuracy(parsed, sample.reference)

    def aggregate(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        table = super().aggregate(records)
        return {**table, "lmms_eval": [lmms_eval_entry("textvqa_val", "exact_match", table["accuracy"])]}

    def protocol_extra(self) -> dict[str, Any]:
        return {"ocr_tokens_in_prompt": bool(self.cfg.ocr), "answer_processing": "m4c EvalAIAnswerProcessor"}
