"""AI2D test: release question files and lmms-lab parquet give the same samples; lmms-eval scoring by hand."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from bench_copies import ai2d_hf_rows as hf_rows
from bench_copies import ai2d_release as release
from hf_rows import sample_view, save_to_disk, write_parquet

from eval.metrics import lmms_choice_filter, lmms_exact_match
from eval.runner import Dist, EvalConfig, run_task
from eval.tasks.base import EvalDataError
from mllm.registry import EVAL_TASKS

# By hand: " B. sun" -> leading "B." -> "B" == "B"; "(B)" has no leading "X." so stays whole, then loses
# its punctuation: "b" == "b"; "The answer is A" stays whole: "the answer is a" != "a". Accuracy 2/3.
ANSWERS = {"sun": " B. sun", "larva": "(B)", "grass": "The answer is A"}


def test_release_parquet_and_saved_copies_give_the_same_samples(tmp_path: Path) -> None:
    want = sample_view(EVAL_TASKS.build("ai2d", release(tmp_path / "rel")))
    assert want[1][1] == ("<image>\nWhat comes after larva?\nA. egg\nB. pupa\nC. adult\n"
                          "Answer with the option's letter from the given choices directly.")
    assert [v[2] for v in want] == ["B", "B", "A"]
    hub = write_parquet(hf_rows(), tmp_path / "hub", "test", shards=2)
    assert sample_view(EVAL_TASKS.build("ai2d", {"data": str(hub)})) == want
    saved = save_to_disk(hf_rows(), tmp_path / "saved")
    assert sample_view(EVAL_TASKS.build("ai2d", {"data": str(saved)})) == want


@pytest.mark.parametrize("layout", ["release", "parquet"])
def test_lmms_eval_scoring_by_hand(layout: str, tmp_path: Path, scripted: Any) -> None:
    cfg = release(tmp_path / "rel") if layout == "release" else {
        "data": str(write_parquet(hf_rows(), tmp_path / "hub", "test"))}
    task = EVAL_TASKS.build("ai2d", cfg)
    m = run_task(scripted(ANSWERS), task, EvalConfig(batch_size=2), tmp_path / "out", dist=Dist(), progress=False)
    assert m["accuracy"] == pytest.approx(2 / 3) and m["n"] == 3


def test_choice_filter_and_match() -> None:
    assert lmms_choice_filter("C. hawk") == "C" and lmms_choice_filter("  D.") == "D"
    assert lmms_choice_filter("c. hawk") == "c. hawk"  # upper-case letters only
    assert lmms_exact_match("B.", "B") == 1.0 and lmms_exact_match("b", "B") == 1.0
    assert lmms_exact_match("B hawk", "B") == 0.0 and lmms_exact_match(" B", "B") == 0.0  # spaces count


def test_bad_rows_name_the_file(tmp_path: Path) -> None:
    cfg = release(tmp_path)
    (tmp_path / "images" / "3.png").unlink()
    with pytest.raises(EvalDataError, match=r"3\.png\.json: image .*images/3\.png not found"):
        list(EVAL_TASKS.build("ai2d", cfg).samples())
    (tmp_path / "ai2d_test_ids.csv").unlink()
    with pytest.raises(EvalDataError, match=r"ai2d_test_ids\.csv: file not found"):
        list(EVAL_TASKS.build("ai2d", cfg).samples())
    rows = [{**r, "answer": "B"} for r in hf_rows()]
    hub = write_parquet(rows, tmp_path / "hub", "test")
    with pytest.raises(EvalDataError, match=r"test row 0: field 'answer' should be an option index"):
        list(EVAL_TASKS.build("ai2d", {"data": str(hub)}).samples())
