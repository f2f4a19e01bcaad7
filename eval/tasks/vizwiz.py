"""VizWiz-VQA (val): questions from blind people, with the VizWiz challenge's accuracy.

Files, either of:
* the public release: ``data`` = ``val.json`` (a list of ``{"image": "VizWiz_val_00000000.jpg",
  "question", "answers": [{"answer", "answer_confidence"}] x 10, "answer_type", "answerable"}``), images
  in ``images`` (default: ``val/`` beside ``data``);
* the lmms-lab copy (``lmms-lab/VizWiz-VQA``: parquet shards ``data/val-*.parquet``, or a
  ``save_to_disk`` folder) with columns ``question_id`` (the image name without ".jpg"), ``image``,
  ``question``, ``answers`` (10 strings), ``category`` (the answer type).

Prompt (LLaVA-1.5's ``llava_vizwiz`` and lmms-eval ``vizwiz_vqa_val``): the question, then "When the
provided information is insufficient, respond with 'Unanswerable'." and "Answer the question using a
single word or phrase."; lmms-eval capitalises the question (``str.capitalize``), kept as
``capitalize_question``. The answer goes through the EvalAI processor (LLaVA's
``convert_vizwiz_for_submission.py``), then :func:`eval.metrics.vizwiz_accuracy` (the VizWiz script:
prediction processed, answers as stored). lmms-eval instead EvalAI-processes both sides; results per
answer type (yes/no, number, other, unanswerable).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eval.metrics import evalai_normalize, vizwiz_accuracy
from eval.tasks.base import (
    IMAGE_MARKER,
    LLAVA_SHORT_ANSWER,
    EvalDataError,
    EvalSample,
    FileTaskConfig,
    field_of,
    image_file,
    read_json,
    str_list,
)
from eval.tasks.hf_files import HFCopyTask, image_bytes
from eval.tasks.hub_copies import lmms_eval_entry

UNANSWERABLE_HINT = "When the provided information is insufficient, respond with 'Unanswerable'."


@dataclass
class VizWizConfig(FileTaskConfig):
    prompt: str = IMAGE_MARKER + "\n{question}\n" + UNANSWERABLE_HINT + "\n" + LLAVA_SHORT_ANSWER
    capitalize_question: bool = True  # lmms-eval's ``doc["question"].capitalize()``


class VizWizTask(HFCopyTask[VizWizConfig]):
    config_cls = VizWizConfig
    name = "vizwiz_vqa_val"
    prompt_version = "lmms-eval"
    hf_split = "val"

    def release_samples(self) -> Iterator[EvalSample]:
        path = Path(self.cfg.data)
        rows = read_json(path)
        if not isinstance(rows, list):
            raise EvalDataError(f"{path}: expected a JSON list of questions")
        folder = self.image_folder(path.parent / "val")
        for i, row in enumerate(rows):
            where = f"{path}: [{i}]"
            name = field_of(row, "image", str, where)
            answers = field_of(row, "answers", list, where)
            yield EvalSample(
                id=name.removesuffix(".jpg"),
                image=image_file(folder, name, where),
                question=field_of(row, "question", str, where),
                reference=[field_of(a, "answer", str, f"{where}.answers[{j}]") for j, a in enumerate(answers)],
                type=field_of(row, "answer_type", str, where),
            )

    def hf_sample(self, row: dict[str, Any], index: int, where: str) -> EvalSample:
        return EvalSample(
            id=field_of(row, "question_id", str, where),
            image=image_bytes(row.get("image"), where),
            question=field_of(row, "question", str, where),
            reference=str_list(row, "answers", where),
            type=field_of(row, "category", str, where),
        )

    def build_prompt(self, sample: EvalSample) -> str:
        question = sample.question.capitalize() if self.cfg.capitalize_question else sample.question
        return self.prompt.format(question=question)

    def parse(self, sample: EvalSample, text: str) -> Any:
        return evalai_normalize(text)

    def score(self, sample: EvalSample, parsed: Any) -> float:
        return vizwiz_accuracy(parsed, sample.reference)

    def aggregate(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        table = super().aggregate(records)
        return {**table, "lmms_eval": [lmms_eval_entry(self.name, "exact_match", table["accuracy"])]}

    def protocol_extra(self) -> dict[str, Any]:
        return {
            "answer_processing": "EvalAIAnswerProcessor, then the VizWiz vqaEval.py", "per_type": "answer_type",
            "capitalize_question": self.cfg.capitalize_question,
        }
