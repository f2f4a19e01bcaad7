"""VizWiz-VQA val: release JSON and lmms-lab parquet give the same samples; the VizWiz script's accuracy."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from bench_copies import VIZWIZ_QUESTIONS as QUESTIONS
from bench_copies import vizwiz_hf_rows as hf_rows
from bench_copies import vizwiz_release as release
from hf_rows import sample_view, save_to_disk, write_parquet

from eval.runner import Dist, EvalConfig, run_task
from eval.tasks.base import EvalDataError
from mllm.registry import EVAL_TASKS

# By hand (eval.metrics.vizwiz_accuracy: prediction processed, answers raw, leave-one-out mean):
#   "Soup." -> "soup": 3 matches -> 9/10; "Unanswerable" -> "unanswerable": 10 -> 1;
#   "2": only the two raw "2" match ("two" is not mapped on the answer side) -> 6/10. Mean 2.5 / 3.
ANSWERS = {"What is this": "Soup.", "What color": "Unanswerable", "How many": "2"}


def test_release_parquet_and_saved_copies_give_the_same_samples(tmp_path: Path) -> None:
    want = sample_view(EVAL_TASKS.build("vizwiz_vqa_val", release(tmp_path / "rel")))
    # The snapshot folder also holds test shards: only val-* is read.
    write_parquet(hf_rows(), tmp_path / "hub", "val", shards=2)
    write_parquet(hf_rows()[:1], tmp_path / "hub", "test")
    assert sample_view(EVAL_TASKS.build("vizwiz_vqa_val", {"data": str(tmp_path / "hub")})) == want
    saved = save_to_disk(hf_rows(), tmp_path / "saved")
    assert sample_view(EVAL_TASKS.build("vizwiz_vqa_val", {"data": str(saved)})) == want
    assert [v[0] for v in want] == [q[0] for q in QUESTIONS]


def test_prompt_capitalises_the_question_as_lmms_eval(tmp_path: Path) -> None:
    task = EVAL_TASKS.build("vizwiz_vqa_val", release(tmp_path))
    first = next(iter(task.samples()))
    assert task.build_prompt(first) == (
        "<image>\nWhat is this?\nWhen the provided information is insufficient, respond with 'Unanswerable'.\n"
        "Answer the question using a single word or phrase."
    )
    plain = EVAL_TASKS.build("vizwiz_vqa_val", {**release(tmp_path), "capitalize_question": False})
    assert plain.build_prompt(first).startswith("<image>\nwhat is this?\n")


@pytest.mark.parametrize("layout", ["release", "parquet"])
def test_metrics_by_hand(layout: str, tmp_path: Path, scripted: Any) -> None:
    cfg = release(tmp_path / "rel") if layout == "release" else {
        "data": str(write_parquet(hf_rows(), tmp_path / "hub", "val"))}
    task = EVAL_TASKS.build("vizwiz_vqa_val", cfg)
    m = run_task(scripted(ANSWERS), task, EvalConfig(batch_size=2), tmp_path / "out", dist=Dist(), progress=False)
    assert m["accuracy"] == pytest.approx(2.5 / 3) and m["n"] == 3
    assert m["per_type"] == {"number": pytest.approx(0.6), "other": pytest.approx(0.9), "unanswerable": 1.0}


def test_missing_images_name_the_file(tmp_path: Path) -> None:
    cfg = release(tmp_path)
    (tmp_path / "val" / "VizWiz_val_00000001.jpg").unlink()
    with pytest.raises(EvalDataError, match=r"val\.json: \[1\]: image .*VizWiz_val_00000001\.jpg not found"):
        list(EVAL_TASKS.build("vizwiz_vqa_val", cfg).samples())
    rows = hf_rows()
    rows[2]["image"] = {"bytes": None, "path": "VizWiz_val_00000002.jpg"}
    hub = write_parquet(rows, tmp_path / "hub", "val")
    with pytest.raises(EvalDataError, match=r"val row 2: the image is stored by path only"):
        list(EVAL_TASKS.build("vizwiz_vqa_val", {"data": str(hub)}).samples())
