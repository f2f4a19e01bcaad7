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
    EvalSample,
    FileTask,
    FileTaskConfig,
    field_of,
    image_file,
    per_meta,
    read_json_object,
)


class GQATask(FileTask[FileTaskConfig]):
    config_cls = FileTaskConfig
    name = "gqa"
    prompt_version = "llava-1.5"

    def samples(self) -> Iterator[EvalSample]:
        path = Path(self.cfg.data)
        questions = read_json_object(path, "{question_id: question}")
        folder = self.image_folder(path.parent)
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
        return {**super().aggregate(records), "per_semantic_type": per_meta(records, "semantic")}

    def protocol_extra(self) -> dict[str, Any]:
        return {"answer_processing": "rstrip('.').lower(), exact match", "per_type": "types.structural"}
