"""DocVQA (validation): questions on scanned documents, scored by ANLS.

Files, either of:
* the public release (RRC, Single Page Document VQA, task 1): ``data`` = ``val_v1.0_withQT.json`` (or
  ``val_v1.0.json``, which has no question types): ``{"data": [{"questionId", "question",
  "question_types", "image": "documents/<name>.png", "docId", "answers", ...}]}``; ``image`` paths are
  relative to ``images`` (default: the folder of ``data``);
* the lmms-lab copy (``lmms-lab/DocVQA``, config ``DocVQA``: ``DocVQA/validation-*.parquet`` or a
  ``save_to_disk`` folder) with the same columns, ``image`` holding the page.

Prompt as lmms-eval ``docvqa_val`` (and LLaVA-1.5's short-answer suffix): the question, then "Answer the
question using a single word or phrase." (lmms-eval generates at most 32 tokens). Metric: ANLS with
tau = 0.5 (:func:`eval.doc_metrics.anls`; Biten et al., 2019, arXiv:1905.13648, Eq. 1), the mean over
questions; also per question type (a question counts under each of its types).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from eval.doc_metrics import anls
from eval.tasks.base import (
    EvalSample,
    FileTaskConfig,
    field_of,
    image_file,
    list_field,
    mean_score,
    read_json,
    str_list,
)
from eval.tasks.hf_files import HFCopyTask, image_bytes
from eval.tasks.hub_copies import lmms_eval_entry


def _sample(row: dict[str, Any], image: Path | bytes, where: str) -> EvalSample:
    """The fields both layouts share (the release's ``questionId`` is an int, lmms-lab's a string)."""
    types = str_list(row, "question_types", where) if "question_types" in row else []
    return EvalSample(
        id=str(field_of(row, "questionId", (int, str), where)),
        image=image,
        question=field_of(row, "question", str, where),
        reference=str_list(row, "answers", where),
        meta={"question_types": types},
    )


class DocVQATask(HFCopyTask[FileTaskConfig]):
    config_cls = FileTaskConfig
    name = "docvqa_val"
    prompt_version = "lmms-eval"
    hf_split = "validation"

    def release_samples(self) -> Iterator[EvalSample]:
        path = Path(self.cfg.data)
        rows = list_field(read_json(path), "data", path)
        folder = self.image_folder(path.parent)
        for i, row in enumerate(rows):
            where = f"{path}: data[{i}]"
            yield _sample(row, image_file(folder, field_of(row, "image", str, where), where), where)

    def hf_sample(self, row: dict[str, Any], index: int, where: str) -> EvalSample:
        return _sample(row, image_bytes(row.get("image"), where), where)

    def score(self, sample: EvalSample, parsed: Any) -> float:
        return anls(parsed, sample.reference)

    def aggregate(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        by_type: dict[str, list[dict[str, Any]]] = {}
        for r in records:
            for t in r["meta"]["question_types"]:
                by_type.setdefault(t, []).append(r)
        score = mean_score(records)
        return {
            "anls": score, "per_question_type": {t: mean_score(by_type[t]) for t in sorted(by_type)},
            "n": len(records), "lmms_eval": [lmms_eval_entry(self.name, "anls", score)],
        }

    def protocol_extra(self) -> dict[str, Any]:
        return {"metric": "ANLS, tau = 0.5"}
