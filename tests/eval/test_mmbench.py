"""MMBench (en dev): the release .tsv and the lmms-lab parquet copy give the same samples; VLMEvalKit's
answer matching and CircularEval, computed by hand. The fixture files are
written by tests/exam_copies.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from exam_copies import mmbench_hf_rows, mmbench_release, view
from hf_rows import save_to_disk, write_parquet

from eval.choice import can_infer
from eval.runner import Dist, EvalConfig, run_task
from eval.tasks.base import EvalDataError
from eval.tasks.hub_copies import missing
from mllm.registry import EVAL_TASKS

# By hand (VLMEvalKit can_infer): "A" -> A; "The answer is C." -> C (one letter among the last words);
# "blue" -> the one option quoted, B; question 1 right in all three rotations.
# Question 2: "B" right; "I'm not sure" matches nothing -> unmatched, wrong -> question 2 fails.
ANSWERS = {"A. blue": "A", "A. red": "The answer is C.", "A. green": "blue", "A. cat": "B", "A. dog": "I'm not sure"}


def test_can_infer_vlmevalkit_rules() -> None:
    abcd = {"A": "dog", "B": "cat", "C": "bird", "D": "fish"}
    assert can_infer("(B)", abcd) == "B" and can_infer("the correct answer is **D**", abcd) == "D"
    # A leading article "A" is not option A (a lone letter counts only among the last four words); the
    # option text then decides
    assert can_infer("A cat is sitting on the mat", abcd) == "B"
    assert can_infer("B or C", abcd) is None  # two letters, no option text
    assert can_infer("Sorry, I can't help with images of people yet.", abcd) == "Z"  # refusal: never right
    assert can_infer("Z, or Z", abcd) == "Z"  # the pseudo-option named (however often) and no real one
    assert can_infer("a dog and a cat", abcd) is None  # two options quoted
    assert can_infer("it is a dog " * 9, abcd) is None  # 108 characters > 2 x 14 of option text


def test_empty_cells() -> None:
    # as LLaVA's is_none and pandas read the .tsv: NaN, "", "nan" and "None" are absent options and hints
    cells = (None, float("nan"), "", " nan", "None", "0", "none of these")
    assert [missing(v) for v in cells] == [True, True, True, True, True, False, False]


def test_mmbench_release_and_hub_copies_agree(tmp_path: Path) -> None:
    release = EVAL_TASKS.build("mmbench_en_dev", {"data": str(mmbench_release(tmp_path / "MMBench_DEV_EN.tsv"))})
    expected = view(release)
    assert [e[0] for e in expected] == ["1", "2", "1000001", "1000002", "2000001"]
    second = list(release.samples())[1]
    assert release.build_prompt(second) == ("<image>\nLook closely.\nWhich animal is shown?\nA. cat\nB. dog\n"
                                            "Answer with the option's letter from the given choices directly.")
    assert expected[2][4] == {"choices": {"A": "red", "B": "green", "C": "blue"}, "question": 1, "l2_category": "FP-S"}
    snapshot = tmp_path / "lmms-lab-MMBench" / "en"
    write_parquet(mmbench_hf_rows(), snapshot, "dev")
    write_parquet([{**mmbench_hf_rows()[0], "index": "7"}], snapshot, "test")  # another split: not read
    hub = EVAL_TASKS.build("mmbench_en_dev", {"data": str(snapshot)})
    assert view(hub) == expected
    assert [r["file"] for r in hub.protocol()["dataset_revision"]] == ["dev-00000-of-00001.parquet"]
    saved = save_to_disk(mmbench_hf_rows(), tmp_path / "saved")
    assert view(EVAL_TASKS.build("mmbench_en_dev", {"data": str(saved)})) == expected


def test_mmbench_circular_eval_end_to_end(tmp_path: Path, scripted: Any) -> None:
    task = EVAL_TASKS.build("mmbench_en_dev", {"data": str(mmbench_release(tmp_path / "MMBench_DEV_EN.tsv"))})
    m = run_task(scripted(ANSWERS), task, EvalConfig(batch_size=2), tmp_path / "out", dist=Dist(), progress=False)
    assert m["accuracy"] == 0.5 and m["vanilla_accuracy"] == 1.0 and m["unmatched"] == 1
    assert m["n_questions"] == 2 and m["n"] == 5
    assert m["per_type"] == {"attribute": 1.0, "recognition": 0.0} and m["n_per_type"] == {"attribute": 1, "recognition": 1}
    assert m["per_l2_category"] == {"FP-C": 0.0, "FP-S": 1.0}
    assert m["lmms_eval"] == [{"task": "mmbench_en_dev", "metric": "gpt_eval_score", "value": 50.0}]


def test_mmbench_bad_rows(tmp_path: Path) -> None:
    path = mmbench_release(tmp_path / "MMBench_DEV_EN.tsv")
    with pytest.raises(EvalDataError, match=r"mmbench_en_dev.images: not used \(the images are embedded"):
        EVAL_TASKS.build("mmbench_en_dev", {"data": str(path), "images": "imgs"})
    path.write_text(path.read_text().replace("\t1\tsrc", "\t9\tsrc", 1))  # a copy naming an index that is not there
    with pytest.raises(EvalDataError, match=r"row 2 \(index 1000001\): image '9' is neither base64 data nor the index"):
        list(EVAL_TASKS.build("mmbench_en_dev", {"data": str(path)}).samples())
    rows = mmbench_hf_rows()
    rows[0]["answer"] = "D"  # only three options
    with pytest.raises(EvalDataError, match=r"dev row 0: answer 'D' is not one of the options ABC"):
        list(EVAL_TASKS.build("mmbench_en_dev", {"data": str(write_parquet(rows, tmp_path / "hub", "dev"))}).samples())
