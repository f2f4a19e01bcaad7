"""AI2D (test): multiple-choice questions on science diagrams, scored as lmms-eval ``ai2d`` does.

Files, either of:
* the public release (AllenAI ``ai2d-all.zip`` and ``ai2d_test_ids.csv``): ``data`` = the ``ai2d/``
  folder with ``questions/<n>.png.json`` (``{"imageName", "questions": {text: {"answerTexts",
  "correctAnswer", "questionId", "abcLabel"}}}``) and ``images/<n>.png``; ``test_ids`` = the test image
  ids, one per line (default: ``ai2d_test_ids.csv`` in ``data``). Questions come in the order of the
  ids file, then of each question file;
* the lmms-lab copy (``lmms-lab/ai2d``: ``data/test-*.parquet`` or a ``save_to_disk`` folder) with
  columns ``question``, ``options`` (a list), ``answer`` (the correct option's index, a string),
  ``image``, in its row order (its builder walked the question files in directory order, so it need not
  match the release order above; the samples and the metric are the same set).

Prompt as lmms-eval's default ``mcq`` format: the question, one "A. option" line per option, then
"Answer with the option's letter from the given choices directly." (lmms-eval generates at most 16
tokens). Scoring as lmms-eval: the response's leading "X." gives letter X, else the whole response is
kept (:func:`eval.metrics.lmms_choice_filter`); then exact match with the correct letter, ignoring case
and punctuation (:func:`eval.metrics.lmms_exact_match`).
"""

from __future__ import annotations

import json
import string
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eval.metrics import lmms_choice_filter, lmms_exact_match
from eval.tasks.base import (
    IMAGE_MARKER,
    EvalDataError,
    EvalSample,
    FileTaskConfig,
    field_of,
    image_file,
    read_json_object,
    str_list,
)
from eval.tasks.hf_files import HFCopyTask, image_bytes
from eval.tasks.hub_copies import lmms_eval_entry

MCQ_SUFFIX = "Answer with the option's letter from the given choices directly."
LETTERS = string.ascii_uppercase


@dataclass
class AI2DConfig(FileTaskConfig):
    prompt: str = IMAGE_MARKER + "\n{question}\n" + MCQ_SUFFIX
    test_ids: str | None = None  # the release's ai2d_test_ids.csv; None = ai2d_test_ids.csv in ``data``


def _sample(index: int, image: Path | bytes, question: str, options: list[str], answer: int, where: str) -> EvalSample:
    if not 0 <= answer < len(options) <= len(LETTERS):
        raise EvalDataError(f"{where}: answer {answer} for {len(options)} options")
    block = "\n".join(f"{LETTERS[k]}. {o}" for k, o in enumerate(options))
    return EvalSample(id=str(index), image=image, question=f"{question}\n{block}", reference=LETTERS[answer])


class AI2DTask(HFCopyTask[AI2DConfig]):
    config_cls = AI2DConfig
    name = "ai2d"
    prompt_version = "lmms-eval"
    hf_split = "test"

    def _ids_file(self) -> Path:
        return Path(self.cfg.test_ids) if self.cfg.test_ids else Path(self.cfg.data) / "ai2d_test_ids.csv"

    def release_files(self) -> list[str]:
        return [str(self._ids_file())]

    def release_samples(self) -> Iterator[EvalSample]:
        root, ids_file = Path(self.cfg.data), self._ids_file()
        if not ids_file.is_file():
            raise EvalDataError(f"{ids_file}: file not found (the AI2D test ids; set `test_ids`)")
        folder = self.image_folder(root / "images")
        index = 0
        for image_id in ids_file.read_text(encoding="utf-8").split():
            qpath = root / "questions" / f"{image_id}.png.json"
            data = read_json_object(qpath, '{"imageName", "questions": {text: question}}')
            image = image_file(folder, field_of(data, "imageName", str, str(qpath)), str(qpath))
            for text, q in field_of(data, "questions", dict, str(qpath)).items():
                where = f"{qpath}: questions[{json.dumps(text)}]"
                yield _sample(index, image, text, str_list(q, "answerTexts", where),
                              field_of(q, "correctAnswer", int, where), where)
                index += 1

    def hf_sample(self, row: dict[str, Any], index: int, where: str) -> EvalSample:
        answer = field_of(row, "answer", (str, int), where)
        if isinstance(answer, str) and not answer.isdigit():
            raise EvalDataError(f"{where}: field 'answer' should be an option index, got {answer!r}")
        return _sample(index, image_bytes(row.get("image"), where), field_of(row, "question", str, where),
                       str_list(row, "options", where), int(answer), where)

    def parse(self, sample: EvalSample, text: str) -> Any:
        return lmms_choice_filter(text)

    def score(self, sample: EvalSample, parsed: Any) -> float:
        return lmms_exact_match(parsed, sample.reference)

    def aggregate(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        table = super().aggregate(records)
        return {**table, "lmms_eval": [lmms_eval_entry(self.name, "exact_match", table["accuracy"])]}

    def protocol_extra(self) -> dict[str, Any]:
        return {"answer_extraction": "lmms-eval MultiChoiceRegexFilter, exact match ignoring case and punctuation"}
