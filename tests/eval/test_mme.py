"""MME: the release folder and the lmms-lab parquet / save_to_disk copies give the same samples; the
official tool's answer reading and acc / acc+ / summed scores, computed by hand. The fixture files are
written by tests/exam_copies.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from exam_copies import mme_hf_rows, mme_release, view
from hf_rows import save_to_disk, write_parquet
from PIL import Image

from eval.runner import Dist, EvalConfig, run_task
from eval.tasks.base import EvalDataError
from eval.tasks.mme import mme_answer
from mllm.registry import EVAL_TASKS

# Scored by hand with the official reading (first four characters):
#   existence a: "Yes, there is" yes (right), "no" (right); b: "I think yes" other (wrong), "Not really" no (right)
#     -> acc 3/4, acc+ 1/2 (only a) -> 100 (0.75 + 0.5) = 125
#   count c: "yes" right, "yes" wrong -> acc 1/2, acc+ 0 -> 50
#   artwork d: "No." right, "Yes" right -> 200;  perception = 125 + 50 + 200 = 375
#   code_reasoning: "Yes." right, "No." right -> 200 = cognition
ANSWERS = {"dog": "Yes, there is", "cat": "no", "car": "I think yes", "bus": "Not really", "two apples": "yes",
           "three apples": "yes", "Monet": "No.", "Manet": "Yes", "output 3": "Yes.", "output 4": "No."}


def test_mme_answer_reading() -> None:
    assert [mme_answer(t) for t in ("Yes", " no\n", "Yes, it is", "nope", "none", "Not sure, yes")] == \
           ["yes", "no", "yes", "no", "no", "no"]
    # "other": the answer's first four characters hold neither word; a lone "n" is not read as no
    assert [mme_answer(t) for t in ("I think yes", "unknown", "n", "")] == ["other"] * 4


def test_mme_release_and_hub_copies_agree(tmp_path: Path) -> None:
    release = EVAL_TASKS.build("mme", {"data": str(mme_release(tmp_path / "MME_Benchmark_release_version"))})
    expected = view(release)
    assert [e[0] for e in expected] == ["existence/a.jpg/0", "existence/a.jpg/1", "existence/b.jpg/0",
                                        "existence/b.jpg/1", "count/c.jpg/0", "count/c.jpg/1", "artwork/d.jpg/0",
                                        "artwork/d.jpg/1", "code_reasoning/0020.png/0", "code_reasoning/0020.png/1"]
    first = next(iter(release.samples()))
    assert release.build_prompt(first) == (
        "<image>\nIs there a dog in the image?\nAnswer the question using a single word or phrase.")
    parquet = write_parquet(mme_hf_rows(), tmp_path / "lmms-lab-MME", "test", shards=2)
    assert view(EVAL_TASKS.build("mme", {"data": str(parquet)})) == expected
    saved = save_to_disk(mme_hf_rows(), tmp_path / "saved")
    assert view(EVAL_TASKS.build("mme", {"data": str(saved)})) == expected


def test_mme_scores_end_to_end(tmp_path: Path, scripted: Any) -> None:
    task = EVAL_TASKS.build("mme", {"data": str(mme_release(tmp_path / "MME"))})
    m = run_task(scripted(ANSWERS), task, EvalConfig(batch_size=3), tmp_path / "out", dist=Dist(), progress=False)
    assert m["perception"] == pytest.approx(375.0) and m["cognition"] == pytest.approx(200.0)
    assert m["per_subtask"]["existence"] == {"acc": 0.75, "acc_plus": 0.5, "score": 125.0, "n_images": 2}
    assert m["per_subtask"]["count"] == {"acc": 0.5, "acc_plus": 0.0, "score": 50.0, "n_images": 1}
    assert list(m["per_subtask"]) == ["existence", "count", "artwork", "code_reasoning"]  # the tool's order
    assert m["protocol"]["release_revision"]["question_files"] == 5 and m["protocol"]["dataset_revision"] == []
    assert m["accuracy"] == pytest.approx(8 / 10) and m["acc_plus"] == pytest.approx(3 / 5) and m["n"] == 10
    assert m["lmms_eval"] == [{"task": "mme", "metric": "mme_perception_score", "value": pytest.approx(375.0)},
                              {"task": "mme", "metric": "mme_cognition_score", "value": pytest.approx(200.0)}]


def test_mme_bad_files(tmp_path: Path) -> None:
    root = mme_release(tmp_path / "MME")
    (root / "count" / "c.jpg").unlink()
    with pytest.raises(EvalDataError, match=r"count/c\.txt: image .*count/c\.jpg \(or \.png\) not found"):
        list(EVAL_TASKS.build("mme", {"data": str(root)}).samples())
    Image.new("RGB", (4, 4)).save(root / "count" / "c.jpg")
    with (root / "count" / "c.txt").open("a") as f:
        f.write("Is it red? Please answer yes or no.\tYes\n")
    with pytest.raises(EvalDataError, match=r"count/c\.jpg has 3 questions, expected 2"):
        list(EVAL_TASKS.build("mme", {"data": str(root)}).samples())
    (root / "count" / "c.txt").write_text("Is it red?\tMaybe\nIs it blue?\tNo\n")
    with pytest.raises(EvalDataError, match=r"c\.txt:1: answer should be Yes or No, got 'Maybe'"):
        list(EVAL_TASKS.build("mme", {"data": str(root)}).samples())
    rows = mme_hf_rows()
    rows[0]["image"] = {"bytes": None, "path": "code_reasoning/0020.png"}
    with pytest.raises(EvalDataError, match=r"row 0: the image is stored by path only"):
        list(EVAL_TASKS.build("mme", {"data": str(write_parquet(rows, tmp_path / "hub", "test"))}).samples())
