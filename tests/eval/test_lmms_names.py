"""Each task's summary names its number as lmms-eval reports it (``"lmms_eval"``: task, metric, value on
lmms-eval's scale). One answer for every question of each task's fixture; the values are counted by
hand and each equals our metric times the scale (1 for lmms-eval's fractions, 1/1000 for OCRBench's
score)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from eval.runner import Dist, EvalConfig, run_task
from mllm.registry import EVAL_TASKS


class Same:
    """Answers every prompt with one text."""

    def __init__(self, text: str) -> None:
        self.text = text

    def generate(self, images: list[Any], prompts: list[str], **kw: Any) -> list[str]:
        return [self.text] * len(prompts)


# task: (the one answer, config options, [(lmms-eval task, metric, our metric's path, scale, value by hand)])
CASES: dict[str, tuple[str, dict[str, Any], list[tuple[str, str, tuple[str, ...], float, float]]]] = {
    # "no" matches the 10 "no" of question 2, none of question 1's answers
    "vqav2": ("no", {}, [("vqav2_val", "exact_match", ("accuracy",), 1, 0.5)]),
    "gqa": ("yes", {}, [("gqa", "exact_match", ("accuracy",), 1, 0.5)]),
    "textvqa": ("two", {}, [("textvqa_val", "exact_match", ("accuracy",), 1, 0.5)]),
    # test problems with an image: pid 2 (answer A) right, pid 1 (answer B) wrong
    "scienceqa_img": ("A", {}, [("scienceqa_img", "exact_match", ("accuracy",), 1, 0.5)]),
    # 0-1000 box -> (50, 25, 150, 50) px on the 200x100 image; ground truth (50, 25, 150, 75): IoU 0.5, a hit
    "refcoco": ("[250, 250, 750, 500]", {"split": "val"}, [
        ("refcoco_bbox_rec_val", "refcoco_ACC@0.5", ("accuracy",), 1, 1.0),
        ("refcoco_bbox_rec_val", "refcoco_IoU", ("mean_iou",), 1, 0.5)]),
    "vizwiz_vqa_val": ("unanswerable", {}, [("vizwiz_vqa_val", "exact_match", ("accuracy",), 1, 1 / 3)]),
    # human: "12" right of 3; augmented: none of 2
    "chartqa": ("12", {}, [("chartqa", "relaxed_overall", ("relaxed_overall",), 1, 1 / 5),
                           ("chartqa", "relaxed_human_split", ("per_type", "human_test"), 1, 1 / 3),
                           ("chartqa", "relaxed_augmented_split", ("per_type", "augmented_test"), 1, 0.0)]),
    "docvqa_val": ("1200", {}, [("docvqa_val", "anls", ("anls",), 1, 1 / 3)]),
    # "CENTRE" is the one hit: score 1 (of 1000)
    "ocrbench": ("CENTRE", {}, [("ocrbench", "ocrbench_accuracy", ("score",), 1 / 1000, 0.001)]),
    "ai2d": ("B", {}, [("ai2d", "exact_match", ("accuracy",), 1, 2 / 3)]),
}


def run(name: str, answer: str, config: dict[str, Any], out: Path) -> dict[str, Any]:
    task = EVAL_TASKS.build(name, config)
    return run_task(Same(answer), task, EvalConfig(batch_size=4), out, dist=Dist(), progress=False)


def lookup(metrics: dict[str, Any], path: tuple[str, ...]) -> Any:
    for key in path:
        metrics = metrics[key]
    return metrics


@pytest.mark.parametrize("name", sorted(CASES))
def test_entry_is_our_metric_on_lmms_evals_scale(name: str, bench: Any, tmp_path: Path) -> None:
    answer, options, want = CASES[name]
    m = run(name, answer, {**bench(name), **options}, tmp_path / "out")
    assert m["lmms_eval"] == [{"task": t, "metric": k, "value": pytest.approx(v)} for t, k, _, _, v in want]
    for _, _, path, scale, value in want:
        assert scale * lookup(m, path) == pytest.approx(value)


def test_pope_per_split_and_pooled(bench: Any, tmp_path: Path) -> None:
    """"yes" to everything. random: labels yes, no, yes -> accuracy 2/3, precision 2/3, recall 1, F1 0.8;
    adversarial: no, yes -> 1/2, 1/2, 1, F1 2/3; popular (added): no -> accuracy 0, F1 0. Pooled (lmms-eval's
    ``pope``, the three splits together): 3 yes of 6 -> accuracy 1/2, precision 1/2, recall 1, F1 2/3 --
    not the mean of the splits' F1 (0.489)."""
    config = bench("pope")
    one_split = run("pope", "yes", config, tmp_path / "two")["lmms_eval"]
    assert one_split == [  # without the popular split there is no pooled "pope" number
        {"task": "pope_adv", "metric": "pope_accuracy", "value": pytest.approx(0.5)},
        {"task": "pope_adv", "metric": "pope_f1_score", "value": pytest.approx(2 / 3)},
        {"task": "pope_random", "metric": "pope_accuracy", "value": pytest.approx(2 / 3)},
        {"task": "pope_random", "metric": "pope_f1_score", "value": pytest.approx(0.8)},
    ]
    row = {"question_id": 9, "image": "COCO_val2014_000000000001.jpg", "text": "Is there a kite?", "label": "no"}
    (Path(config["data"]) / "coco_pope_popular.json").write_text(json.dumps(row) + "\n")
    m = run("pope", "yes", config, tmp_path / "three")
    assert m["lmms_eval"][:2] == [{"task": "pope", "metric": "pope_accuracy", "value": pytest.approx(0.5)},
                                  {"task": "pope", "metric": "pope_f1_score", "value": pytest.approx(2 / 3)}]
    assert m["lmms_eval"][2:] == [*one_split[:2], {"task": "pope_pop", "metric": "pope_accuracy", "value": 0.0},
                                  {"task": "pope_pop", "metric": "pope_f1_score", "value": 0.0}, *one_split[2:]]
    assert m["f1"] == pytest.approx((2 / 3 + 0.8 + 0.0) / 3)  # our headline: the mean over splits


def test_no_entry_where_lmms_eval_has_no_such_split(bench: Any, tmp_path: Path) -> None:
    """RefCOCO over all splits at once, ScienceQA-IMG's validation split: lmms-eval reports neither."""
    from PIL import Image

    assert run("refcoco", "[0, 0, 10, 10]", bench("refcoco"), tmp_path / "rc")["lmms_eval"] == []
    config = bench("scienceqa_img")
    (Path(config["data"]).parent / "images" / "val" / "4").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(Path(config["data"]).parent / "images" / "val" / "4" / "image.png")
    m = run("scienceqa_img", "A", {**config, "split": "val"}, tmp_path / "sq")
    assert m["n"] == 1 and m["lmms_eval"] == []
