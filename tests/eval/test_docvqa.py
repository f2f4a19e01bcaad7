"""DocVQA val: release JSON and lmms-lab parquet give the same samples; ANLS by hand."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hf_rows import hf_image, png, sample_view, save_to_disk, write_parquet

from eval.runner import Dist, EvalConfig, run_task
from eval.tasks.base import EvalDataError
from mllm.registry import EVAL_TASKS

QUESTIONS = [  # (questionId, question, answers, question types, image name)
    (101, "What is the date?", ["March 5, 1998"], ["form"], "abc_1.png"),
    (102, "What is the total?", ["$1,200", "1200"], ["table/list"], "abc_2.png"),
    (103, "Who signed the letter?", ["John Smith"], ["handwritten", "form"], "abc_2.png"),
]
# By hand (eval.doc_metrics.anls): "march 5 1998" vs "march 5, 1998": 1 edit over max(13, 12) = 13
# characters -> 12/13; "1200" equals the second answer -> 1; "Mary" vs "john smith": 9 edits / 10 -> 0.1,
# below 0.5 -> 0. ANLS = (12/13 + 1 + 0) / 3; form (12/13 + 0) / 2 = 6/13, table/list 1, handwritten 0.
ANSWERS = {"date": "march 5 1998", "total": "1200", "signed": "Mary"}


def _colour(name: str) -> tuple[int, int, int]:
    return (0, 40 * int(name[-5]), 0)


def release(root: Path) -> dict[str, Any]:
    (root / "documents").mkdir(parents=True)
    rows = []
    for qid, question, answers, types, name in QUESTIONS:
        (root / "documents" / name).write_bytes(png(_colour(name)))
        rows.append({"questionId": qid, "question": question, "question_types": types, "image": f"documents/{name}",
                     "docId": qid // 2, "ucsf_document_id": "abc", "ucsf_document_page_no": "1", "answers": answers,
                     "data_split": "val"})
    (root / "val_v1.0_withQT.json").write_text(json.dumps({"dataset_name": "docvqa", "data": rows}))
    return {"data": str(root / "val_v1.0_withQT.json")}


def hf_rows() -> list[dict[str, Any]]:
    return [{"questionId": str(qid), "question": question, "question_types": types, "image": hf_image(png(_colour(n))),
             "docId": qid // 2, "ucsf_document_id": "abc", "ucsf_document_page_no": "1", "answers": answers,
             "data_split": "val"} for qid, question, answers, types, n in QUESTIONS]


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
