"""Our own merge methods (FRANK, LiNeS, layer swap, WIDEN) with mergekit's YAML forms: ``slices:``, layer
gradients and ``{filter, value}`` lists where they make sense, and a one-line refusal naming the key where
they do not (a model-wide value, or one that sets the per-layer schedule itself)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mllm.merge import MergeError, run_merge

MLP_HALF = [{"filter": "mlp", "value": 0.5}, {"value": 1.0}]


def _src(llamas, key: str, lr: list[int], **params) -> dict:
    return {"model": str(llamas[key]), "layer_range": lr, **({"parameters": params} if params else {})}


def _models(llamas, *keys: str, **params) -> list[dict]:
    return [{"model": str(llamas[k]), **({"parameters": params[k]} if k in params else {})} for k in keys]


def _merge(ckpt, tmp_path: Path, name: str, cfg: dict) -> dict[str, torch.Tensor]:
    return ckpt.state_of(run_merge(ckpt.write_yaml(tmp_path / f"{name}.yaml", cfg), tmp_path / name))


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for n in a:
        assert torch.allclose(a[n], b[n], rtol=1e-6, atol=1e-7), n


def test_widen_filter_list_picks_each_tensors_value(tmp_path: Path, ckpt, llamas) -> None:
    """A filter list on WIDEN's calibration ratio: mlp tensors merge as with 0.5 everywhere, the rest as 1.0."""
    def cfg(ratio) -> dict:
        return {"merge_method": "widen", "base_model": str(llamas["base"]), "models": _models(llamas, "a", "b"),
                "parameters": {"above_average_value_ratio": ratio}}

    mixed = _merge(ckpt, tmp_path, "mixed", cfg(MLP_HALF))
    half, one = _merge(ckpt, tmp_path, "half", cfg(0.5)), _merge(ckpt, tmp_path, "one", cfg(1.0))
    assert any(not torch.equal(half[n], one[n]) for n in mixed if "mlp" in n)
    for n in mixed:
        assert torch.equal(mixed[n], half[n] if "mlp" in n else one[n]), n


def test_widen_slices_over_every_layer_equal_the_models_form(tmp_path: Path, ckpt, llamas) -> None:
    models = {"merge_method": "widen", "base_model": str(llamas["base"]), "models": _models(llamas, "a", "b"),
              "parameters": {"score_calibration_value": 0.8}}
    slices = {"merge_method": "widen", "base_model": str(llamas["base"]),
              "slices": [{"sources": [_src(llamas, k, lr) for k in ("base", "a", "b")]} for lr in ([0, 2], [2, 4])],
              "parameters": {"score_calibration_value": 0.8}}
    _assert_same(_merge(ckpt, tmp_path, "slices", slices), _merge(ckpt, tmp_path, "models", models))


@pytest.mark.parametrize("alpha", [0.4, "auto"])
def test_lines_slice_with_gradient_and_filters_equals_the_models_form(tmp_path: Path, ckpt, llamas, alpha) -> None:
    """LiNeS takes task arithmetic's per-tensor values (a weight gradient, a lambda filter list) in either form;
    one slice over every layer is the models: form (same layer positions), automatic alpha included."""
    weights = {"a": {"weight": [0.3, 1.0]}, "b": {"weight": MLP_HALF}}
    params = {"alpha": alpha, "beta": 0.5, "lambda": [{"filter": "self_attn", "value": 0.7}, {"value": 1.1}]}
    models = {"merge_method": "lines", "base_model": str(llamas["base"]), "models": _models(llamas, "a", "b", **weights),
              "parameters": params}
    slices = {"merge_method": "lines", "base_model": str(llamas["base"]), "parameters": params,
              "slices": [{"sources": [_src(llamas, "base", [0, 4]), *(_src(llamas, k, [0, 4], **weights[k])
                                                                       for k in ("a", "b"))]}]}
    ours = _merge(ckpt, tmp_path, "slices", slices)
    _assert_same(ours, _merge(ckpt, tmp_path, "models", models))
    plain = {**models, "models": _models(llamas, "a", "b", a={"weight": 1.0}, b={"weight": 1.0}),
             "parameters": {"alpha": alpha, "beta": 0.5}}
    assert any(not torch.equal(ours[n], t) for n, t in _merge(ckpt, tmp_path, "plain", plain).items())


