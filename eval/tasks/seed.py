"""SEED-Bench (Li et al., 2023, arXiv:2307.16125), image questions: four-way multiple choice over the
nine image dimensions; accuracy overall and per dimension.

Files (``data``), either:

* the release ``SEED-Bench.json`` (``{"questions": [{"question_id", "question", "choice_a".."choice_d",
  "answer", "data_id", "data_type", "question_type_id"}, ...]}``) with the images
  ``<images>/<data_id>`` (default: ``SEED-Bench-image/`` beside the JSON);
* the lmms-lab/SEED-Bench copy (parquet file, shard folder or ``save_to_disk`` folder): the same fields,
  ``image`` a list of embedded images (one for an image question).

The image questions are those of dimensions 1-9 (the official ``eval.py``'s ``filter_questions(data,
"image")``); the video dimensions 10-12 are left out. Samples keep the file's order. The release and the
copy are read by one loop (not :class:`eval.tasks.hf_files.HFCopyTask`'s two hooks), as both skip the
video rows before touching an image.

Prompt (LLaVA-1.5's ``llava-seed-bench.jsonl``, lmms-eval's ``seedbench``): the question, "A. ..".."D. .."
lines, then "Answer with the option's letter from the given choices directly."

Scoring: the official ``eval.py`` ranks the four options by the model's likelihood and never reads a
generated answer; like LLaVA-1.5 and lmms-eval we generate and read the answer's first character
(surrounding whitespace stripped, case ignored; lmms-eval's ``seed_process_result``). Accuracy = right /
questions, overall and per dimension (``eval.py``'s per-type accuracy).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eval.choice import options_block
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
from eval.tasks.hf_files import HFCopyTask, image_bytes, is_hf_copy, read_split
from eval.tasks.hub_copies import int_field, lmms_eval_entry
from eval.tasks.scienceqa import SINGLE_PRED

DIMENSIONS = {  # question_type_id -> name (SEED-Bench.json "question_type"; 10-12 are video)
    1: "Scene Understanding", 2: "Instance Identity", 3: "Instance Attributes", 4: "Instance Location",
    5: "Instances Counting", 6: "Spatial Relation", 7: "Instance Interaction", 8: "Visual Reasoning",
    9: "Text Understanding",
}
CHOICE_FIELDS = ("choice_a", "choice_b", "choice_c", "choice_d")


def seed_choice(text: str) -> str:
    """lmms-eval's reading of an answer: its first character, upper-cased ("" for an empty answer)."""
    return text.strip()[:1].upper()


@dataclass
class SEEDConfig(FileTaskConfig):
    prompt: str = IMAGE_MARKER + "\n{question}\n" + SINGLE_PRED


class SEEDBenchTask(HFCopyTask[SEEDConfig]):
    config_cls = SEEDConfig
    name = "seedbench"
    prompt_version = "llava-1.5"

    def _sample(self, row: Mapping[str, Any], where: str, image: Path | bytes) -> EvalSample:
        answer = field_of(row, "answer", str, where)
        if answer not in ("A", "B", "C", "D"):
            raise EvalDataError(f"{where}: answer should be A, B, C or D, got {answer!r}")
        options = [field_of(row, f, str, where) for f in CHOICE_FIELDS]
        return EvalSample(
            id=str(field_of(row, "question_id", (str, int), where)), image=image,
            question=f"{field_of(row, 'question', str, where)}\n{options_block(options)}", reference=answer,
            type=DIMENSIONS[int_field(row, "question_type_id", where)],
        )

    def samples(self) -> Iterator[EvalSample]:
        path = Path(self.cfg.data)
        copy = is_hf_copy(path)
        rows = read_split(path, self.hf_split) if copy else list_field(read_json(path), "questions", path)
        folder = None if copy else self.image_folder(path.parent / "SEED-Bench-image")
        for i, row in enumerate(rows):
            where = f"{path}: {self.hf_split} row {i}" if copy else f"{path}: questions[{i}]"
            if int_field(row, "question_type_id", where) not in DIMENSIONS:
                continue
            if folder is not None:
                image: Path | bytes = image_file(folder, field_of(row, "data_id", str, where), where)
            else:
                images = field_of(row, "image", (list, dict, bytes), where)
                image = image_bytes(images[0] if isinstance(images, list) and images else images, where)
            yield self._sample(row, where, image)

    def parse(self, sample: EvalSample, text: str) -> Any:
        return seed_choice(text)

    def score(self, sample: EvalSample, parsed: Any) -> float:
        return float(parsed == sample.reference)

    def aggregate(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        accuracy = mean_score(records)
        return {"accuracy": accuracy, **per_type(records), "n": len(records),
                "lmms_eval": [lmms_eval_entry("seedbench", "seed_image", accuracy)]}

    def protocol_extra(self) -> dict[str, Any]:
        return {"questions": "image (dimensions 1-9)", "answer_parsing": "first character (lmms-eval)",
                "per_type": "dimension", "official_scoring": "likelihood ranking (not used: generation)"}

