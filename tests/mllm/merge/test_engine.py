"""End-to-end merges on tiny Llama checkpoints: mergekit parity, invariants, atomicity, loading."""

from __future__ import annotations

import gc
import hashlib
import json
import sys
from pathlib import Path

import pytest
import torch

from mllm.merge import MergeError, run_merge
from mllm.merge.engine import RECIPE_FILE
from mllm.merge.methods.ties import Ties
from mllm.merge.tensors import INDEX_FILE

PARITY = {
    "linear": {"models": [("a", {"weight": 0.7}), ("b", {"weight": 0.2})], "parameters": {}},
    "task_arithmetic": {"models": [("a", {"weight": 0.7}), ("b", {"weight": 0.5})], "parameters": {"lambda": 0.8}},
    "ties": {"models": [("a", {"weight": 0.7, "density": 0.4}), ("b", {"weight": 0.5, "density": 0.6})],
             "parameters": {"normalize": True, "int8_mask": True}},
}


def _config(llamas, method: str, models, parameters, **extra) -> dict:
    base = {} if method in ("linear", "layer_swap") else {"base_model": str(llamas["base"])}
    return {
        "merge_method": method, **base,
        "models": [{"model": str(llamas[k]), "parameters": p} for k, p in models],
        "parameters": parameters, "dtype": "float32", **extra,
    }


def _mergekit(cfg: dict, out: Path) -> Path:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge as mergekit_merge
    from mergekit.options import MergeOptions

    mergekit_merge(MergeConfiguration.model_validate(cfg), str(out),
                   options=MergeOptions(copy_tokenizer=False, quiet=True, write_model_card=False))
    return out


@pytest.mark.parametrize("method", sorted(PARITY))
def test_numerical_parity_with_mergekit(tmp_path: Path, ckpt, llamas, method: str) -> None:
    cfg = _config(llamas, method, **PARITY[method])
    ours = run_merge(ckpt.write_yaml(tmp_path / "m.yaml", cfg), tmp_path / "ours")
    a, b = ckpt.state_of(ours), ckpt.state_of(_mergekit(cfg, tmp_path / "mk"))
    assert sorted(a) == sorted(b)
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-6, rtol=0), name
    base = ckpt.state_of(llamas["base"])
    assert any(not torch.equal(a[n], base[n]) for n in a)  # the merge did something


def test_ties_on_bf16_models_differs_from_mergekit_in_fp32_only_by_its_tie_rule(tmp_path: Path, ckpt, bf16_llamas,
                                                                               monkeypatch) -> None:
    """bf16 inputs, computed in fp32 by both (mergekit's ``dtype`` is its compute dtype, ``out_dtype`` the
    output's): the outputs differ only where some model's |tau| ties with its trim threshold -- mergekit's
    argsort keeps an arbitrary k of those entries, we keep them all -- and with our rule patched into
    mergekit they are bit-identical. (With ``dtype: bfloat16`` mergekit also rounds tau to bf16: see
    test_methods.py.)"""
    from mergekit import sparsify

    from mllm.merge.methods.task_arithmetic import magnitude_threshold

    cfg = _config(bf16_llamas, "ties", **PARITY["ties"], out_dtype="bfloat16")
    ours = ckpt.state_of(run_merge(ckpt.write_yaml(tmp_path / "m.yaml", cfg), tmp_path / "ours"))
    mk = ckpt.state_of(_mergekit(cfg, tmp_path / "mk"))
    inputs = {k: ckpt.state_of(path) for k, path in bf16_llamas.items()}
    density = {k: p["density"] for k, p in PARITY["ties"]["models"]}
    differing = 0
    for name, out in ours.items():
        tied = torch.zeros(out.shape, dtype=torch.bool)
        for k, d in density.items():
            tau = inputs[k][name].float() - inputs["base"][name].float()
            tied |= tau.abs() == magnitude_threshold(tau, d)
        differ = out != mk[name]
        assert out.dtype == torch.bfloat16 and not (differ & ~tied).any(), name
        differing += int(differ.sum())
    assert differing > 0  # bf16 deltas are coarse: ties at the threshold are common

    def keep_ties(tensor: torch.Tensor, density: float, rescale_norm: object = None) -> torch.Tensor:
        assert rescale_norm is None and 0 < density < 1
        return tensor * (tensor.abs() >= magnitude_threshold(tensor, density))

    monkeypatch.setattr(sparsify, "magnitude", keep_ties)
    mk = ckpt.state_of(_mergekit(cfg, tmp_path / "mk_keep_ties"))
    for name, out in ours.items():
        assert torch.equal(out, mk[name]), name


