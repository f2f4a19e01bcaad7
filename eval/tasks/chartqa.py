"""ChartQA (test): questions about charts, scored by relaxed accuracy on the human and augmented splits.

Files, either of:
* the public release: ``data`` = the ``test/`` folder of "ChartQA Dataset", holding ``test_human.json``
  and ``test_augmented.json`` (lists of ``{"imgname", "query", "label"}``) and the charts in ``png/``
  (or ``images``);
* the lmms-lab copy (``lmms-lab/ChartQA``: ``data/test-*.parquet`` or a ``save_to_disk`` folder) with
  columns ``type`` (``human_test`` / ``augmented_test``), ``question``, ``answer``, ``image``: the human
  questions first, then the augmented ones, each in release order.

Prompt as lmms-eval ``chartqa``: the question, then "Answer the question with a single word." (lmms-eval
generates at most 16 tokens). Metric: :func:`eval.doc_metrics.relaxed_accuracy` (5% tolerance on numbers;
Masry et al., 2022, arXiv:2203.10244, Sec. 5.1). The paper reports the two splits apart and their
average: ``accuracy`` is that average, ``relaxed_overall`` the mean over all questions (lmms-eval's
``relaxed_overall``; equal when the splits are the same size, 1250 each).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eval.doc_metrics import relaxed_accuracy
from eval.tasks.base import (
    IMAGE_MARKER,
    EvalDataError,
    EvalSample,
    FileTaskConfig,
    field_of,
    image_file,
    list_field,
    mean_score,
    per_type,
    read_json,
)
from eval.tasks.hf_files import HFCopyTask, image_bytes
from eval.tasks.hub_copies import lmms_eval_entry

SPLITS = ("human_test", "augmented_test")  # lmms-lab's ``type`` values, in release order
RELEASE_FILES = ("test_human.json", "test_augmented.json")


@dataclass
class ChartQAConfig(FileTaskConfig):
    prompt: str = IMAGE_MARKER + "\n{question}\nAnswer the question with a single word."


def _sample(index: int, split: str, image: Path | bytes, question: str, answer: str) -> EvalSample:
    """Sample ``index`` counts through both splits (human first), the lmms-lab row number."""
    return EvalSample(id=str(index), image=image, question=question, reference=answer, type=split)


class ChartQATask(HFCopyTask[ChartQAConfig]):
    config_cls = ChartQAConfig
    name = "chartqa"
    prompt_version = "lmms-eval"
    hf_split = "test"

    def release_files(self) -> list[str]:
        return [str(Path(self.cfg.data) / name) for name in RELEASE_FILES]

    def release_samples(self) -> Iterator[EvalSample]:
        folder = self.image_folder(Path(self.cfg.data) / "png")
        index = 0
        for split, path in zip(SPLITS, map(Path, self.release_files()), strict=True):
            data = read_json(path)
            rows = data if isinstance(data, list) else list_field(data, "data", path)
            for i, row in enumerate(rows):
                where = f"{path}: [{i}]"
                image = image_file(folder, field_of(row, "imgname", str, where), where)
                question, answer = field_of(row, "query", str, where), field_of(row, "label", str, where)
                yield _sample(index, split, image, question, answer)
                index += 1

    def hf_sample(self, row: dict[str, Any], index: int, where: str) -> EvalSample:
        split = field_of(row, "type", str, where)
        if split not in SPLITS:
            raise EvalDataError(f"{where}: field 'type' should be one of {list(SPLITS)}, got {split!r}")
        return _sample(index, split, image_bytes(row.get("image"), where), field_of(row, "question", str, where),
                       field_of(row, "answer", str, where))

    def score(self, sample: EvalSample, parsed: Any) -> float:
        return relaxed_accuracy(parsed, sample.reference)

    def aggregate(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        table = per_type(records)
        splits = [v for v in table["per_type"].values() if v is not None]
        overall, per_split = mean_score(records), table["per_type"]
        return {
            "accuracy": sum(splits) / len(splits) if splits else None, "relaxed_overall": overall,
            **table, "n": len(records),
            "lmms_eval": [lmms_eval_entry(self.name, "relaxed_overall", overall),
                          lmms_eval_entry(self.name, "relaxed_human_split", per_split.get("human_test")),
                          lmms_eval_entry(self.name, "relaxed_augmented_split", per_split.get("augmented_test"))],
        }

    def protocol_extra(self) -> dict[str, Any]:
        return {"metric": "relaxed accuracy, 5% tolerance", "accuracy": "mean of the human and augmented splits"}
