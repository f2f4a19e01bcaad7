"""DocVQA val: release JSON and lmms-lab parquet give the same samples; ANLS by hand."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from bench_copies import docvqa_hf_rows as hf_rows
from bench_copies import docvqa_release as release
from hf_rows import sample_view, save_to_disk, write_parquet

from eval.runner import Dist, EvalConfig, run_task
from eval.tasks.base import EvalDataError
from mllm.registry import EVAL_TASKS

# By hand (eval.doc_metrics.anls): "march 5 1998" vs "march 5, 1998": 1 edit over max(13, 12) = 13
# characters -> 12/13; "1200" equals the second answer -> 1; "Mary" vs "john smith": 9 edits / 10 -> 0.1,
# below 0.5 -> 0. ANLS = (12/13 + 1 + 0) / 3; form (12/13 + 0) / 2 = 6/13, table/list 1, handwritten 0.
ANSWERS = {"date": "march 5 1998", "total": "1200", "signed": "Mary"}


def test_release_parquet_and_saved_copies_give_the_same_samples(tmp_path: Path) -> None:
    want = sample_view(EVAL_TASKS.build("docvqa_val", release(tmp_path / "rel")))
    assert [v[0] for v in want] == ["101", "102", "103"]
    assert want[0][1] == "<image>\nWhat is the date?\nAnswer the question using a single word or phrase."
    hub = write_parquet(hf_rows(), tmp_path / "hub" / "DocVQA", "validation", shards=2)
    write_parquet(hf_rows()[:1], tmp_path / "hub" / "DocVQA", "test")
    assert sample_view(EVAL_TASKS.build("docvqa_val", {"data": str(hub.parent.parent)})) == want
    saved = save_to_disk(hf_rows(), tmp_path / "saved")
    assert sample_view(EVAL_TASKS.build("docvqa_val", {"data": str(saved)})) == want


@pytest.mark.parametrize("layout", ["release", "parquet"])
def test_anls_by_hand(layout: str, tmp_path: Path, scripted: Any) -> None:
    cfg = release(tmp_path / "rel") if layout == "release" else {
        "data": str(write_parquet(hf_rows(), tmp_path / "hub", "validation"))}
    task = EVAL_TASKS.build("docvqa_val", cfg)
    m = run_task(scripted(ANSWERS), task, EvalConfig(batch_size=2), tmp_path / "out", dist=Dist(), progress=False)
    assert m["anls"] == pytest.approx((12 / 13 + 1) / 3) and m["n"] == 3
    assert m["per_question_type"] == {"form": pytest.approx(6 / 13), "handwritten": 0.0, "table/list": 1.0}


def test_bad_rows_name_the_file(tmp_path: Path) -> None:
    cfg = release(tmp_path)
    (tmp_path / "documents" / "abc_2.png").unlink()
    with pytest.raises(EvalDataError, match=r"data\[1\]: image .*documents/abc_2\.png not found"):
        list(EVAL_TASKS.build("docvqa_val", cfg).samples())
    rows = [{**r, "answers": r["answers"][0]} for r in hf_rows()]  # a string column, not lists
    hub = write_parquet(rows, tmp_path / "hub", "validation")
    with pytest.raises(EvalDataError, match=r"validation row 0: field 'answers' should be list"):
        list(EVAL_TASKS.build("docvqa_val", {"data": str(hub)}).samples())
