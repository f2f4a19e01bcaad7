"""The interpolation merge methods against mergekit on the same YAML (tiny fp32 Llama checkpoints from
conftest): every output tensor within 1e-5 of mergekit's, relative to the tensor's largest entry, and
the same when the engine streams small row blocks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mllm.merge import run_merge

MAX_REL_ERR = 1e-5
SELF_ATTN_T = [{"filter": "self_attn", "value": 0.2}, {"filter": "mlp", "value": 0.8}, {"value": 0.5}]
SLERP_GRADIENT_T = [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                    {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]}, {"value": 0.5}]

# method -> (models listed, base listed as base_model?, shared parameters); models: (conftest key, parameters)
PARITY = {  # "method" or "method:variant"
    "slerp": ([("base", {}), ("a", {})], True, {"t": 0.3}),
    "slerp:filtered_t": ([("base", {}), ("a", {})], True, {"t": SELF_ATTN_T}),
    "nuslerp": ([("a", {"weight": 0.3}), ("b", {"weight": 0.7})], True, {}),
    "nuslerp:no_base": ([("a", {"weight": 0.6}), ("b", {"weight": 0.2})], False, {}),
    "nuslerp:row_wise": ([("a", {"weight": 0.3}), ("b", {"weight": 0.7})], True,
                         {"nuslerp_flatten": False, "nuslerp_row_wise": True}),
    "nuslerp:rows_no_base": ([("a", {"weight": 1.0}), ("b", {"weight": 3.0})], False, {"nuslerp_flatten": False}),
    "multislerp": ([("a", {"weight": 0.3}), ("b", {"weight": 0.9})], True, {}),
    "multislerp:base_listed": ([("base", {"weight": 9.0}), ("a", {"weight": 0.3}), ("b", {"weight": 0.9})], True, {}),
    "multislerp:no_base_three": ([("a", {"weight": 0.5}), ("b", {"weight": 0.3}), ("c", {"weight": 0.2})], False,
                                 {"normalize_weights": False}),
    "karcher": ([("a", {}), ("b", {})], True, {}),
    "karcher:base_listed": ([("base", {}), ("a", {}), ("b", {})], True, {}),
    "karcher:no_base": ([("a", {}), ("b", {}), ("c", {})], False, {"max_iter": 3}),
    "model_stock": ([("base", {}), ("a", {}), ("b", {})], True, {}),
    "model_stock:filter_wise": ([("a", {}), ("b", {})], True, {"filter_wise": True}),
    "nearswap": ([("base", {}), ("a", {})], True, {"t": 0.03}),
    "nearswap:filtered_t": ([("a", {})], True, {"t": [{"filter": "mlp", "value": 0.1}, {"value": 0.01}]}),
    "arcee_fusion": ([("base", {}), ("a", {})], True, {}),
    # linear has no base role in mergekit: a base_model not listed joins the models, weighted by the top level
    "linear:base_joins": ([("a", {"weight": 0.7}), ("b", {"weight": 0.5})], True, {"weight": 0.3}),
    "linear:base_joins_unnormalized": ([("a", {"weight": 0.7}), ("b", {})], True, {"weight": 0.2, "normalize": False}),
    "linear:base_listed": ([("base", {"weight": 2.0}), ("a", {"weight": 1.0})], True, {"weight": 5.0}),
    # layer gradients (mergekit interpolates the list over the decoder layers), as in mergekit's slerp example
    "slerp:gradient_t": ([("base", {}), ("a", {})], True, {"t": SLERP_GRADIENT_T}),
    "nuslerp:gradient_weight": ([("a", {"weight": [0.2, 0.9]}), ("b", {"weight": 0.5})], True, {}),
    "nearswap:gradient_t": ([("base", {}), ("a", {})], True, {"t": [0.001, 0.1]}),
}


def _config(llamas, method: str, models, with_base: bool, parameters, **extra) -> dict:
    base = {"base_model": str(llamas["base"])} if with_base else {}
    return {
        "merge_method": method, **base,
        "models": [{"model": str(llamas[k]), **({"parameters": p} if p else {})} for k, p in models],
        "parameters": parameters, "dtype": "float32", **extra,
    }


def _mergekit(cfg: dict, out: Path) -> Path:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge as mergekit_merge
    from mergekit.options import MergeOptions

    mergekit_merge(MergeConfiguration.model_validate(cfg), str(out),
                   options=MergeOptions(copy_tokenizer=False, quiet=True, write_model_card=False))
    return out


def relative_errors(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> dict[str, float]:
    """max |ours - theirs| / max |theirs| per tensor."""
    assert sorted(ours) == sorted(theirs)
    return {n: float((ours[n] - theirs[n]).abs().max() / theirs[n].abs().max().clamp_min(1e-30)) for n in ours}


def _case(case: str) -> str:
    return case.split(":")[0]


@pytest.mark.parametrize("case", sorted(PARITY))
def test_interpolation_methods_equal_mergekit(tmp_path: Path, ckpt, llamas, case: str) -> None:
    models, with_base, parameters = PARITY[case]
    cfg = _config(llamas, _case(case), models, with_base, parameters)
    ours = ckpt.state_of(run_merge(ckpt.write_yaml(tmp_path / "m.yaml", cfg), tmp_path / "ours"))
    theirs = ckpt.state_of(_mergekit(cfg, tmp_path / "mk"))
    errors = relative_errors(ours, theirs)
    worst = max(errors, key=errors.__getitem__)
    assert errors[worst] <= MAX_REL_ERR, (worst, errors[worst])
    inputs = [ckpt.state_of(llamas[k]) for k in ("base", "a")]
    assert all(any(not torch.equal(ours[n], x[n]) for n in ours) for x in inputs)  # neither input copied


def test_linear_base_model_without_a_weight_is_refused_as_by_mergekit(tmp_path: Path, ckpt, llamas) -> None:
    """The base joins linear's models with the top-level values only: with no top-level weight both refuse."""
    from mllm.merge import MergeError

    cfg = _config(llamas, "linear", [("a", {"weight": 0.7}), ("b", {"weight": 0.5})], True, {})
    with pytest.raises(MergeError, match=f"parameter 'weight' is required for model '{llamas['base']}'"):
        run_merge(ckpt.write_yaml(tmp_path / "m.yaml", cfg), tmp_path / "ours")
    with pytest.raises(RuntimeError, match="Missing required parameter weight"):
        _mergekit(cfg, tmp_path / "mk")


