"""POPE: object-hallucination yes/no questions; accuracy, precision, recall, F1, yes-ratio per split.

Files (the public release, one JSON object per line): ``coco_pope_<split>.json`` with
``{"question_id", "image", "text", "label": "yes"|"no"}``. ``data`` is one such file (split = its
``"category"`` field when present, else the ``<split>`` of the file name) or a folder of them; images
(COCO val2014) in ``images``. LLaVA-1.5 prompt; answers parsed as LLaVA ``eval_pope.py`` does
(:func:`eval.metrics.pope_answer_is_yes`). Headline numbers are the means over splits; the table shows
F1 per split.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from eval.metrics import pope_answer_is_yes, pope_metrics
from eval.tasks.base import (
    EvalDataError,
    EvalSample,
    FileTask,
    FileTaskConfig,
    field_of,
    group_by,
    image_file,
    read_jsonl,
)
from eval.tasks.hub_copies import lmms_eval_entry

LABELS = {"yes": True, "no": False}
LMMS_SPLITS = {"adversarial": "pope_adv", "popular": "pope_pop", "random": "pope_random"}  # split -> lmms-eval task


def _split_of(path: Path) -> str:
    """``coco_pope_adversarial.json`` -> ``adversarial`` (the stem when the name has no ``_pope_``)."""
    return path.stem.split("_pope_", 1)[1] if "_pope_" in path.stem else path.stem


class POPETask(FileTask[FileTaskConfig]):
    config_cls = FileTaskConfig
    name = "pope"
    prompt_version = "llava-1.5"

    def data_files(self) -> list[str]:
        return [str(p) for p in self._files()]

    def _files(self) -> list[Path]:
        data = Path(self.cfg.data)
        if not data.is_dir():
            return [data]
        files = sorted(data.glob("*_pope_*.json*"))
        if not files:
            raise EvalDataError(f"{data}: no POPE files (*_pope_<split>.json) in this folder")
        return files

    def samples(self) -> Iterator[EvalSample]:
        files = self._files()
        folder = self.image_folder(files[0].parent)
        for path in files:
            for i, row in enumerate(read_jsonl(path)):
                where = f"{path}: line {i + 1}"
                split = field_of(row, "category", str, where) if "category" in row else _split_of(path)
                label = field_of(row, "label", str, where)
                if label not in LABELS:
                    raise EvalDataError(f"{where}: field 'label' should be 'yes' or 'no', got {label!r}")
                yield EvalSample(
                    id=f"{split}-{field_of(row, 'question_id', (int, str), where)}",
                    image=image_file(folder, field_of(row, "image", str, where), where),
                    question=field_of(row, "text", str, where),
                    reference=LABELS[label],
                    type=split,
                )

    def parse(self, sample: EvalSample, text: str) -> Any:
        return pope_answer_is_yes(text)

    def score(self, sample: EvalSample, parsed: Any) -> float:
        return float(parsed == sample.reference)

    def aggregate(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        splits = group_by(records, lambda r: r["type"])
        per_split = {
            s: pope_metrics([r["parsed"] for r in rs], [r["reference"] for r in rs]) for s, rs in sorted(splits.items())
        }
        means = {k: sum(m[k] for m in per_split.values()) / len(per_split) for k in next(iter(per_split.values()))}
        return {
            **means, "per_split": per_split, "per_type": {s: m["f1"] for s, m in per_split.items()},
            "n_per_type": {s: len(rs) for s, rs in sorted(splits.items())}, "n": len(records),
            "lmms_eval": _lmms_eval(records, per_split),
        }

    def protocol_extra(self) -> dict[str, Any]:
        return {"answer_parsing": "LLaVA eval_pope.py", "positive_class": "yes", "per_type": "f1 per split"}


def _lmms_eval(records: list[dict[str, Any]], per_split: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
    """Accuracy and F1 as lmms-eval names them: per split (``pope_adv``, ``pope_pop``, ``pope_random``) and,
    when all three are here, ``pope`` (its 9000 questions pooled: one confusion matrix, not a mean of
    splits)."""
    entries = []
    if set(per_split) == set(LMMS_SPLITS):
        pooled = pope_metrics([r["parsed"] for r in records], [r["reference"] for r in records])
        entries += [lmms_eval_entry("pope", "pope_accuracy", pooled["accuracy"]),
                    lmms_eval_entry("pope", "pope_f1_score", pooled["f1"])]
    for split, metrics in per_split.items():
        if split in LMMS_SPLITS:
            entries += [lmms_eval_entry(LMMS_SPLITS[split], "pope_accuracy", metrics["accuracy"]),
                        lmms_eval_entry(LMMS_SPLITS[split], "pope_f1_score", metrics["f1"])]
    return entries
