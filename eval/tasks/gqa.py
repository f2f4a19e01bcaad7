"""GQA accuracy (exact match), LLaVA-1.5 prompt.

File (the public release): ``data`` = e.g. ``testdev_balanced_questions.json``, an object
``{question_id: {"imageId", "question", "answer", "types": {"structural", "semantic", ...}}}``;
images ``<imageId>.jpg`` in ``images``. A prediction scores 1 when LLaVA's
``text.rstrip('.').lower()`` equals the answer (GQA ``eval.py``'s accuracy; its consistency, validity,
plausibility and grounding scores are not computed). The table is by structural type.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from eval.metrics import exact_match
from eval.tasks.base import (
    EvalDataError,
    EvalSample,
    FileTask,
    FileTaskConfig,
    field_of,
    group_by,
    image_dir,
    image_file,
    mean_score,
    read_json,
)


class GQATask(FileTask):
    config_cls = FileTaskConfig
    name = "gqa"
    prompt_version = "llava-1.5"

    def samples(self) -> Iterator[EvalSample]:
        path = Path(self.cfg.data)
        questions = read_json(path)
        if not isinstance(questions, Mapping):
            raise EvalDataError(f"{path}: expected a JSON object {{question_id: question}}")
        folder = image_dir(self.cfg.images, path.parent, "gqa")
        for qid, q in questions.items():
            where = f"{path}: [{qid!r}]"
            types = field_of(q, "types", Mapping, where)
            yield EvalSample(
                id=str(qid),
                image=image_file(folder, f"{field_of(q, 'imageId', str, where)}.jpg", where),
                question=field_of(q, "question", str, where),
                reference=field_of(q, "answer", str, where),
                type=field_of(types, "structural", str, f"{where}.types"),
                meta={"semantic": field_of(types, "semantic", str, f"{where}.types")},
            )

    def parse(self, sample: EvalSample, text: str) -> Any:
        return text.strip().rstrip(".").lower()

    def score(self, sample: EvalSample, parsed: Any) -> float:
        return exact_match(parsed, sample.reference)

    def aggregate(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        by_semantic = group_by(records, lambda r: r["meta"]["semantic"])
        return {
            **super().aggregate(records),
            "per_semantic_type": {t: mean_score(rs) for t, rs in sorted(by_semantic.items())},
        }

    def protocol_extra(self) -> dict[str, Any]:
        return {"answer_processing": "rstrip('.').lower(), exact match", "per_type": "types.structural"}