@pytest.mark.parametrize("case", sorted(PARITY))
def test_streamed_row_blocks_equal_whole_tensors(tmp_path: Path, ckpt, llamas, monkeypatch, case: str) -> None:
    from mllm.merge import engine

    models, with_base, parameters = PARITY[case]
    path = ckpt.write_yaml(tmp_path / "m.yaml", _config(llamas, _case(case), models, with_base, parameters))
    whole = ckpt.state_of(run_merge(path, tmp_path / "whole"))
    monkeypatch.setattr(engine, "BLOCK_ELEMS", 10)  # one row a block; the 16-entry norms in 2 blocks
    blocked = ckpt.state_of(run_merge(path, tmp_path / "blocked"))
    for n in whole:
        assert torch.allclose(blocked[n], whole[n], rtol=1e-6, atol=1e-7), n


@pytest.mark.parametrize("case", ["slerp", "nuslerp:row_wise", "multislerp", "karcher", "model_stock", "nearswap",
                                  "arcee_fusion"])
def test_bf16_models_differ_from_mergekit_by_rounding_only(tmp_path: Path, ckpt, bf16_llamas, case: str) -> None:
    """bf16 inputs computed in fp32 by both (mergekit's ``dtype`` is its compute dtype, ``out_dtype`` the
    output's): each entry is mergekit's, or one bf16 step away from it where the two fp32 results round
    to neighbouring bf16 numbers (arcee_fusion's threshold ties are decided alike: ``>=``)."""
    models, with_base, parameters = PARITY[case]
    cfg = _config(bf16_llamas, _case(case), models, with_base, parameters, out_dtype="bfloat16")
    ours = ckpt.state_of(run_merge(ckpt.write_yaml(tmp_path / "m.yaml", cfg), tmp_path / "ours"))
    theirs = ckpt.state_of(_mergekit(cfg, tmp_path / "mk"))
    for n, out in ours.items():
        assert out.dtype == torch.bfloat16, n
        step = theirs[n].float().abs() * 2.0**-7  # one bf16 step (8 significant bits) or more
        assert ((out.float() - theirs[n].float()).abs() <= step).all(), n


def test_slerp_slices_config_as_on_model_cards(tmp_path: Path, ckpt, llamas) -> None:
    """The slerp YAML most model cards carry: one slice over every layer of both models, a gradient per module."""
    layers = [0, ckpt.num_layers]
    cfg = {"slices": [{"sources": [{"model": str(llamas["base"]), "layer_range": layers},
                                   {"model": str(llamas["a"]), "layer_range": layers}]}],
           "merge_method": "slerp", "base_model": str(llamas["base"]), "parameters": {"t": SLERP_GRADIENT_T},
           "dtype": "float32"}
    ours = ckpt.state_of(run_merge(ckpt.write_yaml(tmp_path / "m.yaml", cfg), tmp_path / "ours"))
    errors = relative_errors(ours, ckpt.state_of(_mergekit(cfg, tmp_path / "mk")))
    assert max(errors.values()) <= MAX_REL_ERR
