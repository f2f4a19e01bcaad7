"""MMBench (Liu et al., 2023, arXiv:2307.06281), English dev: single-choice questions scored by
CircularEval over the rotated copies the release stores.

Files (``data``), either:

* the OpenCompass / VLMEvalKit release ``MMBench_DEV_EN.tsv`` (or the legacy ``mmbench_dev_20230712.tsv``):
  ``index``, ``question``, ``hint``, ``A``..``D``, ``answer``, ``category``, ``l2-category``, ``image``
  (base64; a copy's cell of at most 64 characters names the ``index`` whose image it shares), ...;
* the lmms-lab/MMBench ``en`` copy (a parquet file, the snapshot's ``en/`` folder — its ``dev-*``
  shards are read; not the snapshot root, whose ``cn/`` and ``cc/`` shards would join them — or a
  ``save_to_disk`` folder): the same columns with an embedded ``image`` and ``L2-category``.

Every question appears with its options rotated: the copy of question ``i`` rotated ``k`` times has
index ``i + k * 10**6``. Samples come sorted by index (as VLMEvalKit sorts them before scoring). Empty
cells (:func:`eval.tasks.hub_copies.missing`: pandas' NaN, ``"nan"``) are absent options and hints; the
options end at the first absent one.

Prompt (LLaVA-1.5 ``model_vqa_mmbench.py`` with ``--single-pred-prompt``): the hint on its own line when
there is one, the question, "A. ..." lines, then "Answer with the option's letter from the given choices
directly." (lmms-eval's ``mmbench_en_dev`` writes hint, question and a "There are several options:" block
on one line instead.)

Answer matching: VLMEvalKit's rules (:func:`eval.choice.can_infer`: a letter named near the end of the
answer, else the one option whose text it quotes). The official evaluator then asks an LLM (ChatGPT) to
match what the rules could not; we have no judge and, as VLMEvalKit's ``exact_matching`` mode does,
count such an answer wrong (``unmatched`` counts them). CircularEval (``mcq_circular_eval``): a question
is right only when every rotated copy of it is. ``accuracy`` is that, over the ``n_questions`` questions
(``per_type``: per category, ``n_per_type`` questions each); ``vanilla_accuracy`` scores the unrotated
copies alone; ``n`` counts the rows (rotated copies included).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eval.choice import can_infer, lettered, options_block
from eval.tasks.base import (
    IMAGE_MARKER,
    EvalDataError,
    EvalSample,
    FileTaskConfig,
    field_of,
    group_by,
    mean_score,
)
from eval.tasks.hf_files import image_bytes, is_hf_copy, read_split
from eval.tasks.hub_copies import SelfContainedTask, int_field, lmms_eval_entry, missing
from eval.tasks.scienceqa import SINGLE_PRED

ROTATION = 10**6  # index offset of each rotated copy
OPTIONS = "ABCD"
REFERENCE_CHARS = 64  # VLMEvalKit: an image cell this short holds the index of the row with the image


@dataclass
class MMBenchConfig(FileTaskConfig):
    prompt: str = IMAGE_MARKER + "\n{question}\n" + SINGLE_PRED
    split: str = "dev"  # the split's shards in a hub snapshot folder


def _tsv_rows(path: Path) -> list[dict[str, Any]]:
    """The release's rows with their base64 images decoded (shared images resolved)."""
    if not path.is_file():
        raise EvalDataError(f"{path}: file not found")
    import pandas as pd

    try:  # pandas, as VLMEvalKit reads it (empty cells are NaN); every cell kept as the text it is
        rows = pd.read_csv(path, sep="\t", dtype=str).to_dict("records")
    except (ValueError, UnicodeDecodeError) as err:
        raise EvalDataError(f"{path}: not a readable MMBench .tsv file: {err}") from err
    cells = {str(int_field(r, "index", f"{path}: row {i}")): str(r.get("image")) for i, r in enumerate(rows)}
    for i, row in enumerate(rows):
        where = f"{path}: row {i} (index {row['index']})"
        cell = cells[str(row["index"])]
        if len(cell) <= REFERENCE_CHARS:
            if len(cells.get(cell, "")) <= REFERENCE_CHARS:
                raise EvalDataError(f"{where}: image {cell!r} is neither base64 data nor the index of a row with an image")
            cell = cells[cell]
        try:
            row["image"] = base64.b64decode(cell, validate=True)
        except (binascii.Error, ValueError) as err:
            raise EvalDataError(f"{where}: field 'image' is not valid base64: {err}") from err
    return rows


