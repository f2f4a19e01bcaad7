"""GQA with the scores of the official ``eval.py`` (v1.2, gqadataset.org), LLaVA-1.5 prompt.

Files (the public release): ``data`` = e.g. ``testdev_balanced_questions.json``, an object
``{question_id: {"imageId", "question", "answer", "types": {"structural", "semantic", "detailed"},
"isBalanced", "groups": {"global", "local"}, "entailed": [question_id], ...}}``; images ``<imageId>.jpg``
in ``images``; optional ``choices`` = e.g. ``val_choices.json``, ``{question_id: {"valid": [answer],
"plausible": [answer]}}`` (the release has none for testdev).

A prediction is LLaVA's ``text.rstrip('.').lower()`` (``convert_gqa_for_eval.py``); it is correct when it
equals the answer. As in eval.py, every score counts only the questions with ``isBalanced`` true (all
of them when the field is absent); the others are generated only to serve as entailed questions.

Metrics, as eval.py defines them but as fractions in [0, 1] where eval.py prints percentages:
``accuracy``; ``binary_accuracy`` / ``open_accuracy`` (eval.py ``binary`` / ``open``: open iff
``types.structural == "query"``); ``per_type`` (structural) and ``per_semantic_type``; with ``choices``,
``validity`` and ``plausibility``; when every question has ``entailed`` and every entailed question is
in the run (eval.py ``--consistency`` on the all-questions file; the balanced files' entailed questions
are mostly outside them), ``consistency``; when every question has ``groups``, ``distribution`` (the
chi-square score, printed by eval.py without scaling, lower is better). A score whose inputs are
missing is left out of the metrics, not reported as 0 (eval.py prints 0 validity without choices).
Not computed: grounding (needs the model's attention maps and the scene graphs) and eval.py's
accuracy per question length and per number of reasoning steps.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from eval.metrics import exact_match, gqa_answer_type, gqa_belongs, gqa_consistency, gqa_distribution
from eval.tasks.base import (
    EvalDataError,
    EvalSample,
    FileTask,
    FileTaskConfig,
    field_of,
    group_by,
    image_file,
    mean_score,
    per_meta,
    read_json_object,
    str_list,
)
from eval.tasks.hub_copies import lmms_eval_entry

# metric name -> the choices file's list it checks the prediction against (eval.py)
CHOICE_SCORES = {"validity": "valid", "plausibility": "plausible"}


@dataclass
class GQAConfig(FileTaskConfig):
    choices: str | None = None  # choices JSON {qid: {"valid", "plausible"}}; None = no validity/plausibility


class GQATask(FileTask[GQAConfig]):
    config_cls = GQAConfig
    name = "gqa"
    prompt_version = "llava-1.5"

    def data_files(self) -> list[str]:
        return [self.cfg.data, *([self.cfg.choices] if self.cfg.choices else [])]

    @cached_property
    def _choices(self) -> Mapping[str, Any]:
        return read_json_object(Path(str(self.cfg.choices)), '{question_id: {"valid": [...], "plausible": [...]}}')

    def _choice_list(self, qid: str, key: str) -> list[str]:
        """The ``valid`` or ``plausible`` answers of question ``qid`` in the choices file."""
        if qid not in self._choices:
            raise EvalDataError(f"{self.cfg.choices}: no entry for question {qid!r}")
        return str_list(self._choices[qid], key, f"{self.cfg.choices}: [{qid!r}]")

    def samples(self) -> Iterator[EvalSample]:
        path = Path(self.cfg.data)
        questions = read_json_object(path, "{question_id: question}")
        folder = self.image_folder(path.parent)
        for qid, q in questions.items():
            yield self._sample(str(qid), q, folder, f"{path}: [{qid!r}]")

    def _sample(self, qid: str, q: Any, folder: Path, where: str) -> EvalSample:
        types = field_of(q, "types", Mapping, where)
        # eval.py scores only balanced questions; a file without the flag (a converted subset) is all scored.
        balanced = field_of(q, "isBalanced", bool, where) if "isBalanced" in q else True
        meta: dict[str, Any] = {"semantic": field_of(types, "semantic", str, f"{where}.types"), "balanced": balanced}
        if self.cfg.choices and balanced:
            meta["detailed"] = field_of(types, "detailed", str, f"{where}.types")
            for key in CHOICE_SCORES.values():  # a malformed entry fails now, before any generation
                self._choice_list(qid, key)
        if "entailed" in q:
            meta["entailed"] = str_list(q, "entailed", where)
        if "groups" in q:
            meta["group"] = field_of(field_of(q, "groups", Mapping, where), "global", (str, type(None)),
                                     f"{where}.groups")
        return EvalSample(
            id=qid,
            image=image_file(folder, f"{field_of(q, 'imageId', str, where)}.jpg", where),
            question=field_of(q, "question", str, where),
            reference=field_of(q, "answer", str, where),
            type=field_of(types, "structural", str, f"{where}.types"),
            meta=meta,
        )

    def parse(self, sample: EvalSample, text: str) -> Any:
        return text.strip().rstrip(".").lower()

    def score(self, sample: EvalSample, parsed: Any) -> float:
        return exact_match(parsed, sample.reference)

    def aggregate(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        # Records written before the flag was stored (a resumed run) are all balanced questions.
        scored = [r for r in records if r["meta"].get("balanced", True)]
        by_answer_type = group_by(scored, lambda r: gqa_answer_type(r["type"]))
        table = super().aggregate(scored)
        return {
            **table,
            "per_semantic_type": per_meta(scored, "semantic"),
            **{f"{t}_accuracy": mean_score(by_answer_type.get(t, [])) for t in ("binary", "open")},
            **self._choice_scores(scored),
            **_consistency(records, scored),
            **_distribution(scored),
            "lmms_eval": [lmms_eval_entry(self.name, "exact_match", table["accuracy"])],
        }

    def _choice_scores(self, scored: list[dict[str, Any]]) -> dict[str, float | None]:
        """Validity and plausibility (eval.py ``belongs``), when a choices file is given."""
        if not self.cfg.choices:
            return {}
        return {name: self._belongs_rate(scored, key) for name, key in CHOICE_SCORES.items()}

    def _belongs_rate(self, scored: list[dict[str, Any]], key: str) -> float | None:
        """The fraction of predictions in the question's ``key`` list of the choices file."""
        hits = [gqa_belongs(r["parsed"], self._choice_list(r["id"], key), r["meta"]["detailed"]) for r in scored]
        return sum(hits) / len(hits) if hits else None

    def protocol_extra(self) -> dict[str, Any]:
        return {"answer_processing": "rstrip('.').lower(), exact match", "per_type": "types.structural"}


def _consistency(records: list[dict[str, Any]], scored: list[dict[str, Any]]) -> dict[str, float | None]:
    """eval.py's consistency, when every scored question lists its entailed questions and all of those
    were evaluated (eval.py needs a prediction for each)."""
    if not all("entailed" in r["meta"] for r in scored):
        return {}
    correct = {r["id"]: r["score"] == 1.0 for r in records}
    entailed = {r["id"]: r["meta"]["entailed"] for r in scored}
    if any(e not in correct for ids in entailed.values() for e in ids):
        return {}
    return {"consistency": gqa_consistency(entailed, correct)}


def _distribution(scored: list[dict[str, Any]]) -> dict[str, float | None]:
    """eval.py's chi-square distribution score, when every scored question has its ``groups``."""
    if not all("group" in r["meta"] for r in scored):
        return {}
    return {"distribution": gqa_distribution((r["meta"]["group"], r["reference"], r["parsed"]) for r in scored)}
