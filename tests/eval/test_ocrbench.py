"""OCRBench: release JSON and hub parquet give the same samples; the official scoring by hand."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from bench_copies import ocrbench_hf_rows as hf_rows
from bench_copies import ocrbench_release as release
from hf_rows import sample_view, save_to_disk, write_parquet

from eval.runner import Dist, EvalConfig, run_task
from eval.tasks.base import EvalDataError
from mllm.registry import EVAL_TASKS

# By hand (eval.doc_metrics.ocrbench_hit): "centre" is in "the text is centre." -> hit; HME100k keeps case:
# "x^{2}" is not in "X^{2}" -> miss; "1200" in "1200 dollars" -> hit; "friend" not in "fiend" -> miss.
# Score 2 (of 4); text recognition 1; per category: Regular 1, HME 0, Doc-oriented 1.
ANSWERS = {"written": "The text is CENTRE.", "LaTeX": "X^{2}", "total": "1200 dollars", "word in": "fiend"}


def test_release_parquet_and_saved_copies_give_the_same_samples(tmp_path: Path) -> None:
    want = sample_view(EVAL_TASKS.build("ocrbench", release(tmp_path / "rel")))
    assert [v[0] for v in want] == ["0", "1", "2", "3"]
    assert want[3][1] == "<image>\nwhat is the word in the image?"  # stripped, no suffix (lmms-eval)
    assert want[0][2] == ["CENTRE"] and want[1][4] == {"dataset": "HME100k"}
    hub = write_parquet(hf_rows(), tmp_path / "hub", "test", shards=3)
    assert sample_view(EVAL_TASKS.build("ocrbench", {"data": str(hub)})) == want
    saved = save_to_disk(hf_rows(), tmp_path / "saved")
    assert sample_view(EVAL_TASKS.build("ocrbench", {"data": str(saved)})) == want


@pytest.mark.parametrize("layout", ["release", "parquet"])
def test_official_scoring_by_hand(layout: str, tmp_path: Path, scripted: Any) -> None:
    cfg = release(tmp_path / "rel") if layout == "release" else {
        "data": str(write_parquet(hf_rows(), tmp_path / "hub", "test"))}
    task = EVAL_TASKS.build("ocrbench", cfg)
    m = run_task(scripted(ANSWERS), task, EvalConfig(batch_size=2), tmp_path / "out", dist=Dist(), progress=False)
    assert m["score"] == 2.0 and m["text_recognition"] == 1.0 and m["accuracy"] == 0.5 and m["n"] == 4
    assert m["per_category"] == {"Doc-oriented VQA": 1.0, "Handwritten Mathematical Expression Recognition": 0.0,
                                 "Regular Text Recognition": 1.0}


def test_bad_rows_name_the_file(tmp_path: Path) -> None:
    cfg = release(tmp_path)
    (tmp_path / "OCRBench_Images" / "docVQA" / "3.png").unlink()
    with pytest.raises(EvalDataError, match=r"OCRBench\.json: \[2\]: image .*docVQA/3\.png not found"):
        list(EVAL_TASKS.build("ocrbench", cfg).samples())
    rows = [{k: v for k, v in r.items() if k != "question_type"} for r in hf_rows()]
    hub = write_parquet(rows, tmp_path / "hub", "test")
    with pytest.raises(EvalDataError, match=r"test row 0: missing field 'question_type'"):
        list(EVAL_TASKS.build("ocrbench", {"data": str(hub)}).samples())
