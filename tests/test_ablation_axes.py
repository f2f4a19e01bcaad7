"""benchmarks/ablation.py's per-axis relpos split, on a hand-written predictions file."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "ablation.py"


def _ablation() -> ModuleType:  # benchmarks/ is scripts, not a package
    spec = importlib.util.spec_from_file_location("ablation", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_relpos_axes_scores_each_axis_by_reference(tmp_path: Path) -> None:
    items = [
        {"type": "relpos", "reference": "left", "score": 1.0},
        {"type": "relpos", "reference": "right", "score": 0.0},  # x: 1 of 2
        {"type": "relpos", "reference": "above", "score": 1.0},
        {"type": "relpos", "reference": "below", "score": 1.0},
        {"type": "relpos", "reference": "below", "score": 0.0},  # y: 2 of 3
        {"type": "colour", "reference": "red", "score": 0.0},  # not relpos: ignored
        {"type": "count", "reference": "left", "score": 0.0},  # a relpos word, another type: ignored
    ]
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "predictions.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items))
    axes = _ablation().relpos_axes(tmp_path)
    assert axes == {"relpos-x": pytest.approx(0.5), "relpos-y": pytest.approx(2 / 3)}


def test_relpos_axes_leaves_out_an_axis_without_items(tmp_path: Path) -> None:
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "predictions.jsonl").write_text(json.dumps({"type": "relpos", "reference": "above", "score": 0.0}) + "\n")
    assert _ablation().relpos_axes(tmp_path) == {"relpos-y": 0.0}
