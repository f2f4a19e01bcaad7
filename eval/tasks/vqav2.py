"""VQAv2 with the official accuracy (vqaEval.py), LLaVA-1.5 prompt and answer processing.

Files (the public release): ``data`` = ``v2_OpenEnded_mscoco_<subtype>_questions.json``
(``{"data_subtype", "questions": [{"question_id", "image_id", "question"}]}``), ``annotations`` =
``v2_mscoco_<subtype>_annotations.json`` (``{"annotations": [{"question_id", "answers": [{"answer"}],
"answer_type", "question_type"}]}``), images ``COCO_<subtype>_<image_id:012d>.jpg`` in ``images``.

Protocol (LLaVA-1.5): the prompt ends "Answer the question using a single word or phrase."; the output
goes through the EvalAI answer processor (LLaVA's ``convert_vqav2_for_submission.py``), then the
evaluation server's vqaEval.py accuracy (:func:`eval.metrics.vqa_accuracy`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eval.metrics import evalai_normalize, vqa_accuracy
from eval.tasks.base import (
    EvalDataError,
    EvalSample,
    FileTask,
    FileTaskConfig,
    field_of,
    image_file,
    list_field,
    per_meta,
    read_json,
)
from eval.tasks.hub_copies import lmms_eval_entry


@dataclass
class VQAv2Config(FileTaskConfig):
    annotations: str | None = None  # the annotations JSON (required: it holds the human answers)


class VQAv2Task(FileTask[VQAv2Config]):
    config_cls = VQAv2Config
    name = "vqav2"
    prompt_version = "llava-1.5"

    def __init__(self, cfg: VQAv2Config) -> None:
        super().__init__(cfg)
        if not cfg.annotations:
            raise EvalDataError("vqav2.annotations: the annotations JSON (human answers) is required")

    def data_files(self) -> list[str]:
        return [self.cfg.data, str(self.cfg.annotations)]

    def samples(self) -> Iterator[EvalSample]:
        qpath, apath = Path(self.cfg.data), Path(str(self.cfg.annotations))
        questions = read_json(qpath)
        subtype = field_of(questions, "data_subtype", str, str(qpath))
        annotations = {}
        for i, ann in enumerate(list_field(read_json(apath), "annotations", apath)):
            where = f"{apath}: annotations[{i}]"
            answers = field_of(ann, "answers", list, where)
            annotations[field_of(ann, "question_id", int, where)] = (
                [field_of(a, "answer", str, f"{where}.answers[{j}]") for j, a in enumerate(answers)],
                field_of(ann, "answer_type", str, where),
                field_of(ann, "question_type", str, where),
            )
        folder = self.image_folder(qpath.parent)
        for i, q in enumerate(list_field(questions, "questions", qpath)):
            where = f"{qpath}: questions[{i}]"
            qid = field_of(q, "question_id", int, where)
            if qid not in annotations:
                raise EvalDataError(f"{apath}: no annotation for question_id {qid} ({where})")
            answers, answer_type, question_type = annotations[qid]
            image_id = field_of(q, "image_id", int, where)
            yield EvalSample(
                id=str(qid),
                image=image_file(folder, f"COCO_{subtype}_{image_id:012d}.jpg", where),
                question=field_of(q, "question", str, where),
                reference=answers,
                type=answer_type,
                meta={"question_type": question_type},
            )

    def parse(self, sample: EvalSample, text: str) -> Any:
        return evalai_normalize(text)

    def score(self, sample: EvalSample, parsed: Any) -> float:
        return vqa_accuracy(parsed, sample.reference)

    def aggregate(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        # accuracy, per_type = per answer type, n
        table = super().aggregate(records)
        return {**table, "per_question_type": per_meta(records, "question_type"),
                "lmms_eval": [lmms_eval_entry("vqav2_val", "exact_match", table["accuracy"])]}

    def protocol_extra(self) -> dict[str, Any]:
        return {"answer_processing": "EvalAIAnswerProcessor, then vqaEval.py", "per_type": "answer_type"}
