"""Benchmark tasks on fixture files in the official formats, with hand-computed metrics.

Tasks are built through the registry from plain mappings, as the CLI builds them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from eval.runner import Dist, EvalConfig, run_task
from eval.tasks.base import EvalDataError
from mllm.config import ConfigError
from mllm.registry import EVAL_TASKS


def _run(name: str, cfg: dict[str, Any], answers: dict[str, str], out: Path, scripted: Any) -> dict[str, Any]:
    task = EVAL_TASKS.build(name, cfg)
    return run_task(scripted(answers), task, EvalConfig(batch_size=2), out, dist=Dist(), progress=False)


def test_vqav2(bench: Any, scripted: Any, tmp_path: Path) -> None:
    # "White." -> EvalAI "white": 2 of 10 humans -> 0.6 (see test_metrics); "No" vs 10 x "no" -> 1.
    m = _run("vqav2", bench("vqav2"), {"cat": "White.", "raining": "No"}, tmp_path / "out", scripted)
    assert m["accuracy"] == pytest.approx(0.8) and m["n"] == 2
    assert m["per_type"] == {"other": pytest.approx(0.6), "yes/no": 1.0}
    assert m["per_question_type"] == {"is it": 1.0, "what color is the": pytest.approx(0.6)}
    assert m["protocol"]["dataset_revision"][1]["file"] == "v2_mscoco_val2014_annotations.json"
    rec = json.loads((tmp_path / "out" / "predictions.jsonl").read_text().splitlines()[0])
    assert rec["id"] == "1" and rec["parsed"] == "white" and rec["meta"] == {"question_type": "what color is the"}


def test_vqav2_malformed(bench: Any, tmp_path: Path) -> None:
    cfg = bench("vqav2")
    ann = json.loads(Path(cfg["annotations"]).read_text())
    del ann["annotations"][1]["answers"]
    Path(cfg["annotations"]).write_text(json.dumps(ann))
    with pytest.raises(EvalDataError, match=r"annotations\.json: annotations\[1\]: missing field 'answers'"):
        list(EVAL_TASKS.build("vqav2", cfg).samples())
    with pytest.raises(EvalDataError, match="vqav2.annotations: .* required"):
        EVAL_TASKS.build("vqav2", {**cfg, "annotations": None})
    with pytest.raises(ConfigError, match="eval task:vqav2.anotations: unknown key"):
        EVAL_TASKS.build("vqav2", {**cfg, "anotations": "x"})


def test_vqav2_missing_image_fails_before_generation(bench: Any) -> None:
    cfg = bench("vqav2")
    (Path(cfg["images"]) / "COCO_val2014_000000000011.jpg").unlink()
    with pytest.raises(EvalDataError, match=r"questions\[1\]: image .*COCO_val2014_000000000011.jpg not found"):
        list(EVAL_TASKS.build("vqav2", cfg).samples())


def test_gqa(bench: Any, scripted: Any, tmp_path: Path) -> None:
    m = _run("gqa", bench("gqa"), {"sky": "Yes.", "cup": "right"}, tmp_path / "out", scripted)
    assert m["accuracy"] == 0.5 and m["per_type"] == {"query": 0.0, "verify": 1.0}
    assert m["per_semantic_type"] == {"attr": 1.0, "rel": 0.0}


def test_gqa_malformed(bench: Any) -> None:
    cfg = bench("gqa")
    data = json.loads(Path(cfg["data"]).read_text())
    del data["q2"]["types"]["structural"]
    Path(cfg["data"]).write_text(json.dumps(data))
    with pytest.raises(EvalDataError, match=r"questions\.json: \['q2'\]\.types: missing field 'structural'"):
        list(EVAL_TASKS.build("gqa", cfg).samples())


def test_textvqa_with_and_without_ocr(bench: Any, scripted: Any, tmp_path: Path) -> None:
    cfg = bench("textvqa")
    # "Coca Cola" vs 3 x "coca-cola" -> 0.9; "2" vs 10 x "two" (normalised to "2") -> 1.
    m = _run("textvqa", cfg, {"brand": "Coca Cola", "bottles": "2"}, tmp_path / "ocr", scripted)
    assert m["accuracy"] == pytest.approx(0.95) and m["protocol"]["ocr_tokens_in_prompt"] is True
    plain = _run("textvqa", {**cfg, "ocr": None}, {"brand": "coke", "bottles": "3"}, tmp_path / "plain", scripted)
    assert plain["accuracy"] == pytest.approx(0.5) and plain["protocol"]["ocr_tokens_in_prompt"] is False


def test_textvqa_malformed(bench: Any) -> None:
    cfg = bench("textvqa")
    data = json.loads(Path(cfg["data"]).read_text())
    data["data"][0]["answers"][4] = 5
    Path(cfg["data"]).write_text(json.dumps(data))
    with pytest.raises(EvalDataError, match=r"data\[0\]: field 'answers'\[4\] should be str, got 5"):
        list(EVAL_TASKS.build("textvqa", cfg).samples())


@pytest.mark.parametrize("use_pid_splits", [False, True])
def test_scienceqa_img(bench: Any, scripted: Any, tmp_path: Path, use_pid_splits: bool) -> None:
    cfg = bench("scienceqa_img")
    if use_pid_splits:
        cfg["pid_splits"] = str(Path(cfg["data"]).parent / "pid_splits.json")
    # Problem 3 has no image, problem 4 is not in the test split: 2 samples. "B" = whale (right);
    # "The answer is B." names dog, the answer is A (wrong).
    m = _run("scienceqa_img", cfg, {"mammal": "B", "rhymes": "The answer is B."}, tmp_path / "out", scripted)
    assert m["n"] == 2 and m["accuracy"] == 0.5
    assert m["per_type"] == {"language science": 0.0, "natural science": 1.0}


def test_scienceqa_malformed(bench: Any) -> None:
    cfg = bench("scienceqa_img")
    problems = json.loads(Path(cfg["data"]).read_text())
    problems["1"]["answer"] = 3
    Path(cfg["data"]).write_text(json.dumps(problems))
    with pytest.raises(EvalDataError, match=r"problems\.json: \['1'\]: answer 3 for 3 choices"):
        list(EVAL_TASKS.build("scienceqa_img", cfg).samples())


def test_pope_folder(bench: Any, scripted: Any, tmp_path: Path) -> None:
    answers = {"dog": "Yes", "cat": "No, there is not.", "car": "no", "fork": "Yes, there is.", "bus": "Yes"}
    m = _run("pope", bench("pope"), answers, tmp_path / "out", scripted)
    # random: TP 1, TN 1, FN 1 -> acc 2/3, precision 1, recall 1/2, F1 2/3, yes-ratio 1/3.
    # adversarial: FP 1, TP 1 -> acc 1/2, precision 1/2, recall 1, F1 2/3, yes-ratio 1.
    rnd, adv = m["per_split"]["random"], m["per_split"]["adversarial"]
    assert (rnd["accuracy"], rnd["precision"], rnd["recall"]) == (pytest.approx(2 / 3), 1.0, 0.5)
    assert (rnd["f1"], rnd["yes_ratio"]) == (pytest.approx(2 / 3), pytest.approx(1 / 3))
    assert (adv["accuracy"], adv["precision"], adv["recall"], adv["yes_ratio"]) == (0.5, 0.5, 1.0, 1.0)
    assert m["accuracy"] == pytest.approx(7 / 12) and m["f1"] == pytest.approx(2 / 3)
    assert m["yes_ratio"] == pytest.approx(2 / 3) and m["n_per_type"] == {"adversarial": 2, "random": 3}


def test_pope_single_file_and_bad_label(bench: Any) -> None:
    cfg = bench("pope")
    path = Path(cfg["data"]) / "coco_pope_random.json"
    task = EVAL_TASKS.build("pope", {**cfg, "data": str(path)})
    assert [s.id for s in task.samples()] == ["random-1", "random-2", "random-3"]
    path.write_text(path.read_text().replace('"label": "no"', '"label": "maybe"'))
    with pytest.raises(EvalDataError, match=r"coco_pope_random.json: line 2: field 'label' should be 'yes' or 'no'"):
        list(task.samples())


def test_refcoco_json_pixels_back_from_0_1000(bench: Any, scripted: Any, tmp_path: Path) -> None:
    cfg = bench("refcoco")
    # Image 200x100; GT xywh [50, 25, 100, 50] -> xyxy [50, 25, 150, 75] = 0-1000 [250, 250, 750, 750].
    answers = {"man on left": "[250, 250, 750, 750]", "left guy": "[250, 250, 500, 750]", "dog": "none"}
    m = _run("refcoco", cfg, answers, tmp_path / "out", scripted)
    # IoU 1 (hit); [50, 25, 100, 75] covers half the box: IoU 0.5 (hit); no box (miss).
    assert m["n"] == 3 and m["accuracy"] == pytest.approx(2 / 3) and m["mean_iou"] == pytest.approx(0.5)
    rows = [json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["0-0", "0-1", "1"]
    assert rows[0]["parsed"] == pytest.approx([50, 25, 150, 75]) and rows[0]["reference"] == [50, 25, 150, 75]
    assert rows[2]["meta"]["image_size"] == [200, 100]  # no width/height fields: read from the image header


def test_refcoco_square_pad_and_split(bench: Any, scripted: Any, tmp_path: Path) -> None:
    cfg = {**bench("refcoco"), "convention": "0-1", "square_pad": True, "split": "val"}
    # Padded to 200x200 with the image at y offset (200 - 100) // 2 = 50: the GT box is
    # [50, 75, 150, 125] there = [0.25, 0.375, 0.75, 0.625] of the square; mapped back it is exact.
    # Without the offset the same answer would land on [50, 75, 150, 125]: IoU 0 with the GT box.
    answers = {"man on left": "[0.25, 0.375, 0.75, 0.625]", "left guy": "[0.25, 0.375, 0.75, 0.625]"}
    m = _run("refcoco+", cfg, answers, tmp_path / "out", scripted)
    assert m["task"] == "refcoco+" and m["n"] == 2 and m["per_type"] == {"val": 1.0}
    assert m["protocol"]["square_pad"] is True and m["protocol"]["coordinate_convention"] == "0-1"


def test_refcoco_jsonl_and_parquet_with_embedded_images(bench: Any, scripted: Any, tmp_path: Path) -> None:
    cfg = bench("refcoco")
    rows = json.loads(Path(cfg["data"]).read_text())
    jsonl = Path(cfg["data"]).with_suffix(".jsonl")
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    image_bytes = (Path(cfg["images"]) / rows[0]["file_name"]).read_bytes()
    table = pa.table({
        "question_id": [5, 6], "answer": ["man on left", "dog"],
        "bbox": [[50.0, 25.0, 100.0, 50.0], [0.0, 0.0, 20.0, 20.0]],
        "image": [{"bytes": image_bytes, "path": "a.jpg"}, {"bytes": image_bytes, "path": "a.jpg"}],
    })
    parquet = tmp_path / "refcocog_val.parquet"
    pq.write_table(table, parquet)
    answers = {"man on left": "[250, 250, 750, 750]", "left guy": "[0, 0, 1, 1]", "dog": "[0, 0, 100, 200]"}
    from_jsonl = _run("refcoco", {**cfg, "data": str(jsonl)}, answers, tmp_path / "jsonl", scripted)
    assert from_jsonl["accuracy"] == pytest.approx(2 / 3)  # the dog box is exact: [0,0,20,20] of 200x100
    pq_cfg = {"data": str(parquet), "expression_key": "answer", "image_key": "image", "id_key": "question_id"}
    task = EVAL_TASKS.build("refcocog", pq_cfg)
    samples = list(task.samples())
    assert [s.id for s in samples] == ["5", "6"] and isinstance(samples[0].image, bytes)
    assert samples[0].load_image().size == (200, 100) and samples[0].meta["image_size"] == [200, 100]
    m = run_task(scripted(answers), task, EvalConfig(), tmp_path / "pq", dist=Dist(), progress=False)
    assert m["accuracy"] == 1.0


def test_refcoco_malformed(bench: Any) -> None:
    cfg = bench("refcoco")
    rows = json.loads(Path(cfg["data"]).read_text())
    rows[1]["bbox"] = [0, 0, 20]
    Path(cfg["data"]).write_text(json.dumps(rows))
    with pytest.raises(EvalDataError, match=r"refcoco_val\.json: record 1: field 'bbox' should be 4 numbers"):
        list(EVAL_TASKS.build("refcoco", cfg).samples())
    with pytest.raises(EvalDataError, match=r"record 0: missing field 'expression'"):
        list(EVAL_TASKS.build("refcoco", {**cfg, "expression_key": "expression"}).samples())
    with pytest.raises(ConfigError, match="convention: expected one of"):
        EVAL_TASKS.build("refcoco", {**cfg, "convention": "0-100"})


def test_embedded_bytes_that_are_not_an_image() -> None:
    from eval.tasks.base import EvalSample

    with pytest.raises(EvalDataError, match="embedded image: cannot read the image of sample 'z'"):
        EvalSample("z", b"junk", "q", None).load_image()
    assert isinstance(EvalSample("ok", Image.new("L", (2, 2)), "q", None).load_image(), Image.Image)
