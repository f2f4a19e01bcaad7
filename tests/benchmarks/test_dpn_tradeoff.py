"""``benchmarks/dpn_tradeoff.py``: the default settings, the FLOPs ratio by hand, and a real two-step DPN run whose
routers' own point reproduces the run's final evaluation while pinned points pool as pinned."""

from __future__ import annotations

import json
from pathlib import Path

import dpn_tradeoff
import pytest
from injection_bench import LLMShape

from mllm import run

SMALL = ["train.steps=2", "train.batch_size=4", "train.micro_batch_size=4", "data.test_images=8", "train.log_with=[]"]


@pytest.fixture(scope="module")
def dpn_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dpn") / "dpn"
    run.train("dpn", out, SMALL)
    return out


def test_default_settings_are_the_routers_then_each_expert_from_each_stage_on() -> None:
    assert dpn_tradeoff.default_settings(3, 3) == [
        None, [0, 0, 0], [1, 1, 1], [0, 1, 1], [0, 0, 1], [2, 2, 2], [0, 2, 2], [0, 0, 2]]


def test_flops_ratio_hand_computed() -> None:
    # F(n) = n (8 d^2 + 6 d d_ff) + 4 n^2 d = 80 n + 8 n^2 for d = 2, d_ff = 4: F(1) = 88, F(2) = 192, F(5) = 600
    shape = LLMShape(hidden=2, ffn=4, layers=2, heads=1)
    assert dpn_tradeoff.flops_ratio(shape, 1.0, 4, [4.0, 1.0]) == (600 - 88 + 192 - 88) / (2 * (600 - 88))


def test_points_on_a_trained_run(dpn_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    results = tmp_path / "dpn.md"
    assert dpn_tradeoff.main([str(dpn_run), "--pin", "0,0,0", "--pin", "2,2,2", "--results", str(results)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"Run `{dpn_run}`") and len(out) == 7  # the table and its JSON, no runner tables
    doc = dpn_tradeoff.tradeoff(dpn_run, [None, [0, 0, 0], [2, 2, 2]], None)
    own, full, pooled = doc["points"]
    final = json.loads((dpn_run / "train_summary.json").read_text())["eval"]
    assert (own["vqa"], own["grounding"]) == (final["vqa_accuracy"], final["grounding_accuracy"])
    assert full["tokens_per_layer"] == [16.0] * 4 and full["flops_ratio"] == 1.0
    assert pooled["tokens_per_layer"] == [16.0, 4.0, 1.0, 1.0] and 0 < pooled["flops_ratio"] < 0.5
    assert doc["samples"] == final["n"]
    text = results.read_text()
    assert f"python benchmarks/dpn_tradeoff.py {dpn_run} --pin 0,0,0 --pin 2,2,2 --results {results}" in text
    assert "| 2,2,2 | 16, 4, 1, 1 |" in text


def test_a_pin_outside_the_experts_is_one_line_and_exit_2(dpn_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert dpn_tradeoff.main([str(dpn_run), "--pin", "3,0,0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "dpn_tradeoff.py: error: pyramid.pin: expected 3 expert indices in 0..2, got [3, 0, 0]"


def test_injection_report_routes_where_generate_does(dpn_run: Path) -> None:
    """The report's forward must give the injectors the prompt as query, as training and generate do: DPN routes at
    the last prompt token. Without the answers' labels every token is query and it routed at the answer's end."""
    import injection_report

    from mllm.injection.diagnose import router_report
    from train.data.shapesworld import ShapesWorld

    model, cfg = run.load_run(dpn_run)
    test = ShapesWorld(cfg.data).split("test")
    rows, _ = injection_report.single_question_rows([test[i] for i in range(4)])
    model.generate_ids([r["image"] for r in rows], [r["conversations"][0]["value"] for r in rows], max_new_tokens=1)
    generated = model.injectors[0].last_visual_tokens
    batch = run.make_collator(model, cfg)(rows)
    assert [s.tokens_out for s in router_report(model, batch)] == generated[1:]
    unlabelled = [s.tokens_out for s in router_report(model, {k: v for k, v in batch.items() if k != "labels"})]
    assert unlabelled != generated[1:]  # the old report's routing: the check above can tell them apart