def test_output_loads_with_transformers_and_has_every_tensor(tmp_path: Path, ckpt, llamas) -> None:
    from transformers import AutoModelForCausalLM

    cfg = _config(llamas, "ties", **PARITY["ties"])
    cfg.update(dtype="bfloat16", shard_size="20KB")
    out = run_merge(ckpt.write_yaml(tmp_path / "m.yaml", cfg), tmp_path / "out")
    index = json.loads((out / INDEX_FILE).read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert "merge_method: ties" in (out / RECIPE_FILE).read_text() and "ties" in (out / "README.md").read_text()
    merged, base = ckpt.state_of(out), ckpt.state_of(llamas["base"])
    assert sorted(merged) == sorted(base)
    assert all(t.dtype == torch.bfloat16 and torch.isfinite(t).all() for t in merged.values())
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16
    for name, p in model.state_dict().items():
        assert torch.equal(p, merged[name]), name
    assert torch.isfinite(model(torch.tensor([[1, 5, 7]])).logits.float()).all()


@pytest.mark.parametrize(("method", "models", "parameters"), [
    ("linear", [("a", {"weight": 1.0}), ("c", {"weight": 2.0})], {}),
    ("task_arithmetic", [("c", {"weight": 0.3}), ("c2", {"weight": 0.9})], {}),
    ("ties", [("c", {"weight": 0.5, "density": 0.3}), ("c2", {"weight": 0.5})], {}),
    ("dare_ties", [("c", {"weight": 0.5, "density": 0.3}), ("c2", {"weight": 0.5})], {}),
    ("lines", [("c", {}), ("c2", {})], {"alpha": 0.3, "beta": 0.5}),
    ("widen", [("c", {}), ("c2", {})], {}),
    ("layer_swap", [("c", {"swap": True}), ("c2", {})], {"bottom": 1, "top": 1, "transition": 1}),
])
def test_identical_inputs_give_identical_output(tmp_path: Path, ckpt, llamas, method, models, parameters) -> None:
    """Merging copies of the base (c, c2) gives the base back (linear: the weighted mean with a)."""
    import shutil

    c2 = tmp_path / "c2"
    shutil.copytree(llamas["c"], c2)
    ids = {**llamas, "c2": c2}
    cfg = _config(ids, method, models, parameters)
    out = run_merge(ckpt.write_yaml(tmp_path / "m.yaml", cfg), tmp_path / "out")
    merged, base = ckpt.state_of(out), ckpt.state_of(llamas["base"])
    assert sorted(merged) == sorted(base)
    if method == "linear":  # (a + 2 base) / 3
        a = ckpt.state_of(llamas["a"])
        want = {n: (a[n] + 2 * base[n]) / 3 for n in base}
        assert all(torch.allclose(merged[n], want[n], atol=1e-6) for n in base)
    else:
        assert all(torch.allclose(merged[n], base[n], atol=1e-6) for n in base), method


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties", "widen", "lines"])
def test_merges_are_reproducible_complete_and_finite(tmp_path: Path, ckpt, llamas, method: str) -> None:
    params = {"alpha": 0.5, "beta": 0.5} if method == "lines" else {}
    per_model = {"weight": 0.5, "density": 0.5} if method.startswith("dare") else {}
    cfg = _config(llamas, method, [("a", per_model), ("b", per_model)], params, seed=3)
    path = ckpt.write_yaml(tmp_path / "m.yaml", cfg)
    digests = []
    for out in ("x", "y"):
        run_merge(path, tmp_path / out)
        digests.append(hashlib.sha256((tmp_path / out / "model.safetensors").read_bytes()).hexdigest())
    assert digests[0] == digests[1]
    merged = ckpt.state_of(tmp_path / "x")
    assert len(merged) == len(ckpt.state_of(llamas["base"])) and all(torch.isfinite(t).all() for t in merged.values())


def test_include_limits_merging_to_decoder_layers(tmp_path: Path, ckpt, llamas) -> None:
    cfg = _config(llamas, "task_arithmetic", [("a", {"weight": 1.0})], {}, include=[r"^model\.layers\."])
    out = run_merge(ckpt.write_yaml(tmp_path / "m.yaml", cfg), tmp_path / "out")
    merged, base, a = ckpt.state_of(out), ckpt.state_of(llamas["base"]), ckpt.state_of(llamas["a"])
    for n in base:
        want = a[n] if n.startswith("model.layers.") else base[n]
        assert torch.allclose(merged[n], want, atol=1e-6), n


def test_failure_midway_leaves_no_output(tmp_path: Path, ckpt, llamas, monkeypatch) -> None:
    calls = []

    def failing(tensors, base, params, info):
        calls.append(info.name)
        if len(calls) == 5:
            raise RuntimeError("injected failure")
        return base

    monkeypatch.setattr(Ties, "merge", staticmethod(failing))
    cfg = _config(llamas, "ties", **PARITY["ties"])
    cfg["shard_size"] = "10KB"  # several shards are already on disk when it fails
    with pytest.raises(RuntimeError, match="injected"):
        run_merge(ckpt.write_yaml(tmp_path / "m.yaml", cfg), tmp_path / "out")
    assert len(calls) == 5 and sorted(p.name for p in tmp_path.iterdir()) == ["m.yaml"]


def test_non_finite_result_is_refused(tmp_path: Path, ckpt, llamas, monkeypatch) -> None:
    monkeypatch.setattr(Ties, "merge", staticmethod(lambda tensors, base, params, info: base / 0.0))
    cfg = _config(llamas, "ties", **PARITY["ties"])
    with pytest.raises(MergeError, match="non-finite values in tensor"):
        run_merge(ckpt.write_yaml(tmp_path / "m.yaml", cfg), tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("method", ["ties", "dare_ties", "task_arithmetic", "lines"])
def test_block_wise_merging_equals_whole_tensor_merging(tmp_path: Path, ckpt, llamas, monkeypatch, method) -> None:
    from mllm.merge import engine
    from mllm.merge.methods import task_arithmetic

    per_model = {"weight": 0.6, "density": 0.3}
    params = {"alpha": 0.2, "beta": 0.7, "sparsifier": "magnitude", "consensus": True} if method == "lines" else {}
    cfg = _config(llamas, method, [("a", per_model), ("b", per_model)], params)
    path = ckpt.write_yaml(tmp_path / "m.yaml", cfg)
    whole = ckpt.state_of(run_merge(path, tmp_path / "whole"))
    monkeypatch.setattr(engine, "BLOCK_ELEMS", 100)  # the 48 x 16 embedding -> 8 blocks of 6 rows
    monkeypatch.setattr(task_arithmetic, "RNG_BLOCK", 160)  # DARE draw blocks straddle row blocks
    blocked = ckpt.state_of(run_merge(path, tmp_path / "blocked"))
    monkeypatch.setattr(engine, "BLOCK_ELEMS", 1 << 23)
    whole_small_rng = ckpt.state_of(run_merge(path, tmp_path / "whole2"))
    for n in whole:
        assert torch.equal(blocked[n], whole_small_rng[n]), n
        if method != "dare_ties":  # DARE's draws depend on RNG_BLOCK, nothing else does
            assert torch.equal(blocked[n], whole[n]), n


def test_uniform_draws_depend_only_on_seed_and_index(monkeypatch) -> None:
    from mllm.merge.methods import task_arithmetic

    monkeypatch.setattr(task_arithmetic, "RNG_BLOCK", 64)
    full = task_arithmetic.uniform(5, 0, 1000)
    parts = torch.cat([task_arithmetic.uniform(5, a, b - a) for a, b in [(0, 7), (7, 300), (300, 1000)]])
    assert torch.equal(full, parts) and 0.0 <= full.min() and full.max() < 1.0
    assert not torch.equal(full, task_arithmetic.uniform(6, 0, 1000))


def test_an_error_in_the_loop_is_the_last_line_printed(tmp_path: Path, ckpt, llamas, monkeypatch, capsys) -> None:
    def failing(tensors, base, params, info):
        raise MergeError(f"m.yaml: tensor {info.name!r}: bad")

    monkeypatch.setattr(Ties, "merge", staticmethod(failing))
    config = ckpt.write_yaml(tmp_path / "m.yaml", _config(llamas, "ties", **PARITY["ties"]))
    try:
        run_merge(config, tmp_path / "out", progress=True)
    except MergeError as err:  # what the command line does with a user error
        print(f"mllm merge: error: {err}", file=sys.stderr)
    gc.collect()  # an unclosed bar would redraw here, after the error
    lines = [line for line in capsys.readouterr().err.replace("\r", "\n").splitlines() if line.strip()]
    assert lines[-1].startswith("mllm merge: error: m.yaml: tensor ") and lines[-1].endswith(": bad")
