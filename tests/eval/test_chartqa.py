"""ChartQA test: release JSONs and lmms-lab parquet give the same samples; relaxed accuracy by hand."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from bench_copies import chartqa_hf_rows as hf_rows
from bench_copies import chartqa_release as release
from hf_rows import sample_view, save_to_disk, write_parquet

from eval.runner import Dist, EvalConfig, run_task
from eval.tasks.base import EvalDataError
from mllm.registry import EVAL_TASKS

# By hand (eval.doc_metrics.relaxed_accuracy): "12.5" vs 12: 0.5/12 = 4.2% <= 5% right; "japan" right
# (case); "5%" = 0.05 vs 5 wrong. "47.5" vs 45: 2.5/45 = 5.6% wrong; "0.0" vs "0": the target is 0,
# so strings compare: wrong. Human 2/3, augmented 0: accuracy (2/3 + 0) / 2 = 1/3; overall 2/5.
ANSWERS = {"How many bars": "12.5", "Which country": "japan", "difference": "5%", "value in 2010": "47.5",
           "share of X": "0.0"}


def test_release_parquet_and_saved_copies_give_the_same_samples(tmp_path: Path) -> None:
    want = sample_view(EVAL_TASKS.build("chartqa", release(tmp_path / "rel")))
    assert [(v[0], v[3]) for v in want] == [("0", "human_test"), ("1", "human_test"), ("2", "human_test"),
                                            ("3", "augmented_test"), ("4", "augmented_test")]
    assert want[0][1] == "<image>\nHow many bars are there?\nAnswer the question with a single word."
    hub = write_parquet(hf_rows(), tmp_path / "hub", "test", shards=2)
    assert sample_view(EVAL_TASKS.build("chartqa", {"data": str(hub)})) == want
    saved = save_to_disk(hf_rows(), tmp_path / "saved")
    assert sample_view(EVAL_TASKS.build("chartqa", {"data": str(saved)})) == want


@pytest.mark.parametrize("layout", ["release", "parquet"])
def test_relaxed_accuracy_per_split_and_averaged(layout: str, tmp_path: Path, scripted: Any) -> None:
    cfg = release(tmp_path / "rel") if layout == "release" else {
        "data": str(write_parquet(hf_rows(), tmp_path / "hub", "test"))}
    task = EVAL_TASKS.build("chartqa", cfg)
    m = run_task(scripted(ANSWERS), task, EvalConfig(batch_size=2), tmp_path / "out", dist=Dist(), progress=False)
    assert m["per_type"] == {"augmented_test": 0.0, "human_test": pytest.approx(2 / 3)}
    assert m["accuracy"] == pytest.approx(1 / 3) and m["relaxed_overall"] == pytest.approx(0.4) and m["n"] == 5


def test_bad_rows_name_the_file(tmp_path: Path) -> None:
    cfg = release(tmp_path)
    (tmp_path / "png" / "d.png").unlink()
    with pytest.raises(EvalDataError, match=r"test_augmented\.json: \[0\]: image .*d\.png not found"):
        list(EVAL_TASKS.build("chartqa", cfg).samples())
    rows = hf_rows()
    rows[1]["type"] = "val"
    hub = write_parquet(rows, tmp_path / "hub", "test")
    with pytest.raises(EvalDataError, match=r"test row 1: field 'type' should be one of"):
        list(EVAL_TASKS.build("chartqa", {"data": str(hub)}).samples())
