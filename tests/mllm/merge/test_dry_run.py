"""``mllm merge --dry-run``: the plan per output tensor, from headers only, and nothing written."""

from __future__ import annotations

from pathlib import Path

import pytest

from mllm.cli import main
from mllm.merge.tensors import ModelReader


def test_dry_run_prints_sources_method_and_resolved_parameters(tmp_path: Path, ckpt, llamas, capsys,
                                                               monkeypatch) -> None:
    base, a, b = (str(llamas[k]) for k in ("base", "a", "b"))
    cfg = {
        "merge_method": "ties", "base_model": base, "dtype": "float32",
        "slices": [{"sources": [
            {"model": base, "layer_range": [0, 3]},
            {"model": a, "layer_range": [0, 3], "parameters": {
                "weight": [0.2, 1.0], "density": [{"filter": "mlp", "value": [0.2, 0.6]}, {"value": 0.5}]}},
            {"model": b, "layer_range": [1, 4], "parameters": {"weight": 0.5}}]}],
        "parameters": {"normalize": True},
    }
    path = ckpt.write_yaml(tmp_path / "m.yaml", cfg)

    def no_reading(*args, **kwargs):
        raise AssertionError("a dry run reads no weights")

    monkeypatch.setattr(ModelReader, "get", no_reading)
    assert main(["merge", str(path), "--out", str(tmp_path / "out"), "--dry-run"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.yaml"]
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == (f"# {path}: ties, 30 tensors (30 merged, 0 copied), 3 decoder layers, reference {base}")
    by_name = {line.split(" ")[0]: line for line in lines[1:]}
    assert len(by_name) == 30 and list(by_name)[0] == "model.embed_tokens.weight"  # embeddings first, as mergekit
    up = by_name["model.layers.1.mlp.up_proj.weight"]  # t = 1/2 in a 3-layer slice; b's layer 2
    assert up.startswith(f"model.layers.1.mlp.up_proj.weight [32, 16] float32 <- ties t=0.5 "
                         f"[{a}:model.layers.1.mlp.up_proj.weight, {b}:model.layers.2.mlp.up_proj.weight; "
                         f"base {base}:model.layers.1.mlp.up_proj.weight] ")
    assert f"weight: {{{a}: 0.6, {b}: 0.5}}, density: {{{a}: 0.4, {b}: 1}}, normalize: true" in up
    q = by_name["model.layers.2.self_attn.q_proj.weight"]  # t = 1, no filter matches: the fallback entry
    assert f"weight: {{{a}: 1, {b}: 0.5}}, density: {{{a}: 0.5, {b}: 1}}" in q
    norm = by_name["model.norm.weight"]  # outside the layers: t = 0
    assert " t=0 " in norm and f"weight: {{{a}: 0.2, {b}: 0.5}}" in norm


def test_dry_run_reports_bad_input_like_a_merge(tmp_path: Path, ckpt, llamas, capsys) -> None:
    cfg = {"merge_method": "passthrough", "slices": [{"sources": [{"model": str(llamas["a"]), "layer_range": [0, 9]}]}]}
    path = ckpt.write_yaml(tmp_path / "m.yaml", cfg)
    assert main(["merge", str(path), "--out", str(tmp_path / "out"), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"mllm merge: error: {path}: slices[0].sources[0].layer_range: [0, 9] goes past the 4 "
                       f"decoder layers of {str(llamas['a'])!r}")


@pytest.mark.parametrize("flag", [[], ["--overwrite"]])
def test_dry_run_ignores_an_existing_output_folder(tmp_path: Path, ckpt, llamas, capsys, flag) -> None:
    (tmp_path / "out").mkdir()
    cfg = {"merge_method": "linear", "models": [{"model": str(llamas["a"]), "parameters": {"weight": 1.0}}]}
    path = ckpt.write_yaml(tmp_path / "m.yaml", cfg)
    assert main(["merge", str(path), "--out", str(tmp_path / "out"), "--dry-run", *flag]) == 0
    assert list((tmp_path / "out").iterdir()) == []
    assert "<- linear t=" in capsys.readouterr().out
