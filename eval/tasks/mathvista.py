"""MathVista (Lu et al., 2024, arXiv:2310.02255), testmini: mathematical questions about images,
multiple choice and free form (integer, float at a given precision, list); accuracy with rule-based
answer extraction, and the raw-match accuracy beside it.

Files (``data``), either:

* the release ``testmini.json`` (``{pid: {"question", "image": "images/<pid>.jpg", "choices", "unit",
  "precision", "answer", "question_type", "answer_type", "metadata"}}``); the ``image`` paths are relative
  to ``images`` (default: the JSON's folder);
* the AI4Math/MathVista copy (parquet file, snapshot folder — its ``testmini-*`` shards — or
  ``save_to_disk`` folder): the same fields, the image embedded as ``decoded_image``.

Samples come sorted by pid (numerically) in both layouts.

Prompt (lmms-eval ``mathvista_testmini_format``, its "format-prompt" shot type): the question (with
" (Unit: u)" when there is one), the "A. .." choice lines, then one instruction by answer type ("Answer
with the option's letter from the given choices directly.", "Answer the question using a single integer
number.", ... one / two decimal places, "... a Python list.").

Scoring (MathVista ``evaluation/calculate_score.py``): an extraction is normalized as
``normalize_extracted_answer`` does — multiple choice: a "(X)" or bare option letter becomes that option's
text, anything else the option nearest in Levenshtein distance; integer: ``str(int(float(x)))``; float:
``str(round(float(x), precision))``; list: ``str(x)`` — and must equal the answer string.

Extraction differs from the official pipeline, which asks GPT (``extract_answer.py``) to pull the answer
out of the response. Two scores, both ours:

* ``accuracy_raw``: the whole response (stripped) is the extraction; right when the model answered in the
  requested format;
* ``accuracy`` (headline): rules in place of GPT — the official quick pattern ``The answer is "x".``; for
  multiple choice a response equal to an option, else the letter or the option text VLMEvalKit's rules
  find (:func:`eval.choice.can_infer`), else the response; for numbers the first number after the last
  "answer is" / "answer:", else the last number in the response (thousands commas dropped); for lists the
  last ``[...]`` in the response. An answer GPT would have found in free-form reasoning the rules can miss.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eval.choice import LETTERS, can_infer, lettered, options_block
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
    read_json_object,
)
from eval.tasks.hf_files import HFCopyTask, image_bytes, is_hf_copy, read_split
from eval.tasks.hub_copies import lmms_eval_entry, missing

QUICK = re.compile(r'The answer is "(.*)"\.')  # the official optional quick extraction
_CUE = re.compile(r"(?i)answer\s*(?:is|:)")
_NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d*\.?\d+")
_LIST = re.compile(r"\[[^\[\]]*\]")
_DECIMALS = {1: "one decimal place", 2: "two decimal places"}


@dataclass
class MathVistaConfig(FileTaskConfig):
    prompt: str = IMAGE_MARKER + "\n{question}"
    split: str = "testmini"


def instruction(question_type: str, answer_type: str, precision: int) -> str:
    """lmms-eval's "format-prompt" line for the answer type."""
    if question_type == "multi_choice":
        return "Answer with the option's letter from the given choices directly."
    if answer_type == "integer":
        return "Answer the question using a single integer number."
    if answer_type == "float":
        return f"Answer the question using a single floating-point number with {_DECIMALS.get(precision, f'{precision} decimal places')}."
    return "Answer the question using a Python list."


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insertions, deletions, substitutions, each 1)."""
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


def normalize_extraction(extraction: str, problem: Mapping[str, Any]) -> str | None:
    """MathVista ``normalize_extracted_answer``: the extraction in the answer's form (None if it has none)."""
    if problem["question_type"] == "multi_choice":
        choices = problem["choices"]
        extraction = extraction.strip()
        bracketed = re.findall(r"\(([a-zA-Z])\)", extraction)
        if bracketed:
            extraction = bracketed[0].upper()
        letters = LETTERS[: len(choices)]
        if len(extraction) == 1 and extraction in letters:
            return choices[letters.index(extraction)]
        distances = [edit_distance(extraction, c) for c in choices]
        return choices[distances.index(min(distances))]
    try:
        if problem["answer_type"] == "integer":
            return str(int(float(extraction)))
        if problem["answer_type"] == "float":
            return str(round(float(extraction), problem["precision"]))
    except (ValueError, OverflowError):
        return None
    return str(extraction)


