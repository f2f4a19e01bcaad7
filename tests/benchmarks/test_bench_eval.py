"""benchmarks/bench_eval.py: the last line's JSON (ratio, identical predictions, the multi-task suite) on the
tiny random model, and the suite's check of identical predictions across batch sizes failing when they differ."""

from __future__ import annotations

import json
import sys
from typing import Any

import bench_eval  # benchmarks/ (tests/benchmarks/conftest.py)
import pytest

from mllm.config import load_config


def test_last_line_reports_ratio_and_the_suite(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(sys, "argv", ["bench_eval.py", "--samples", "4", "--batch-size", "2", "--max-new-tokens", "2"])
    bench_eval.main()
    out = capsys.readouterr().out.strip().splitlines()
    last = json.loads(out[-1])
    assert last["identical"] is True and last["ratio"] > 0 and (last["samples"], last["batch_size"]) == (4, 2)
    assert list(last["suite"]) == list(bench_eval.SUITE)
    for name, row in last["suite"].items():
        assert row["n"] == 4 and row["identical"] is True and set(row["samples_per_s"]) == {"1", "2"}
        assert any(line.startswith(f"  {name}") for line in out)


class BatchSized:
    """Answers every prompt with the size of its batch: predictions that change with the batch size."""

    def __init__(self) -> None:
        self.batches: list[int] = []

    def generate(self, images: list[Any], prompts: list[str], **kw: Any) -> list[str]:
        self.batches.append(len(prompts))
        return [str(len(prompts))] * len(prompts)


def test_suite_flags_predictions_that_change_with_the_batch_size() -> None:
    model = BatchSized()
    suite = bench_eval.suite_runs(model, load_config("tiny"), (1, 3), samples=3, max_new_tokens=2)
    assert {name: row["identical"] for name, row in suite.items()} == dict.fromkeys(bench_eval.SUITE, False)
    assert [row["n"] for row in suite.values()] == [3, 3, 3]
    assert sum(model.batches) == 2 * 9  # each task's 3 samples at both batch sizes
