"""ShapesWorld evaluation: every item of every split sample is one eval sample (image + question).

VQA items (colour, shape, count, exists, relpos) score 1 when the answer equals the single reference
after the official VQA normalisation (:func:`eval.metrics.normalize_vqa_answer`, both sides);
grounding items score Acc@0.5: the box parsed from the text in the 0-1000 convention against the
reference box (ShapesWorld writes boxes as ``[x1, y1, x2, y2]`` in 0-1000 integers of the image,
:mod:`train.data.shapesworld`).
The prompt is the training form of a first user turn, ``"<image>\\n" + question``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import asdict
from typing import Any

from eval.metrics import box_iou, grounding_hit, normalize_vqa_answer, parse_box
from eval.tasks.base import BaseTask, EvalDataError, EvalSample, mean_score, per_type
from train.data.shapesworld import GROUNDING_TYPE, ShapesWorld, ShapesWorldConfig, first_turn

CONVENTION = "0-1000"


class ShapesWorldTask(BaseTask):
    """ShapesWorld ``split`` of the generator configured by ``cfg`` (or a ready sequence ``data``)."""

    config_cls = ShapesWorldConfig
    name = "shapesworld"
    prompt_version = "shapesworld-v1"
    generated = True

    def __init__(
        self, cfg: ShapesWorldConfig, split: str = "test", data: Sequence[dict[str, Any]] | None = None
    ) -> None:
        self.cfg, self.split = cfg, split
        self._data = data
        # The training form of a first user turn (train/data/shapesworld.py first_turn).
        self.prompt = first_turn("{question}", cfg.image_first)

    def vocabulary_texts(self) -> list[str]:
        """Every text the generator can write, for a word-level tokenizer that must cover them all."""
        return ShapesWorld(self.cfg).vocabulary_texts()

    def samples(self) -> Iterator[EvalSample]:
        data = self._data if self._data is not None else ShapesWorld(self.cfg).split(self.split)
        for scene in data:
            for k, item in enumerate(scene["items"]):
                sid = f"{scene['id']}-{k}"
                reference: Any = item["answer"]
                if item["type"] == GROUNDING_TYPE:
                    reference = parse_box(item["answer"], CONVENTION)
                    if reference is None:
                        raise EvalDataError(f"ShapesWorld {sid}: grounding answer {item['answer']!r} is not a box")
                    reference = list(reference)
                yield EvalSample(sid, scene["image"], item["question"], reference, item["type"])

    def parse(self, sample: EvalSample, text: str) -> Any:
        if sample.type == GROUNDING_TYPE:
            box = parse_box(text, CONVENTION)
            return None if box is None else list(box)
        return normalize_vqa_answer(text)

    def score(self, sample: EvalSample, parsed: Any) -> float:
        if sample.type == GROUNDING_TYPE:
            return grounding_hit(parsed, sample.reference)
        return float(parsed == normalize_vqa_answer(sample.reference))

    def aggregate(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        vqa = [r for r in records if r["type"] != GROUNDING_TYPE]
        grounding = [r for r in records if r["type"] == GROUNDING_TYPE]
        ious = [box_iou(r["parsed"], r["reference"]) if r["parsed"] else 0.0 for r in grounding]
        return {
            "vqa_accuracy": mean_score(vqa),
            "grounding_accuracy": mean_score(grounding),
            "grounding_mean_iou": sum(ious) / len(ious) if ious else None,
            **per_type(records),
            "n": len(records), "n_vqa": len(vqa), "n_grounding": len(grounding),
        }

    def protocol_extra(self) -> dict[str, Any]:
        return {
            "split": self.split, "coordinate_convention": CONVENTION, "iou_threshold": 0.5,
            "answer_normalisation": "vqaEval.py (prediction and reference)",
            # The generator's config pins the data; a caller-supplied split carries no revision.
            "dataset_revision": "caller-supplied" if self._data is not None else asdict(self.cfg),
        }
