"""The benchmark scripts' own arithmetic: ablation.py's relpos-axis and count-filter split (hand-written predictions),
paired seed means with their spread (hand-written rows) and tower shares (a closed gate), position_probe.py's ridge R² (hand-computed
cases), injection_report.py's single-question rows and per-type router summary."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _script(name: str) -> ModuleType:  # benchmarks/ is scripts, not a package
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _predictions(tmp_path: Path, items: list[dict[str, object]]) -> Path:
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "predictions.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items))
    return tmp_path


def test_subtype_scores_split_relpos_by_axis_and_count_by_filter(tmp_path: Path) -> None:
    items = [
        {"type": "relpos", "reference": "left", "score": 1.0},
        {"type": "relpos", "reference": "right", "score": 0.0},  # x: 1 of 2
        {"type": "relpos", "reference": "above", "score": 1.0},
        {"type": "relpos", "reference": "below", "score": 1.0},
        {"type": "relpos", "reference": "below", "score": 0.0},  # y: 2 of 3
        {"type": "count", "prompt": "How many objects are there?\n<image>", "reference": "3", "score": 1.0},  # all: 1
        {"type": "count", "prompt": "<image>\nHow many red objects are there?", "reference": "1", "score": 0.0},
        {"type": "count", "prompt": "How many purple objects are there?\n<image>", "reference": "0", "score": 1.0},
        {"type": "count", "prompt": "How many crosses are there?\n<image>", "reference": "2", "score": 0.0},
        {"type": "count", "prompt": "How many squares are there?\n<image>", "reference": "1", "score": 0.0},
        {"type": "count", "prompt": "How many circles are there?\n<image>", "reference": "0", "score": 1.0},  # shape: 1 of 3
        {"type": "colour", "prompt": "What colour is the square?\n<image>", "reference": "red", "score": 0.0},
    ]
    scores = _script("ablation").subtype_scores(_predictions(tmp_path, items))
    assert scores == {"relpos-x": pytest.approx(0.5), "relpos-y": pytest.approx(2 / 3), "count-all": 1.0,
                      "count-colour": pytest.approx(0.5), "count-shape": pytest.approx(1 / 3)}


def test_subtype_scores_leave_out_a_subtype_without_items(tmp_path: Path) -> None:
    items = [{"type": "relpos", "reference": "above", "score": 0.0}]
    assert _script("ablation").subtype_scores(_predictions(tmp_path, items)) == {"relpos-y": 0.0}


def _run(recipe: str, seed: int, vqa: float, tiny: float | None) -> dict[str, object]:
    return {"recipe": recipe, "seed": seed, "vqa": vqa, "grounding": 1.0, "per_type": {"relpos": vqa},
            "vs_tiny": None if tiny is None else vqa - tiny, "s_per_step": 0.1 + seed, "visual_tokens_per_layer": 16.0}


def test_seed_means_set_each_recipe_against_tiny_on_its_own_seeds() -> None:
    tiny = {0: 0.9, 1: 0.8, 2: 0.7}
    rows = [_run("tiny", s, v, v) for s, v in tiny.items()]
    rows += [_run("comm", 0, 0.85, tiny[0])]  # one seed: -5 points against tiny's seed 0, not its mean 0.8
    rows += [_run("ftz", 1, 0.9, tiny[1]), _run("ftz", 2, 0.6, tiny[2])]  # +10 and -10: mean 0
    rows += [_run("solo", 3, 0.5, None)]  # a folder without tiny
    ablation = _script("ablation")
    means = {m["recipe"]: m for m in ablation.seed_means(rows)}
    assert means["tiny"]["vqa"] == pytest.approx(0.8) and means["tiny"]["vs_tiny"] == pytest.approx(0.0)
    assert means["tiny"]["vqa_sd"] == pytest.approx(0.1)  # sqrt((0.1² + 0² + 0.1²) / 2)
    assert means["comm"]["vs_tiny"] == pytest.approx(-0.05) and means["comm"]["seeds"] == [0]
    assert means["ftz"]["vqa"] == pytest.approx(0.75) and means["ftz"]["vs_tiny"] == pytest.approx(0.0)
    assert means["ftz"]["vqa_sd"] == pytest.approx(0.3 / 2**0.5) and means["ftz"]["grounding_sd"] == 0.0
    assert means["ftz"]["per_type"] == {"relpos": pytest.approx(0.75)}
    assert means["ftz"]["s_per_step"] == pytest.approx(1.6)  # seeds 1, 2: 1.1 and 2.1
    assert means["solo"]["vs_tiny"] is None
    lines = ablation.means_table(list(means.values()))
    assert "| comm | 0 | 0.850 | -5.0 | 1.000 | 0.100 | 16.0 | 0.85 |" in lines  # one seed: the mean, no spread
    assert "| ftz | 1, 2 | 0.750 ± 0.212 | +0.0 | 1.000 ± 0.000 | 1.600 | 16.0 | 0.75 |" in lines


def test_ridge_r2_is_one_for_an_exact_line_and_matches_a_hand_computed_miss() -> None:
    r2 = _script("position_probe").ridge_r2
    x = torch.tensor([[0.0], [1.0], [2.0], [3.0], [4.0]], dtype=torch.float64)
    assert r2(x, 2 * x[:, 0] + 1, fit=3, lam=0.0) == pytest.approx(1.0)
    # fit on x = 0, 1 with y = 0, 1 (w = 1, b = 0); held out x = 2, 3 with y = 3, 2: predictions 2, 3,
    # squared errors 1, 1, variance of (3, 2) = 0.25, so R² = 1 - 1 / 0.25 = -3
    x4, y4 = x[:4], torch.tensor([0.0, 1.0, 3.0, 2.0], dtype=torch.float64)
    assert r2(x4, y4, fit=2, lam=0.0) == pytest.approx(-3.0)


def test_tower_shares_are_zero_behind_a_closed_gate_and_the_mean_ablation_of_the_open_one(tmp_path: Path) -> None:
    from mllm import run
    from mllm.config import load_config
    from mllm.model import MLLM
    from train.data.shapesworld import ShapesWorld

    cfg = load_config("ftz", ["model.llm.arch.num_hidden_layers=1", "model.encoder.fusion.gate=true"])
    torch.manual_seed(0)
    model = run.build_model(cfg, run.build_tokenizer_for(cfg)).eval()  # gated FtZ at init: gate 0, so F = A (tower 0)
    model.save_pretrained(tmp_path / "model")  # the table reads the saved model, as here
    shares = _script("ablation").tower_shares(MLLM.from_pretrained(tmp_path / "model").eval(), cfg)
    test = ShapesWorld(cfg.data).split("test")
    pixels = torch.stack([model.preprocess(test[i]["image"])[:3] for i in range(64)])
    with torch.no_grad():
        tower = model.encoder.towers[0]
        anchor = tower(pixels)[tower.layers[-1]]
    expected = float((anchor - anchor.mean(dim=(0, 1))).norm() / anchor.norm())
    assert shares is not None and shares[1] == 0.0
    assert shares[0] == pytest.approx(expected, rel=1e-4) and shares[0] > 0.1


def test_injection_report_rows_follow_the_first_turns_layout_and_group_the_router_by_question_type(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    report = _script("injection_report")
    scene = {"id": "s", "image": "IMG", "objects": [], "items": [{"type": "colour", "question": "Q1?", "answer": "red"},
                                                                {"type": "count", "question": "Q2?", "answer": "2"}]}
    first = [{**scene, "conversations": [{"from": "human", "value": "Q1?\n<image>"}]},
             {**scene, "id": "t", "conversations": [{"from": "human", "value": "<image>\nQ1?"}]}]
    rows, types = report.single_question_rows(first)
    assert types == ["colour", "count", "colour", "count"]
    assert [r["conversations"][0]["value"] for r in rows] == ["Q1?\n<image>", "Q2?\n<image>", "<image>\nQ1?", "<image>\nQ2?"]
    assert [r["conversations"][1]["value"] for r in rows] == ["red", "2", "red", "2"] and rows[3]["id"] == "t-1"
    from mllm.injection.diagnose import RouterStageReport

    stage = RouterStageReport(layer=0, probs=[[0.5, 0.2, 0.3], [0.1, 0.1, 0.8], [0.2, 0.6, 0.2], [0.3, 0.3, 0.4]],
                              tokens_in=[16, 16, 16, 2], tokens_out=[16, 4, 8, 2], skip_below=4)
    monkeypatch.setattr(report, "router_report", lambda _model, _batch: [stage])
    out = report.router_rows(None, {}, types)
    colour, count = out  # rows 0, 2 are colour questions; rows 1, 3 count (row 3 too few tokens: not pooled)
    assert colour["type"] == "colour" and colour["mean_p"] == pytest.approx([0.35, 0.4, 0.25])
    assert colour["chosen"] == [0.5, 0.5, 0.0] and colour["tokens_out"] == 12 and colour["scale"] == pytest.approx(0.55)
    assert count["chosen"] == [0.0, 0.0, 1.0] and count["tokens_out"] == 3 and count["scale"] == pytest.approx(0.8)


def test_linear_probe_reads_a_label_only_where_the_features_hold_it() -> None:
    from mllm.injection.diagnose import linear_probe

    g = torch.Generator().manual_seed(0)
    labels = torch.arange(400) % 4
    noise = torch.randn(400, 8, generator=g)
    held = torch.cat([noise, 3.0 * torch.nn.functional.one_hot(labels).float()], dim=1)  # the label, one-hot
    assert linear_probe(held, labels, split=300) == 1.0
    assert linear_probe(noise, labels, split=300) < 0.45  # nothing to read: near the 0.25 of four classes
    with pytest.raises(ValueError, match="split 400 leaves no fit/score rows among 400"):
        linear_probe(noise, labels, split=400)


def test_answer_probe_keeps_each_questions_last_prompt_token() -> None:
    from mllm import run
    from mllm.config import load_config
    from train.data.shapesworld import ShapesWorld

    probe = _script("answer_probe")
    cfg = load_config("tiny", ["model.encoder.depth=1", "model.llm.arch.num_hidden_layers=2"])
    torch.manual_seed(0)
    model = run.build_model(cfg, run.build_tokenizer_for(cfg)).eval()
    data = ShapesWorld(cfg.data).split("test")
    items = [(data[i]["image"], it["question"], it["answer"]) for i in range(2) for it in data[i]["items"][:3]]
    assert len({len(q) for _, q, _ in items}) > 1  # prompts of several lengths: batched apart, order kept
    states = probe.last_token_states(model, items, batch_size=2)
    assert states.shape == (len(items), 3, model.llm.config.hidden_size)
    from train.templates import encode_prompt

    for k in (0, len(items) - 1):  # one item alone, as generate would prefill it
        image, question, _ = items[k]
        ids = torch.tensor([encode_prompt(model.tokenizer, question, model.template, model.cfg.image_token,
                                          model.num_image_tokens, model.cfg.image_first)])
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=torch.ones_like(ids),
                        pixel_values=model.preprocess(image)[None], output_hidden_states=True)
        torch.testing.assert_close(states[k], torch.stack([h[0, -1] for h in out.hidden_states]))
