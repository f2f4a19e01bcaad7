"""MME (Fu et al., 2023, arXiv:2306.13394): two yes/no questions per image, 10 perception and 4
cognition subtasks; acc, acc+ and the summed scores of the official tool.

Files (``data``), either:

* the release folder ``MME_Benchmark_release_version``: one folder per subtask, and per image a ``.txt``
  of two ``question<TAB>answer`` lines, beside the image (``count/000000006040.jpg`` +
  ``count/000000006040.txt``) or, for artwork / celebrity / landmark / posters / scene, in
  ``questions_answers_YN/`` with the image in ``images/``;
* the lmms-lab/MME copy (a parquet file, a folder of shards or a ``save_to_disk`` folder): ``question_id``
  (``"<subtask>/<image file>"``), ``image`` (embedded), ``question``, ``answer``, ``category``.

Both give the samples in one order: subtasks as the official tool lists them, images by file name, an
image's two questions as stored. Each image must have exactly two questions (the tool asserts it).

Prompt (LLaVA-1.5's ``llava_mme.jsonl``, lmms-eval's ``mme``): the question with its " Please answer yes
or no." replaced by "Answer the question using a single word or phrase." on a line of its own.

Scoring (the official ``eval_tool/calculation.py``, MME repository's Evaluation branch): the answer,
lower-cased (and stripped of surrounding whitespace, which the tool's one-line-per-answer files never
hold), is "yes" or "no" as it stands, else its first four characters decide: containing "yes" -> yes,
else containing "no" -> no, else "other" (always wrong). lmms-eval's parser also drops every "." and reads
a lone "y" / "n"; ours does not. Per subtask: acc = right questions / questions, acc+ = images with both
questions right / images, score = 100 (acc + acc+). Perception = the sum of the 10 perception scores
(at most 2000), cognition = the sum of the 4 cognition ones (at most 800); a subtask absent from the
records (``limit``) adds nothing, and a total with none of its subtasks is None.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from eval.tasks.base import (
    EvalDataError,
    EvalSample,
    FileTaskConfig,
    MissingImage,
    field_of,
    group_by,
    mean_score,
    missing_image,
    per_type,
)
from eval.tasks.hf_files import image_bytes, is_hf_copy, read_split
from eval.tasks.hub_copies import SelfContainedTask, lmms_eval_entry

PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark",
              "artwork", "OCR")
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
SUBTASKS = PERCEPTION + COGNITION
YES_NO_SUFFIX = " Please answer yes or no."  # the release's question ending, replaced by the prompt's
IMAGE_SUFFIXES = (".jpg", ".png", ".jpeg")

Row = tuple[str, str, str, str, Path | bytes, str]  # subtask, image file, question, answer, image, where


def mme_answer(text: str) -> str:
    """The official tool's reading of an answer: "yes", "no" or "other"."""
    text = text.strip().lower()
    if text in ("yes", "no"):
        return text
    head = text[:4]
    return "yes" if "yes" in head else "no" if "no" in head else "other"