def test_layer_swap_slices_set_the_donor_per_slice(tmp_path: Path, ckpt, llamas) -> None:
    """One slice over every layer is the models: form; with two slices each slice's sources say which model
    is the donor of that slice's swapped layers (output layers are counted over all slices)."""
    params = {"bottom": 1, "top": 1}
    models = {"merge_method": "layer_swap", "models": _models(llamas, "a", "b", b={"swap": True}), "parameters": params}
    one = {"merge_method": "layer_swap", "parameters": params,
           "slices": [{"sources": [_src(llamas, "a", [0, 4]), _src(llamas, "b", [0, 4], swap=True)]}]}
    _assert_same(_merge(ckpt, tmp_path, "one", one), _merge(ckpt, tmp_path, "models", models))
    two = {"merge_method": "layer_swap", "parameters": params,
           "slices": [{"sources": [_src(llamas, "a", [0, 2]), _src(llamas, "b", [0, 2], swap=True)]},
                      {"sources": [_src(llamas, "a", [2, 4], swap=True), _src(llamas, "b", [2, 4])]}]}
    out = _merge(ckpt, tmp_path, "two", two)
    a, b = ckpt.state_of(llamas["a"]), ckpt.state_of(llamas["b"])
    name = "model.layers.{}.mlp.up_proj.weight"
    assert torch.equal(out[name.format(0)], b[name.format(0)])  # bottom zone: slice 1's donor b
    assert torch.equal(out[name.format(1)], a[name.format(1)]) and torch.equal(out[name.format(2)], b[name.format(2)])
    assert torch.equal(out[name.format(3)], a[name.format(3)])  # top zone: slice 2's donor a


def _refused(llamas) -> dict[str, tuple[dict, str]]:
    base = {"base_model": str(llamas["base"])}
    pair = _models(llamas, "a", "b")
    swap = _models(llamas, "a", "b", b={"swap": True})
    return {
        "lines_alpha_gradient": ({"merge_method": "lines", **base, "models": pair,
                                  "parameters": {"alpha": [0.2, 0.9], "beta": 0.5}},
                                 r"parameters\.alpha: a layer gradient is not supported here, give one value \(LiNeS"),
        "lines_beta_filter": ({"merge_method": "lines", **base, "models": pair,
                               "parameters": {"alpha": "auto", "beta": MLP_HALF}},
                              r"parameters\.beta: a \{filter, value\} list is not supported here"),
        "frank_alpha_gradient": ({"merge_method": "frank", **base, "models": pair, "parameters": {"alpha": [0.1, 0.5]}},
                                 r"parameters\.alpha: a layer gradient is not supported here, give one value \(FRANK"),
        "frank_slices": ({"merge_method": "frank", **base,
                          "slices": [{"sources": [_src(llamas, k, [0, 4]) for k in ("base", "a", "b")]}]},
                         r"slices: not supported by merge_method frank \(.*\); use models:"),
        "layer_swap_bottom_gradient": ({"merge_method": "layer_swap", "models": swap,
                                        "parameters": {"bottom": [1, 2], "top": 1}},
                                       r"parameters\.bottom: a layer gradient is not supported here"),
        "layer_swap_swap_filter": ({"merge_method": "layer_swap", "parameters": {"bottom": 1, "top": 1},
                                    "models": _models(llamas, "a", "b", b={"swap": [{"filter": "mlp", "value": True},
                                                                                   {"value": False}]})},
                                   r"models\[1\]\.parameters\.swap: a \{filter, value\} list is not supported here"),
        "layer_swap_slice_without_donor": ({"merge_method": "layer_swap", "parameters": {"bottom": 1, "top": 1},
                                            "slices": [{"sources": [_src(llamas, "a", [0, 2]),
                                                                    _src(llamas, "b", [0, 2], swap=True)]},
                                                       {"sources": [_src(llamas, "a", [2, 4]),
                                                                    _src(llamas, "b", [2, 4])]}]},
                                           r"layer_swap: exactly one model needs parameters\.swap: true, got 0"),
        "widen_embedding_pattern_filter": ({"merge_method": "widen", **base, "models": pair,
                                            "parameters": {"embedding_pattern": [{"filter": "embed", "value": "x"}]}},
                                           r"parameters\.embedding_pattern: a \{filter, value\} list is not supported"),
    }


@pytest.mark.parametrize("case", ["lines_alpha_gradient", "lines_beta_filter", "frank_alpha_gradient", "frank_slices",
                                  "layer_swap_bottom_gradient", "layer_swap_swap_filter",
                                  "layer_swap_slice_without_donor", "widen_embedding_pattern_filter"])
def test_forms_that_make_no_sense_are_refused_in_one_line(tmp_path: Path, ckpt, llamas, case: str) -> None:
    cfg, message = _refused(llamas)[case]
    with pytest.raises(MergeError, match=message) as err:
        run_merge(ckpt.write_yaml(tmp_path / "m.yaml", cfg), tmp_path / "out")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()
