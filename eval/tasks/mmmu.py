"""MMMU (Yue et al., 2024, arXiv:2311.16502), validation: college-level multiple-choice and open
questions over 30 subjects in 6 disciplines; the official answer parsing and matching.

Files (``data``): the release, MMMU/MMMU as the hub keeps it (one folder per subject,
``<Subject>/validation-00000-of-00001.parquet``), or the lmms-lab/MMMU copy (``data/validation-*.parquet``),
or a ``save_to_disk`` folder: ``id`` (``validation_<Subject>_<n>``), ``question``, ``options`` (a Python
list literal), ``answer``, ``question_type`` (``multiple-choice`` / ``open``), ``image_1``..``image_7``.
From a snapshot folder the ``<split>-*`` shards are read. Samples come sorted by subject, then number, in
both layouts.

Images: the model sees ``image_1``, as the official LLaVA-1.5 script (``run_llava.py``) gives it; the
question keeps its ``<image 1>`` references as text (lmms-eval's default, non-interleaved format).
``meta["n_images"]`` counts the images a question has.

Prompt (lmms-eval ``mmmu_val``): multiple choice "{question}\\nA. ..\\nB. ..\\n\\n" + "Answer with the
option's letter from the given choices directly."; open "{question}\\n\\n" + "Answer the question using a
single word or phrase." (the MMMU repository's LLaVA config writes "(A) .." options after a blank line).

Scoring (MMMU ``mmmu/utils/eval_utils.py``): a multiple-choice answer is read by
:func:`eval.choice.mmmu_choice` (``parse_multi_choice_response``; no candidate -> a random letter, seeded
per sample, counted in ``guessed``) and must equal the answer letter; an open answer is read by
:func:`parse_open_response` (the tails after "is", "so", "=", ... and every number in them, numbers
rounded to 2 decimals) and is right when one of them equals a numeric answer or contains a string answer
(``eval_open``). Accuracy is over questions, overall, per subject and per discipline
(``calculate_ins_level_acc``).
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eval.choice import lettered, mmmu_choice, options_block
from eval.tasks.base import (
    IMAGE_MARKER,
    LLAVA_SHORT_ANSWER,
    EvalDataError,
    EvalSample,
    FileTaskConfig,
    field_of,
    group_by,
    mean_score,
    per_type,
)
from eval.tasks.hf_files import image_bytes, is_hf_copy, read_split
from eval.tasks.hub_copies import SelfContainedTask, lmms_eval_entry
from eval.tasks.scienceqa import SINGLE_PRED

DISCIPLINES = {
    "Art and Design": ("Art", "Art_Theory", "Design", "Music"),
    "Business": ("Accounting", "Economics", "Finance", "Manage", "Marketing"),
    "Science": ("Biology", "Chemistry", "Geography", "Math", "Physics"),
    "Health and Medicine": ("Basic_Medical_Science", "Clinical_Medicine", "Diagnostics_and_Laboratory_Medicine",
                            "Pharmacy", "Public_Health"),
    "Humanities and Social Science": ("History", "Literature", "Sociology", "Psychology"),
    "Tech and Engineering": ("Agriculture", "Architecture_and_Engineering", "Computer_Science", "Electronics",
                             "Energy_and_Power", "Materials", "Mechanical_Engineering"),
}
MAX_IMAGES = 7
_ID = re.compile(r"[a-z]+_[A-Za-z_]+_\d+")
_KEY_INDICATORS = ("could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ", "result ")
_TRIVIAL = (":", ",", ".", "!", "?", ";", "'")
_NUMBERS = (
    re.compile(r"-?\b\d{1,3}(?:,\d{3})+\b"),  # with thousands commas
    re.compile(r"-?\d+(?:\.\d+)?[eE][+-]?\d+"),  # scientific notation
    re.compile(r"-?(?:\d+\.\d+|\.\d+|\d+\b)(?![eE][+-]?\d+)(?![,\d])"),  # plain
)

Normalized = str | float


@dataclass
class MMMUConfig(FileTaskConfig):
    prompt: str = IMAGE_MARKER + "\n{question}"
    split: str = "validation"
    multiple_choice_instruction: str = SINGLE_PRED
    open_instruction: str = LLAVA_SHORT_ANSWER


def subject_of(sample_id: str) -> str:
    """``validation_Art_Theory_12`` -> ``Art_Theory`` (as MMMU's ``main_eval_only.py`` reads it)."""
    return "_".join(sample_id.split("_")[1:-1])


def normalize_answer(text: str) -> list[Normalized]:
    """MMMU ``normalize_str``: a number -> [its value rounded to 2 decimals]; else the lower-cased text,
    a single character padded with a space on either side (so it never matches inside a word)."""
    text = text.strip()
    try:
        return [round(float(text.replace(",", "")), 2)]
    except ValueError:
        text = text.lower()
        return [" " + text, text + " "] if len(text) == 1 else [text]


def _key_responses(response: str) -> list[str]:
    """MMMU ``get_key_subresponses``: per line, the shortest tail after an answer indicator."""
    response = response.strip().strip(".").lower()
    # The official split also cuts at ". " before a capital, which never occurs once lower-cased.
    lines = re.split(r"\.\s(?=[A-Z])|\n", response)
    keys = []
    for k, line in enumerate(lines):
        indicators = _KEY_INDICATORS + (("=",) if k == len(lines) - 1 else ())  # an equation on the last line
        shortest: str | None = None
        for indicator in indicators:
            if indicator in line:
                tail = line.split(indicator)[-1].strip()
                if not shortest or len(tail) < len(shortest):
                    shortest = tail
        if shortest and shortest.strip() not in _TRIVIAL:
            keys.append(shortest)
    return keys or [response]


def parse_open_response(response: str) -> list[Normalized]:
    """MMMU ``parse_open_response``: the key tails and the numbers in them, normalized, without repeats."""
    keys = _key_responses(response)
    found = keys + [n for key in keys for pattern in _NUMBERS for n in pattern.findall(key)]
    return list(dict.fromkeys(v for text in found for v in normalize_answer(text)))


def eval_open(gold: str | list[str], preds: list[Normalized]) -> bool:
    """MMMU ``eval_open``: a predicted number equals a numeric answer, or a predicted string contains one."""
    answers = [v for g in (gold if isinstance(gold, list) else [gold]) for v in normalize_answer(g)]
    return any(
        any(isinstance(a, str) and a in pred for a in answers) if isinstance(pred, str) else pred in answers
        for pred in preds
    )


def _options(row: Mapping[str, Any], where: str) -> list[str]:
    text = field_of(row, "options", str, where)
    try:
        options = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        options = None
    if not isinstance(options, list) or not all(isinstance(o, str) for o in options):
        raise EvalDataError(f"{where}: field 'options' should be a list of strings, got {text!r}")
    return options


def _gold(answer: str) -> str | list[str]:
    """The answer, or the answers when the file stores several as a list literal ("['24/7', '3.429']")."""
    if answer.startswith("["):
        try:
            value = ast.literal_eval(answer)
        except (ValueError, SyntaxError):
            return answer
        if isinstance(value, list):
            return [str(v) for v in value]
    return answer


class MMMUTask(SelfContainedTask[MMMUConfig]):
    config_cls = MMMUConfig
    name = "mmmu_val"
    prompt_version = "lmms-eval"

    def release_files(self) -> list[str]:
        raise EvalDataError(f"{self.cfg.data}: expected MMMU's parquet files (a file, a snapshot or split folder) "
                            "or a save_to_disk folder")

    def hf_sample(self, row: dict[str, Any], index: int, where: str) -> EvalSample:
        sample_id = field_of(row, "id", str, where)
        if not _ID.fullmatch(sample_id):
            raise EvalDataError(f"{where}: field 'id' should read <split>_<Subject>_<number>, got {sample_id!r}")
        question = field_of(row, "question", str, where)
        kind = field_of(row, "question_type", str, where)
        if kind not in ("multiple-choice", "open"):
            raise EvalDataError(f"{where}: field 'question_type' should be multiple-choice or open, got {kind!r}")
        answer = field_of(row, "answer", str, where)
        meta: dict[str, Any] = {"question_type": kind,
                                "n_images": sum(row.get(f"image_{k}") is not None for k in range(1, MAX_IMAGES + 1))}
        if kind == "multiple-choice":
            choices = lettered(_options(row, where))
            if answer not in choices:
                raise EvalDataError(f"{where}: answer {answer!r} is not one of the option letters {''.join(choices)}")
            meta["choices"] = choices
            text = f"{question}\n{options_block(list(choices.values()))}\n\n{self.cfg.multiple_choice_instruction}"
        else:
            text = f"{question}\n\n{self.cfg.open_instruction}"
        if row.get("image_1") is None:
            raise EvalDataError(f"{where}: field 'image_1' is empty (every question needs its first image)")
        return EvalSample(id=sample_id, image=image_bytes(row["image_1"], f"{where}: image_1"), question=text,
                          reference=answer if kind == "multiple-choice" else _gold(answer),
                          type=subject_of(sample_id), meta=meta)

    def samples(self) -> Iterator[EvalSample]:
        path = Path(self.cfg.data)
        if not is_hf_copy(path):
            self.release_files()
        built = [self.hf_sample(row, i, f"{path}: {self.hf_split} row {i}")
                 for i, row in enumerate(read_split(path, self.hf_split))]
        yield from sorted(built, key=lambda s: (s.type, int(s.id.rsplit("_", 1)[-1])))

    def parse(self, sample: EvalSample, text: str) -> Any:
        if sample.meta["question_type"] == "multiple-choice":
            letter, guessed = mmmu_choice(text, sample.meta["choices"], seed=sample.id)
            return {"pred": letter, "guessed": guessed}
        return {"pred": parse_open_response(text), "guessed": False}

    def score(self, sample: EvalSample, parsed: Any) -> float:
        if sample.meta["question_type"] == "multiple-choice":
            return float(parsed["pred"] == sample.reference)
        return float(eval_open(sample.reference, parsed["pred"]))

    def aggregate(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        accuracy = mean_score(records)
        disciplines = group_by([r for r in records if any(r["type"] in s for s in DISCIPLINES.values())],
                               lambda r: next(d for d, s in DISCIPLINES.items() if r["type"] in s))
        return {
            "accuracy": accuracy, **per_type(records),
            "per_discipline": {d: mean_score(rs) for d, rs in sorted(disciplines.items())},
            "guessed": sum(r["parsed"]["guessed"] for r in records), "n": len(records),
            "lmms_eval": [lmms_eval_entry(self.name, "mmmu_acc", None if accuracy is None else round(accuracy, 5))],
        }

    def protocol_extra(self) -> dict[str, Any]:
        return {"split": self.cfg.split, "images": "image_1 only", "per_type": "subject",
                "multiple_choice_instruction": self.cfg.multiple_choice_instruction,
                "open_instruction": self.cfg.open_instruction,
                "answer_parsing": "MMMU eval_utils (random letter seeded by sample id when none found)"}
