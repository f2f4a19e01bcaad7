"""OCRBench: 1000 questions over ten OCR categories, scored as the official OCRBench scripts do.

Files, either of:
* the public release (Yuliang-Liu/MultimodalOCR): ``data`` = ``OCRBench.json`` (a list of
  ``{"dataset_name", "id", "image_path", "question", "answers" (a string or a list), "type"}``), images
  under ``images`` (default: ``OCRBench_Images/`` beside ``data``);
* the hub copy lmms-eval reads (``echo840/OCRBench``: ``data/test-*.parquet`` or a ``save_to_disk``
  folder) with columns ``dataset``, ``question``, ``question_type``, ``answer`` (a list), ``image``, rows in
  release order.

Prompt as lmms-eval ``ocrbench``: the stripped question alone (lmms-eval generates up to 128 tokens; the
official LLaVA-1.5 script adds "Answer the question using a single word or phrase.", set ``prompt`` for
that). Scoring: :func:`eval.doc_metrics.ocrbench_hit` (an answer contained in the prediction; HME100k
formulas case-sensitive without spaces). ``score`` is the number of hits, out of 1000 on the full set;
``text_recognition`` the hits of the six recognition categories (out of 300); ``per_category`` the hits
per category. lmms-eval's copy also folds full-width ASCII to ASCII before matching; the official
scripts, followed here, do not.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eval.doc_metrics import OCRBENCH_RECOGNITION, ocrbench_hit
from eval.tasks.base import (
    IMAGE_MARKER,
    EvalDataError,
    EvalSample,
    FileTaskConfig,
    field_of,
    group_by,
    image_file,
    mean_score,
    per_type,
    read_json,
    str_list,
)
from eval.tasks.hf_files import HFCopyTask, image_bytes
from eval.tasks.hub_copies import lmms_eval_entry


@dataclass
class OCRBenchConfig(FileTaskConfig):
    prompt: str = IMAGE_MARKER + "\n{question}"  # lmms-eval: the question alone


def _sample(index: int, image: Path | bytes, question: str, answers: list[str], category: str, source: str) -> EvalSample:
    return EvalSample(id=str(index), image=image, question=question.strip(), reference=answers, type=category,
                      meta={"dataset": source})


class OCRBenchTask(HFCopyTask[OCRBenchConfig]):
    config_cls = OCRBenchConfig
    name = "ocrbench"
    prompt_version = "lmms-eval"
    hf_split = "test"

    def release_samples(self) -> Iterator[EvalSample]:
        path = Path(self.cfg.data)
        rows = read_json(path)
        if not isinstance(rows, list):
            raise EvalDataError(f"{path}: expected a JSON list of questions")
        folder = self.image_folder(path.parent / "OCRBench_Images")
        for i, row in enumerate(rows):
            where = f"{path}: [{i}]"
            answers = field_of(row, "answers", (str, list), where)
            yield _sample(
                i, image_file(folder, field_of(row, "image_path", str, where), where),
                field_of(row, "question", str, where),
                [answers] if isinstance(answers, str) else str_list(row, "answers", where),
                field_of(row, "type", str, where), field_of(row, "dataset_name", str, where),
            )

    def hf_sample(self, row: dict[str, Any], index: int, where: str) -> EvalSample:
        return _sample(
            index, image_bytes(row.get("image"), where), field_of(row, "question", str, where),
            str_list(row, "answer", where), field_of(row, "question_type", str, where),
            field_of(row, "dataset", str, where),
        )

    def score(self, sample: EvalSample, parsed: Any) -> float:
        return ocrbench_hit(parsed, sample.reference, sample.meta["dataset"])

    def aggregate(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        hits = {t: sum(float(r["score"]) for r in rs) for t, rs in sorted(group_by(records, lambda r: r["type"]).items())}
        score = sum(hits.values())
        return {
            "score": score, "text_recognition": sum(hits.get(t, 0.0) for t in OCRBENCH_RECOGNITION),
            "per_category": hits, "accuracy": mean_score(records), **per_type(records), "n": len(records),
            # lmms-eval's ocrbench_accuracy is the score over 1000 (the full set's size), whatever n is.
            "lmms_eval": [lmms_eval_entry(self.name, "ocrbench_accuracy", score / 1000)],
        }

    def protocol_extra(self) -> dict[str, Any]:
        return {"metric": "OCRBench substring hits (official scripts)", "score": "hits, out of 1000 on the full set"}
