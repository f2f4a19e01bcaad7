"""The deterministic merge methods against mergekit on tiny fp32 Mistral checkpoints (conftest ``mistrals``:
sliding-window attention, grouped KV heads), each YAML with a layer gradient on one parameter and a
``{filter, value}`` list on another where the method has parameters: every output tensor within 1e-5 of
mergekit's, relative to the tensor's largest entry."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mllm.merge import run_merge

MAX_REL_ERR = 1e-5
FILTERED = [{"filter": "self_attn", "value": 0.3}, {"filter": "mlp", "value": 0.7}, {"value": 0.5}]  # a filter list
GRADIENT_FILTERED = [{"filter": "self_attn", "value": [0.1, 0.6, 0.9]}, {"value": [0.8, 0.2]}]

# case -> (models: (fixture key, parameters), base_model listed?, top-level parameters)
PARITY = {
    "linear": ([("a", {"weight": [0.2, 0.9]}), ("b", {"weight": [{"filter": "mlp", "value": 2.0}, {"value": 0.5}]})],
               False, {"normalize": True}),
    "task_arithmetic": ([("a", {"weight": [0.3, 1.0, 0.6]}), ("b", {"weight": 0.5})], True,
                        {"lambda": [{"filter": "self_attn", "value": 0.8}, {"value": 1.2}]}),
    "ties": ([("a", {"weight": [0.4, 1.0], "density": FILTERED}), ("b", {"weight": 0.7, "density": 0.6})], True,
             {"normalize": True}),
    "slerp": ([("base", {}), ("a", {})], True, {"t": GRADIENT_FILTERED}),
    "nuslerp": ([("a", {"weight": [0.2, 0.9]}), ("b", {"weight": [{"filter": "mlp", "value": 0.3}, {"value": 0.7}]})],
                True, {}),
    "multislerp": ([("a", {"weight": [0.3, 0.8]}), ("b", {"weight": [{"filter": "self_attn", "value": 0.9},
                                                                      {"value": 0.4}]})], True, {}),
    "karcher": ([("a", {}), ("b", {})], True,
                {"max_iter": [{"filter": "mlp", "value": 3}, {"value": 10}], "tol": [1e-5, 1e-3]}),
    "model_stock": ([("base", {}), ("a", {}), ("b", {})], True,
                    {"filter_wise": [{"filter": "self_attn", "value": True}, {"value": False}]}),
    "nearswap": ([("base", {}), ("a", {})], True, {"t": [{"filter": "mlp", "value": [0.001, 0.1]}, {"value": 0.03}]}),
    "arcee_fusion": ([("base", {}), ("a", {})], True, {}),
    "breadcrumbs": ([("a", {"weight": [0.5, 1.0], "density": FILTERED, "gamma": 0.05}),
                     ("b", {"weight": 0.5, "density": 0.6, "gamma": 0.1})], True, {"lambda": 0.9}),
    "breadcrumbs_ties": ([("a", {"weight": 0.7, "density": [0.3, 0.8], "gamma": 0.05}),
                          ("b", {"weight": [{"filter": "mlp", "value": 1.0}, {"value": 0.4}], "density": 0.6,
                                 "gamma": 0.02})], True, {"normalize": True}),
    "sce": ([("a", {}), ("b", {}), ("sparse", {})], True,  # its one tensor parameter: both forms on it
            {"select_topk": [{"filter": "self_attn", "value": [0.2, 0.9]}, {"value": 0.6}], "int8_mask": True}),
    "ram": ([("a", {}), ("sparse", {})], True, {"epsilon": [{"filter": "mlp", "value": 0.02}, {"value": [1e-5, 1e-2]}]}),
    "ramplus_tl": ([("a", {}), ("b", {}), ("sparse", {})], True,
                   {"r": [0.1, 0.5], "alpha": [{"filter": "self_attn", "value": 3.0}, {"value": 0.2}]}),
}


def _config(models: dict[str, Path], method: str, listed, with_base: bool, parameters) -> dict:
    base = {"base_model": str(models["base"])} if with_base else {}
    return {
        "merge_method": method, **base,
        "models": [{"model": str(models[k]), **({"parameters": p} if p else {})} for k, p in listed],
        "parameters": parameters, "dtype": "float32",
    }


def _mergekit(cfg: dict, out: Path) -> Path:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge as mergekit_merge
    from mergekit.options import MergeOptions

    mergekit_merge(MergeConfiguration.model_validate(cfg), str(out),
                   options=MergeOptions(copy_tokenizer=False, quiet=True, write_model_card=False))
    return out


def _max_rel_error(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> tuple[str, float]:
    assert sorted(ours) == sorted(theirs)
    errors = {n: float((ours[n] - theirs[n]).abs().max() / theirs[n].abs().max().clamp_min(1e-30)) for n in ours}
    worst = max(errors, key=errors.__getitem__)
    return worst, errors[worst]


@pytest.mark.parametrize("case", sorted(PARITY))
def test_methods_equal_mergekit_on_mistral(tmp_path: Path, ckpt, mistrals, case: str) -> None:
    listed, with_base, parameters = PARITY[case]
    cfg = _config(mistrals, case, listed, with_base, parameters)
    ours = ckpt.state_of(run_merge(ckpt.write_yaml(tmp_path / "m.yaml", cfg), tmp_path / "ours"))
    worst, err = _max_rel_error(ours, ckpt.state_of(_mergekit(cfg, tmp_path / "mk")))
    assert err <= MAX_REL_ERR, (worst, err)
    base = ckpt.state_of(mistrals["base"])
    assert any(not torch.equal(ours[n], base[n]) for n in ours)  # something was merged


def test_passthrough_slices_with_scale_gradient_and_filters_equal_mergekit(tmp_path: Path, ckpt, mistrals) -> None:
    """A frankenmerge of Mistral layers (6 output layers from 4) with ``scale`` as a filter list holding a
    gradient; the output loads in transformers with its sliding window kept."""
    from transformers import AutoModelForCausalLM

    def src(key: str, lr: list[int], **params) -> dict:
        return {"model": str(mistrals[key]), "layer_range": lr, **({"parameters": params} if params else {})}

    cfg = {"merge_method": "passthrough", "dtype": "float32",
           "slices": [{"sources": [src("a", [0, 3])]},
                      {"sources": [src("b", [1, 4], scale=[{"filter": "o_proj", "value": [1.0, 0.5]},
                                                           {"filter": "down_proj", "value": 0.25}, {"value": 1.0}])]}]}
    out = run_merge(ckpt.write_yaml(tmp_path / "m.yaml", cfg), tmp_path / "ours")
    ours = ckpt.state_of(out)
    worst, err = _max_rel_error(ours, ckpt.state_of(_mergekit(cfg, tmp_path / "mk")))
    assert err <= MAX_REL_ERR, (worst, err)
    b = ckpt.state_of(mistrals["b"])
    assert torch.equal(ours["model.layers.5.mlp.down_proj.weight"], 0.25 * b["model.layers.3.mlp.down_proj.weight"])
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 6 and model.config.sliding_window == 16
    assert torch.isfinite(model(torch.tensor([[1, 5, 7]])).logits).all()


def test_ties_slices_with_gradients_and_filters_equal_mergekit(tmp_path: Path, ckpt, mistrals) -> None:
    """The slices form on Mistral: two slices, per-source gradients and a slice-level filter list."""
    def src(key: str, lr: list[int], **params) -> dict:
        return {"model": str(mistrals[key]), "layer_range": lr, **({"parameters": params} if params else {})}

    cfg = {"merge_method": "ties", "base_model": str(mistrals["base"]), "dtype": "float32",
           "slices": [{"sources": [src("base", [0, 2]), src("a", [0, 2], weight=[0.3, 1.0]), src("b", [0, 2], weight=0.5)],
                       "parameters": {"density": [{"filter": "mlp", "value": [0.2, 0.8]}, {"value": 0.5}]}},
                      {"sources": [src("base", [2, 4]), src("a", [2, 4], weight=0.7), src("b", [2, 4], weight=[0.9, 0.2])],
                       "parameters": {"density": 0.4}}]}
    ours = ckpt.state_of(run_merge(ckpt.write_yaml(tmp_path / "m.yaml", cfg), tmp_path / "ours"))
    worst, err = _max_rel_error(ours, ckpt.state_of(_mergekit(cfg, tmp_path / "mk")))
    assert err <= MAX_REL_ERR, (worst, err)
