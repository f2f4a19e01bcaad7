"""ScienceQA-IMG: the test problems that have an image; LLaVA-1.5 prompt and letter extraction.

Files (the public release): ``data`` = ``problems.json`` (``{pid: {"question", "choices", "answer",
"hint", "image", "subject", "split", ...}}``); ``pid_splits`` = ``pid_splits.json`` (``{split: [pid]}``;
None = each problem's own ``"split"`` field); images ``<images>/<pid>/<image>`` (default:
``images/<split>/`` beside ``data``). Prompt as LLaVA-1.5's ``llava_test_CQM-A.json`` with
``--single-pred-prompt``: optional "Context: <hint>", the question, "A. ..." lines, then
"Answer with the option's letter from the given choices directly." Accuracy over all problems and per
subject (natural / social / language science), :func:`eval.metrics.scienceqa_choice` extraction.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eval.metrics import SCIENCEQA_OPTIONS, scienceqa_choice
from eval.tasks.base import (
    IMAGE_MARKER,
    EvalDataError,
    EvalSample,
    FileTask,
    FileTaskConfig,
    field_of,
    image_file,
    read_json,
    read_json_object,
)
from eval.tasks.hub_copies import lmms_eval_entry

SINGLE_PRED = "Answer with the option's letter from the given choices directly."


@dataclass
class ScienceQAConfig(FileTaskConfig):
    prompt: str = IMAGE_MARKER + "\n{question}\n" + SINGLE_PRED
    split: str = "test"
    pid_splits: str | None = None  # pid_splits.json; None = use each problem's "split" field


class ScienceQAImgTask(FileTask[ScienceQAConfig]):
    config_cls = ScienceQAConfig
    name = "scienceqa_img"
    prompt_version = "llava-1.5"

    def data_files(self) -> list[str]:
        return [self.cfg.data, *([self.cfg.pid_splits] if self.cfg.pid_splits else [])]

    def _pids(self, problems: Mapping[str, Any], path: Path) -> list[str]:
        split = self.cfg.split
        if self.cfg.pid_splits is None:
            return [pid for pid, p in problems.items() if field_of(p, "split", str, f"{path}: [{pid!r}]") == split]
        spath = Path(self.cfg.pid_splits)
        pids = field_of(read_json(spath), split, list, str(spath))
        unknown = [pid for pid in pids if pid not in problems]
        if unknown:
            raise EvalDataError(f"{spath}: {split}: pid {unknown[0]!r} is not in {path}")
        return pids

    def samples(self) -> Iterator[EvalSample]:
        path = Path(self.cfg.data)
        problems = read_json_object(path, "{pid: problem}")
        folder = self.image_folder(path.parent / "images" / self.cfg.split)
        for pid in self._pids(problems, path):
            p, where = problems[pid], f"{path}: [{pid!r}]"
            image = field_of(p, "image", (str, type(None)), where)
            if image is None:  # ScienceQA-IMG keeps the problems with an image context only
                continue
            choices = [str(c) for c in field_of(p, "choices", list, where)]
            answer = field_of(p, "answer", int, where)
            if not 0 <= answer < len(choices) <= len(SCIENCEQA_OPTIONS):
                raise EvalDataError(f"{where}: answer {answer} for {len(choices)} choices (at most 5)")
            hint = field_of(p, "hint", str, where)
            context = f"Context: {hint}\n" if hint else ""
            options = "\n".join(f"{SCIENCEQA_OPTIONS[k]}. {c}" for k, c in enumerate(choices))
            yield EvalSample(
                id=str(pid),
                image=image_file(folder, f"{pid}/{image}", where),
                question=f"{context}{field_of(p, 'question', str, where)}\n{options}",
                reference=answer,
                type=field_of(p, "subject", str, where),
                meta={"n_choices": len(choices)},
            )

    def parse(self, sample: EvalSample, text: str) -> Any:
        return scienceqa_choice(text, sample.meta["n_choices"])

    def score(self, sample: EvalSample, parsed: Any) -> float:
        return float(parsed == sample.reference)

    def aggregate(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        """lmms-eval's ``scienceqa_img`` is the test split: other splits have no lmms-eval number."""
        table = super().aggregate(records)
        test = self.cfg.split == "test"
        return {**table, "lmms_eval": [lmms_eval_entry(self.name, "exact_match", table["accuracy"])] if test else []}

    def protocol_extra(self) -> dict[str, Any]:
        return {"split": self.cfg.split, "answer_extraction": "LLaVA eval_science_qa.py", "per_type": "subject"}