def subtask_scores(records: list[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """``{subtask: {"acc", "acc_plus", "score", "n_images"}}`` (acc, acc+ as fractions; score in points)."""
    out: dict[str, dict[str, Any]] = {}
    for subtask, rs in group_by(records, lambda r: r["type"]).items():
        images = group_by(rs, lambda r: r["meta"]["image"]).values()
        acc = mean_score(rs) or 0.0
        acc_plus = sum(all(r["score"] == 1.0 for r in pair) for pair in images) / len(images)
        out[subtask] = {"acc": acc, "acc_plus": acc_plus, "score": 100 * (acc + acc_plus), "n_images": len(images)}
    return dict(sorted(out.items(), key=lambda item: SUBTASKS.index(item[0])))


def _total(scores: Mapping[str, Mapping[str, Any]], subtasks: tuple[str, ...]) -> float | None:
    present = [scores[s]["score"] for s in subtasks if s in scores]
    return sum(present) if present else None


def _image_of(folder: Path, stem: str, where: str) -> Path | MissingImage:
    for suffix in IMAGE_SUFFIXES:
        if (folder / (stem + suffix)).is_file():
            return folder / (stem + suffix)
    return missing_image(f"{where}: image {folder / stem}.jpg (or .png) not found")


def _release_rows(root: Path) -> Iterator[Row]:
    for subtask in SUBTASKS:
        folder = root / subtask
        if not folder.is_dir():
            raise EvalDataError(f"{folder}: MME subtask folder not found (expected the release folder's layout)")
        answers = folder / "questions_answers_YN"
        text_dir, image_dir = (answers, folder / "images") if answers.is_dir() else (folder, folder)
        for txt in sorted(text_dir.glob("*.txt")):
            image = _image_of(image_dir, txt.stem, str(txt))
            lines = [line for line in txt.read_text(encoding="utf-8").splitlines() if line.strip()]
            for lineno, line in enumerate(lines, 1):
                fields = line.split("\t")
                if len(fields) != 2:
                    raise EvalDataError(f"{txt}:{lineno}: expected 'question<TAB>answer', got {line!r}")
                yield subtask, image.name, fields[0], fields[1], image, f"{txt}:{lineno}"


def _hub_rows(path: Path) -> Iterator[Row]:
    for i, row in enumerate(read_split(path, "test")):
        where = f"{path}: row {i}"
        subtask = field_of(row, "category", str, where)
        if subtask not in SUBTASKS:
            raise EvalDataError(f"{where}: field 'category' should be an MME subtask, got {subtask!r}")
        image_name = field_of(row, "question_id", str, where).rsplit("/", 1)[-1]
        yield (subtask, image_name, field_of(row, "question", str, where), field_of(row, "answer", str, where),
               image_bytes(field_of(row, "image", (dict, bytes), where), where), where)


def _release_digest(root: Path) -> dict[str, Any]:
    """The release folder's identity: its question files' count and one SHA-256 over their names and text."""
    digest = hashlib.sha256()
    files = sorted(root.rglob("*.txt"))
    for f in files:
        digest.update(f"{f.relative_to(root)}\0".encode() + f.read_bytes())
    return {"folder": root.name, "question_files": len(files), "sha256": digest.hexdigest()[:16]}


class MMETask(SelfContainedTask[FileTaskConfig]):
    config_cls = FileTaskConfig
    name = "mme"
    prompt_version = "llava-1.5"

    def release_files(self) -> list[str]:
        """None: the release folder's ~1200 files are recorded as one digest (:meth:`protocol_extra`)."""
        return []

    def _rows(self) -> Iterator[Row]:
        data = Path(self.cfg.data)
        return _hub_rows(data) if is_hf_copy(data) else _release_rows(data)

    def samples(self) -> Iterator[EvalSample]:
        rows = sorted(self._rows(), key=lambda r: (SUBTASKS.index(r[0]), r[1]))  # stable: questions keep their order
        for (subtask, image_name), pair in group_by(rows, lambda r: (r[0], r[1])).items():
            if len(pair) != 2:
                raise EvalDataError(f"{pair[0][5]}: MME image {subtask}/{image_name} has {len(pair)} questions, expected 2")
            for k, (_, _, question, answer, image, where) in enumerate(pair):
                label = answer.strip().lower()
                if label not in ("yes", "no"):
                    raise EvalDataError(f"{where}: answer should be Yes or No, got {answer!r}")
                yield EvalSample(
                    id=f"{subtask}/{image_name}/{k}", image=image, question=question.strip().removesuffix(YES_NO_SUFFIX),
                    reference=label, type=subtask, meta={"image": image_name},
                )

    def parse(self, sample: EvalSample, text: str) -> Any:
        return mme_answer(text)

    def score(self, sample: EvalSample, parsed: Any) -> float:
        return float(parsed == sample.reference)

    def aggregate(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        scores = subtask_scores(records)
        perception, cognition = _total(scores, PERCEPTION), _total(scores, COGNITION)
        images = [pair for rs in group_by(records, lambda r: r["type"]).values()
                  for pair in group_by(rs, lambda r: r["meta"]["image"]).values()]
        return {
            "perception": perception, "cognition": cognition, "accuracy": mean_score(records),
            "acc_plus": sum(all(r["score"] == 1.0 for r in pair) for pair in images) / len(images),
            "per_subtask": scores, **per_type(records), "n": len(records),
            "lmms_eval": [lmms_eval_entry("mme", "mme_perception_score", perception),
                          lmms_eval_entry("mme", "mme_cognition_score", cognition)],
        }

    def protocol_extra(self) -> dict[str, Any]:
        data = Path(self.cfg.data)
        release = {} if is_hf_copy(data) else {"release_revision": _release_digest(data)}
        return {**release, "answer_parsing": "MME eval_tool calculation.py (first four characters)", "per_type": "subtask acc",
                "score": "100 (acc + acc+) per subtask, summed: perception /2000, cognition /800"}