def extract_answer(response: str, problem: Mapping[str, Any]) -> str:
    """Our rule-based extraction (in place of the official GPT call); see the module docstring."""
    response = response.strip()
    quick = QUICK.search(response)
    if quick:
        return quick.group(1)
    if problem["question_type"] == "multi_choice":
        if response in problem["choices"]:
            return response
        letter = can_infer(response, lettered(problem["choices"]))
        return letter if letter is not None and letter in LETTERS[: len(problem["choices"])] else response
    if problem["answer_type"] == "list":
        lists = _LIST.findall(response)
        if not lists:
            return response
        try:
            value = ast.literal_eval(lists[-1])
        except (ValueError, SyntaxError):
            return lists[-1]
        return str(value) if isinstance(value, list) else lists[-1]
    cues = list(_CUE.finditer(response))
    after = _NUMBER.findall(response[cues[-1].end():]) if cues else []
    numbers = after[:1] or _NUMBER.findall(response)[-1:]
    return numbers[0].replace(",", "") if numbers else response


def _precision(value: Any) -> int:
    return 0 if missing(value) else int(value)


class MathVistaTask(HFCopyTask[MathVistaConfig]):
    config_cls = MathVistaConfig
    name = "mathvista_testmini"
    prompt_version = "lmms-eval format-prompt"

    def __init__(self, cfg: MathVistaConfig) -> None:
        super().__init__(cfg)
        self.hf_split = cfg.split

    def _sample(self, pid: str, p: Mapping[str, Any], where: str, image: Path | bytes) -> EvalSample:
        question_type = field_of(p, "question_type", str, where)
        answer_type = field_of(p, "answer_type", str, where)
        if question_type not in ("multi_choice", "free_form") or answer_type not in ("text", "integer", "float", "list"):
            raise EvalDataError(f"{where}: unknown question_type / answer_type {question_type!r} / {answer_type!r}")
        choices = [str(c) for c in p.get("choices") or []]
        answer = field_of(p, "answer", str, where)
        if question_type == "multi_choice" and answer not in choices:
            raise EvalDataError(f"{where}: a multi_choice answer must be one of the choices, got {answer!r} for {choices}")
        precision = _precision(p.get("precision"))
        unit = "" if missing(p.get("unit")) else f" (Unit: {p['unit']})"
        lines = [field_of(p, "question", str, where) + unit, options_block(choices) if choices else "",
                 instruction(question_type, answer_type, precision)]
        metadata = field_of(p, "metadata", dict, where)
        return EvalSample(
            id=pid, image=image, question="\n".join(line for line in lines if line),
            reference=answer, type=str(metadata.get("task", "all")),
            meta={"question_type": question_type, "answer_type": answer_type, "precision": precision,
                  "choices": choices, "skills": list(metadata.get("skills") or [])},
        )

    def release_samples(self) -> Iterator[EvalSample]:
        path = Path(self.cfg.data)
        problems = read_json_object(path, "{pid: problem}")
        folder = self.image_folder(path.parent)
        for pid, p in problems.items():
            where = f"{path}: [{pid!r}]"
            yield self._sample(str(pid), p, where, image_file(folder, field_of(p, "image", str, where), where))

    def hf_sample(self, row: dict[str, Any], index: int, where: str) -> EvalSample:
        image = image_bytes(field_of(row, "decoded_image", (dict, bytes), where), f"{where}: decoded_image")
        return self._sample(str(field_of(row, "pid", (str, int), where)), row, where, image)

    def samples(self) -> Iterator[EvalSample]:
        path = Path(self.cfg.data)
        built = list(self.release_samples()) if not is_hf_copy(path) else [
            self.hf_sample(row, i, f"{path}: {self.hf_split} row {i}") for i, row in enumerate(read_split(path, self.hf_split))]
        yield from sorted(built, key=lambda s: (not s.id.isdigit(), int(s.id) if s.id.isdigit() else 0, s.id))

    def parse(self, sample: EvalSample, text: str) -> Any:
        extraction = extract_answer(text, sample.meta)
        return {"extraction": extraction, "prediction": normalize_extraction(extraction, sample.meta),
                "raw": normalize_extraction(text.strip(), sample.meta)}

    def score(self, sample: EvalSample, parsed: Any) -> float:
        return float(parsed["prediction"] == sample.reference)

    def aggregate(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        accuracy = mean_score(records)
        raw = [{"score": float(r["parsed"]["raw"] == r["reference"])} for r in records]
        skills = group_by([(s, r) for r in records for s in r["meta"]["skills"]], lambda pair: pair[0])
        return {
            "accuracy": accuracy, "accuracy_raw": mean_score(raw), **per_type(records),
            "per_skill": {s: mean_score(r for _, r in pairs) for s, pairs in sorted(skills.items())},
            "n": len(records),
            "lmms_eval": [lmms_eval_entry("mathvista_testmini_format", "llm_as_judge_eval",
                                          None if accuracy is None else round(100 * accuracy, 2))],
        }

    def protocol_extra(self) -> dict[str, Any]:
        return {"split": self.cfg.split, "per_type": "task",
                "answer_extraction": "rules (quick pattern, VLMEvalKit letters, last number, last list); "
                                     "official: GPT", "normalization": "MathVista calculate_score.py"}