class MMBenchTask(SelfContainedTask[MMBenchConfig]):
    config_cls = MMBenchConfig
    name = "mmbench_en_dev"
    prompt_version = "llava-1.5"

    def _rows(self) -> Iterator[tuple[dict[str, Any], str]]:
        path = Path(self.cfg.data)
        if not is_hf_copy(path):
            return ((row, f"{path}: row {i}") for i, row in enumerate(_tsv_rows(path)))
        return ((row, f"{path}: {self.hf_split} row {i}") for i, row in enumerate(read_split(path, self.hf_split)))

    def samples(self) -> Iterator[EvalSample]:
        rows = sorted(((int_field(row, "index", where), row, where) for row, where in self._rows()), key=lambda t: t[0])
        for index, row, where in rows:
            options: list[str] = []
            for letter in OPTIONS:
                if missing(row.get(letter)):
                    break
                options.append(str(row[letter]))
            answer = field_of(row, "answer", str, where)
            if answer not in OPTIONS[: len(options)]:
                raise EvalDataError(f"{where}: answer {answer!r} is not one of the options {OPTIONS[: len(options)]}")
            hint = "" if missing(row.get("hint")) else f"{row['hint']}\n"
            l2 = row.get("l2-category", row.get("L2-category"))
            yield EvalSample(
                id=str(index), image=image_bytes(row.get("image"), where),
                question=f"{hint}{field_of(row, 'question', str, where)}\n{options_block(options)}",
                reference=answer, type=field_of(row, "category", str, where),
                meta={"choices": lettered(options), "question": index % ROTATION,
                      "l2_category": None if missing(l2) else str(l2)},
            )

    def parse(self, sample: EvalSample, text: str) -> Any:
        return can_infer(text, sample.meta["choices"])

    def score(self, sample: EvalSample, parsed: Any) -> float:
        return float(parsed == sample.reference)

    def aggregate(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        questions = group_by(records, lambda r: r["meta"]["question"]).values()
        hits = [{"score": float(all(r["score"] == 1.0 for r in rs)), "type": rs[0]["type"],
                 "l2": rs[0]["meta"]["l2_category"]} for rs in questions]
        accuracy = mean_score(hits)
        by_type = group_by(hits, lambda h: h["type"])
        by_l2 = group_by([h for h in hits if h["l2"] is not None], lambda h: h["l2"])
        return {
            "accuracy": accuracy,
            "vanilla_accuracy": mean_score([r for r in records if int(r["id"]) < ROTATION]),
            "per_type": {t: mean_score(hs) for t, hs in sorted(by_type.items())},
            "n_per_type": {t: len(hs) for t, hs in sorted(by_type.items())},
            "per_l2_category": {t: mean_score(hs) for t, hs in sorted(by_l2.items())},
            "n": len(records), "n_questions": len(hits), "unmatched": sum(r["parsed"] is None for r in records),
            "lmms_eval": [lmms_eval_entry(self.name, "gpt_eval_score", None if accuracy is None else 100 * accuracy)],
        }

    def protocol_extra(self) -> dict[str, Any]:
        return {"split": self.cfg.split, "answer_matching": "VLMEvalKit can_infer; unmatched = wrong (no LLM judge)",
                "scoring": "CircularEval over the stored rotations", "per_type": "category (circular)"}
