"""SEED-Bench (image questions): the release JSON + image folder and the lmms-lab parquet copy give the
same samples; first-character answers and per-dimension accuracy computed by hand. The fixture files are
written by tests/exam_copies.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from exam_copies import seed_hf_rows, seed_release, view
from hf_rows import save_to_disk, write_parquet

from eval.runner import Dist, EvalConfig, run_task
from eval.tasks.base import EvalDataError
from eval.tasks.seed import seed_choice
from mllm.registry import EVAL_TASKS

# By hand (first character, case ignored): "B" right; " c. Three" -> C right; "The answer is A" -> T wrong.
ANSWERS = {"photo": "B", "towels": " c. Three", "sign": "The answer is A"}


def test_seed_choice() -> None:
    assert [seed_choice(t) for t in ("B", " c. Three", "(A) dog", "", "The answer is A")] == ["B", "C", "(", "", "T"]


def test_seed_release_and_hub_copies_agree(tmp_path: Path) -> None:
    release = EVAL_TASKS.build("seedbench", {"data": str(seed_release(tmp_path / "release"))})
    expected = view(release)
    assert [e[0] for e in expected] == ["101", "102", "103"]  # the video question is left out
    assert release.build_prompt(next(iter(release.samples()))) == (
        "<image>\nWhere is this photo taken?\nA. beach\nB. forest\nC. city\nD. desert\n"
        "Answer with the option's letter from the given choices directly.")
    assert view(EVAL_TASKS.build("seedbench", {"data": str(write_parquet(seed_hf_rows(), tmp_path / "hub", "test"))})) \
        == expected
    assert view(EVAL_TASKS.build("seedbench", {"data": str(save_to_disk(seed_hf_rows(), tmp_path / "saved", ()))})) \
        == expected


def test_seed_accuracy_end_to_end(tmp_path: Path, scripted: Any) -> None:
    task = EVAL_TASKS.build("seedbench", {"data": str(seed_release(tmp_path / "release"))})
    m = run_task(scripted(ANSWERS), task, EvalConfig(batch_size=2), tmp_path / "out", dist=Dist(), progress=False)
    assert m["accuracy"] == pytest.approx(2 / 3) and m["n"] == 3
    assert m["per_type"] == {"Instances Counting": 1.0, "Scene Understanding": 1.0, "Text Understanding": 0.0}
    assert m["lmms_eval"] == [{"task": "seedbench", "metric": "seed_image", "value": pytest.approx(2 / 3)}]


def test_seed_missing_image(tmp_path: Path) -> None:
    path = seed_release(tmp_path / "release")
    (path.parent / "SEED-Bench-image" / "1454427_1.jpg").unlink()
    with pytest.raises(EvalDataError, match=r"questions\[1\]: image .*SEED-Bench-image/1454427_1.jpg not found"):
        list(EVAL_TASKS.build("seedbench", {"data": str(path)}).samples())
