"""mergekit configs as written on model cards: slices, layer gradients, filter lists, passthrough stacking --
parity with mergekit's own output on tiny Llama checkpoints, and one-line errors for what is wrong."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mllm.merge import MergeError, load_plan, run_merge
from mllm.merge.settings import Conditional, Gradient, evaluate


def _mergekit(cfg: dict, out: Path) -> Path:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge as mergekit_merge
    from mergekit.options import MergeOptions

    mergekit_merge(MergeConfiguration.model_validate(cfg), str(out),
                   options=MergeOptions(copy_tokenizer=False, quiet=True, write_model_card=False))
    return out


def _assert_parity(ckpt, ours: Path, theirs: Path) -> dict[str, torch.Tensor]:
    a, b = ckpt.state_of(ours), ckpt.state_of(theirs)
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].shape == b[name].shape, name
        rel = float((a[name].double() - b[name].double()).norm() / b[name].double().norm().clamp_min(1e-30))
        assert rel <= 1e-5, (name, rel)
    return a


def _src(llamas, key: str, lr: list[int], **params) -> dict:
    return {"model": str(llamas[key]), "layer_range": lr, **({"parameters": params} if params else {})}


def _parity_configs(llamas) -> dict[str, dict]:
    return {
        "linear_slices": {
            "merge_method": "linear", "dtype": "float32",
            "slices": [
                {"sources": [_src(llamas, "a", [0, 3], weight=[0.2, 0.9]),
                             # per-model filters match the model's own tensor names (layer 1.. of b here)
                             _src(llamas, "b", [1, 4], weight=[{"filter": "layers.2.", "value": 3.0},
                                                               {"filter": "self_attn", "value": [1.0, 0.3]},
                                                               {"value": 0.5}])]},
                {"sources": [_src(llamas, "a", [3, 4]), _src(llamas, "b", [0, 1])],  # one layer: t = 1
                 "parameters": {"weight": [0.1, 0.4, 0.7]}},
            ],
            "parameters": {"normalize": True, "weight": [{"filter": "mlp", "value": 0.25}]},
        },
        "linear_models": {
            "merge_method": "linear", "dtype": "float32",
            "models": [{"model": str(llamas["a"]), "parameters": {"weight": [0.1, 0.5, 1.0]}},
                       {"model": str(llamas["b"]), "parameters": {"weight": [{"filter": "up_proj|q_proj", "value": 9.0},  # no regex
                                                                             {"filter": "down_proj", "value": 2.0},
                                                                             {"value": [1.0, 0.0]}]}}],
        },
        "ties_slices": {
            "merge_method": "ties", "base_model": str(llamas["base"]), "dtype": "float32",
            "slices": [
                {"sources": [_src(llamas, "base", [0, 2]),
                             _src(llamas, "a", [0, 2], weight=[0.3, 1.0],
                                  density=[{"filter": "mlp", "value": [0.2, 0.8]}, {"value": 0.5}]),
                             _src(llamas, "b", [0, 2], weight=0.5)],
                 "parameters": {"normalize": True}},
                {"sources": [_src(llamas, "base", [2, 4]), _src(llamas, "a", [2, 4], weight=0.7),
                             _src(llamas, "b", [2, 4], weight=[0.9, 0.2], density=0.3)],
                 "parameters": {"density": [0.4, 0.9]}},
            ],
            "parameters": {"int8_mask": True, "density": 0.6, "normalize": False},
        },
        "ties_slice_base": {  # a slice's own base_model: the last slice's also merges the final norm and lm_head
            "merge_method": "ties", "base_model": str(llamas["base"]), "dtype": "float32",
            "slices": [
                {"sources": [_src(llamas, "base", [0, 2]), _src(llamas, "a", [0, 2], weight=[0.5, 1.0])]},
                {"sources": [_src(llamas, "b", [2, 4]), _src(llamas, "a", [2, 4], weight=0.8)],
                 "base_model": str(llamas["b"]), "residual_weight": 0.5},  # read by no mergekit method
            ],
            "parameters": {"density": [{"filter": "proj", "value": 0.5}, {"value": 0.9}]},
        },
    }


@pytest.mark.parametrize("name", ["linear_slices", "linear_models", "ties_slices", "ties_slice_base"])
def test_slices_gradients_and_filters_match_mergekit(tmp_path: Path, ckpt, llamas, name: str) -> None:
    cfg = _parity_configs(llamas)[name]
    ours = run_merge(ckpt.write_yaml(tmp_path / "m.yaml", cfg), tmp_path / "ours")
    merged = _assert_parity(ckpt, ours, _mergekit(cfg, tmp_path / "mk"))
    a = ckpt.state_of(llamas["a"])
    assert not torch.equal(merged["model.layers.1.mlp.up_proj.weight"], a["model.layers.1.mlp.up_proj.weight"])


def test_passthrough_stacks_slices_like_mergekit_and_loads(tmp_path: Path, ckpt, llamas) -> None:
    from transformers import AutoModelForCausalLM

    cfg = {
        "merge_method": "passthrough", "dtype": "float32",
        "slices": [
            {"sources": [_src(llamas, "a", [0, 3])]},
            {"sources": [_src(llamas, "a", [1, 2], scale=[{"filter": "o_proj", "value": 0.5}, {"value": 1.0}])]},
            {"sources": [_src(llamas, "b", [2, 4], scale=[{"filter": "down_proj", "value": [2.0, 0.0]}])]},
        ],
    }
    ours = run_merge(ckpt.write_yaml(tmp_path / "m.yaml", cfg), tmp_path / "ours")
    merged = _assert_parity(ckpt, ours, _mergekit(cfg, tmp_path / "mk"))
    a, b = ckpt.state_of(llamas["a"]), ckpt.state_of(llamas["b"])
    assert json.loads((ours / "config.json").read_text())["num_hidden_layers"] == 6
    assert torch.equal(merged["model.layers.2.mlp.up_proj.weight"], a["model.layers.2.mlp.up_proj.weight"])
    assert torch.equal(merged["model.layers.3.self_attn.o_proj.weight"], 0.5 * a["model.layers.1.self_attn.o_proj.weight"])
    assert torch.equal(merged["model.layers.4.mlp.down_proj.weight"], 2.0 * b["model.layers.2.mlp.down_proj.weight"])
    assert torch.equal(merged["model.layers.5.mlp.down_proj.weight"], 0.0 * b["model.layers.3.mlp.down_proj.weight"])
    assert torch.equal(merged["model.embed_tokens.weight"], a["model.embed_tokens.weight"])  # the first slice's
    assert torch.equal(merged["lm_head.weight"], b["lm_head.weight"])  # the last slice's
    model = AutoModelForCausalLM.from_pretrained(ours)
    assert model.config.num_hidden_layers == 6 and len(model.model.layers) == 6
    for n, p in model.state_dict().items():
        assert torch.equal(p, merged[n]), n
    assert torch.isfinite(model(torch.tensor([[1, 5, 7]])).logits).all()


def test_gradient_and_filter_evaluation_follow_mergekit() -> None:
    from mergekit.config import ConditionalParameter, evaluate_setting

    grad = Gradient([0.0, 0.5, 0.3, 0.7, 1.0])
    for t in [0.0, 1 / 3, 0.5, 2 / 3, 0.9, 1.0]:
        assert evaluate(grad, "x", t) == evaluate_setting("x", list(grad), t, validate=float)
    assert evaluate(Gradient([True, False]), "x", 0.7) is True  # booleans are picked, not interpolated
    cond = Conditional((("self_attn", 0.1), ("*", 0.2)))
    mk = [ConditionalParameter(filter="self_attn", value=0.1), ConditionalParameter(filter="*", value=0.2)]
    for name in ["model.layers.0.self_attn.q_proj.weight", "model.norm.weight"]:
        assert evaluate(cond, name, 0) == evaluate_setting(name, mk, 0, validate=float)
    assert evaluate(Conditional((("mlp", 1.0),)), "model.norm.weight", 0) is None  # falls through to the next scope
    assert evaluate(Conditional((("self_attn\\.q", 1.0),)), "model.layers.0.self_attn.q_proj", 0) is None  # no regex


def _ties_slices(llamas, **edit) -> dict:
    cfg = {"merge_method": "ties", "base_model": str(llamas["base"]),
           "slices": [{"sources": [_src(llamas, "base", [0, 2]), _src(llamas, "a", [0, 2], weight=1.0)]}]}
    cfg.update(edit)
    return cfg


@pytest.mark.parametrize(("edit", "message"), [
    ({"slices": [{"sources": [{"model": "A", "layer_range": [2, 1]}]}]},
     "slices[0].sources[0].layer_range: expected [start, end] with 0 <= start < end, got [2, 1]"),
    ({"slices": [{"sources": [{"model": "A", "layer_range": [0, 2], "layers": 3}]}]},
     "slices[0].sources[0].layers: unknown key (expected model, layer_range, parameters)"),
    ({"slices": [{"sources": [{"model": "A"}]}]},
     "slices[0].sources[0]: expected {model: <folder>, layer_range: [start, end], parameters: {...}}"),
    ({"slices": [{"source": []}]}, "slices[0].sources: expected a non-empty list of {model, layer_range}"),
    ({"slices": [{"sources": [{"model": "base", "layer_range": [0, 2]},
                              {"model": "a", "layer_range": [0, 3]}]}]},
     "slices[0].sources[1].layer_range: [0, 3] spans 3 layers, sources[0] spans 2 "
     "(every source of a slice gives the same number of layers)"),
    ({"slices": [{"sources": [{"model": "a", "layer_range": [0, 2], "parameters": {"weight": 1.0}}]}]},
     "slices[0].sources: base_model <BASE> must be one of the sources (the base's layers come from the slice, "
     "as in mergekit)"),
    ({"slices": [{"sources": [{"model": "base", "layer_range": [0, 2]},
                              {"model": "a", "layer_range": [0, 2], "parameters": {"weight": [0.5, "x"]}}]}]},
     "slices[0].sources[1].parameters.weight[1]: expected a number, got 'x'"),
    ({"slices": [{"sources": [{"model": "base", "layer_range": [0, 2]}, {"model": "a", "layer_range": [0, 2]}],
                  "parameters": {"normalise": True}}]},
     "slices[0].parameters.normalise: unknown parameter; did you mean 'normalize'? (expected one of: weight, "
     "density, normalize, lambda, rescale, int8_mask)"),
    ({"models": [{"model": "a"}]}, "models / slices: give exactly one of them (models: whole models; slices: "
                                   "layer ranges)"),
    ({"merge_mthod": "ties"}, None),
    ({"tokenizer": {"pad_to_multiple_of": 0}}, "tokenizer.pad_to_multiple_of: expected an integer >= 1, got 0"),
    ({"tokenizer": {"source": "base", "tokens": {"<x>": {"force": "yes"}}}},
     "tokenizer.tokens.<x>.force: expected true or false, got 'yes'"),
    ({"tokenizer": {"source": "base", "extra": 1}},
     "tokenizer.extra: unknown key (expected source, tokens, pad_to_multiple_of)"),
    ({"chat_template": "{{x}}"}, "chat_template: '{{x}}' is not a Jinja template"),
])
def test_bad_slices_and_keys_are_one_line_naming_file_and_key(tmp_path: Path, llamas, ckpt, edit, message) -> None:
    names = {k: str(v) for k, v in llamas.items()}
    for sl in edit.get("slices", []):
        for s in sl.get("sources", []):
            s["model"] = names.get(s.get("model"), s.get("model"))
    if "models" in edit:
        edit["models"] = [{"model": names["a"]}]
    path = ckpt.write_yaml(tmp_path / "m.yaml", _ties_slices(llamas, **edit))
    with pytest.raises(MergeError) as err:
        load_plan(path)
    text = str(err.value)
    assert "\n" not in text and text.startswith(f"{path}: ")
    if message is None:
        assert "merge_mthod: unknown key; did you mean 'merge_method'?" in text
    else:
        assert text == f"{path}: {message.replace('<BASE>', repr(names['base']))}"


def test_layer_range_past_the_model_is_refused_before_reading(tmp_path: Path, ckpt, llamas) -> None:
    cfg = {"merge_method": "passthrough", "slices": [{"sources": [_src(llamas, "a", [2, 6])]}]}
    path = ckpt.write_yaml(tmp_path / "m.yaml", cfg)
    with pytest.raises(MergeError) as err:
        run_merge(path, tmp_path / "out")
    assert str(err.value) == (f"{path}: slices[0].sources[0].layer_range: [2, 6] goes past the 4 decoder layers "
                              f"of {str(llamas['a'])!r}")
    assert not (tmp_path / "out").exists()


def test_passthrough_takes_one_source_per_slice(tmp_path: Path, ckpt, llamas) -> None:
    cfg = {"merge_method": "passthrough",
           "slices": [{"sources": [_src(llamas, "a", [0, 2]), _src(llamas, "b", [0, 2])]}]}
    path = ckpt.write_yaml(tmp_path / "m.yaml", cfg)
    with pytest.raises(MergeError) as err:
        load_plan(path)
    assert str(err.value) == f"{path}: slices[0].sources: passthrough merges 1 model (besides the base), got 2"


def test_chat_template_is_set_in_the_output_tokenizer_config(tmp_path: Path, ckpt, llamas) -> None:
    import shutil

    ref = tmp_path / "ref"
    shutil.copytree(llamas["a"], ref)
    (ref / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 64, "chat_template": "old"}))
    template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    cfg = {"merge_method": "passthrough", "chat_template": template,
           "slices": [{"sources": [{"model": str(ref), "layer_range": [0, 4]}]}]}
    out = run_merge(ckpt.write_yaml(tmp_path / "m.yaml", cfg), tmp_path / "out")
    tok = json.loads((out / "tokenizer_config.json").read_text())
    assert tok == {"model_max_length": 64, "chat_template": template}
    cfg["chat_template"] = "auto"  # the template most inputs share: here the one input's
    out = run_merge(ckpt.write_yaml(tmp_path / "m2.yaml", cfg), tmp_path / "out2")
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == "old"
    del cfg["chat_template"]
    cfg["slices"][0]["sources"][0]["model"] = str(llamas["a"])  # no tokenizer_config.json there
    cfg["chat_template"] = template
    with pytest.raises(MergeError, match="chat_template: .* has no tokenizer_config.json to set it in"):
        run_merge(ckpt.write_yaml(tmp_path / "m3.yaml", cfg), tmp_path / "out3")


def test_named_chat_template_and_extension_keys_with_slices(tmp_path: Path, ckpt, llamas) -> None:
    cfg = {"merge_method": "linear", "chat_template": "chatml", "exclude": ["embed_tokens", "lm_head"],
           "slices": [{"sources": [_src(llamas, "a", [1, 3], weight=1.0), _src(llamas, "b", [1, 3], weight=1.0)]}],
           "seed": 3, "shard_size": "10KB"}
    plan = load_plan(ckpt.write_yaml(tmp_path / "m.yaml", cfg))
    assert "<|im_start|>" in plan.chat_template  # mergekit's named template
    del cfg["chat_template"]
    out = run_merge(ckpt.write_yaml(tmp_path / "m.yaml", cfg), tmp_path / "out")
    merged, a, b = ckpt.state_of(out), ckpt.state_of(llamas["a"]), ckpt.state_of(llamas["b"])
    assert len({p.name for p in out.glob("*.safetensors")}) > 1
    assert torch.equal(merged["model.embed_tokens.weight"], a["model.embed_tokens.weight"])  # excluded: the reference's
    assert torch.allclose(merged["model.layers.0.mlp.up_proj.weight"],
                          (a["model.layers.1.mlp.up_proj.weight"] + b["model.layers.1.mlp.up_proj.weight"]) / 2)
    assert sum(n.endswith("input_layernorm.weight") for n in merged) == 2


def test_tokenizer_keys_are_parsed_and_stored(tmp_path: Path, ckpt, llamas) -> None:
    base = str(llamas["base"])
    plan = load_plan(ckpt.write_yaml(tmp_path / "m.yaml", _ties_slices(llamas, tokenizer={"source": "base"})))
    assert plan.tokenizer is not None and (plan.tokenizer.source, plan.tokenizer.path) == ("base", llamas["base"])
    assert plan.tokenizer_source == llamas["base"]
    plan = load_plan(ckpt.write_yaml(tmp_path / "m.yaml", _ties_slices(llamas, tokenizer_source=str(llamas["b"]))))
    assert plan.tokenizer is not None and (plan.tokenizer.source, plan.tokenizer_source) == (str(llamas["b"]), llamas["b"])
    path = ckpt.write_yaml(tmp_path / "m.yaml", _ties_slices(llamas, tokenizer_source="base", tokenizer={"source": base}))
    with pytest.raises(MergeError) as err:
        load_plan(path)
    assert str(err.value) == f"{path}: tokenizer: give either tokenizer_source or tokenizer, not both"


def test_passthrough_of_a_model_with_per_layer_types_loads(tmp_path: Path, ckpt) -> None:
    """Qwen2 configs list one attention kind per layer (``layer_types``): resized with the layer count."""
    from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=48, hidden_size=16, intermediate_size=32, num_hidden_layers=4, num_attention_heads=2,
                      num_key_value_heads=1)
    Qwen2ForCausalLM(cfg).save_pretrained(tmp_path / "qwen")
    merge = {"merge_method": "passthrough", "slices": [
        {"sources": [{"model": str(tmp_path / "qwen"), "layer_range": [0, 4]}]},
        {"sources": [{"model": str(tmp_path / "qwen"), "layer_range": [1, 3]}]}]}
    out = run_merge(ckpt.write_yaml(tmp_path / "m.yaml", merge), tmp_path / "out")
    written = json.loads((out / "config.json").read_text())
    assert written["num_hidden_layers"] == 6 and written["layer_types"] == ["full_attention"] * 6
    model = AutoModelForCausalLM.from_pretrained(out)
    src = ckpt.state_of(tmp_path / "qwen")
    assert torch.equal(model.state_dict()["model.layers.5.self_attn.q_proj.bias"], src["model.layers.2.self_attn.q_proj.bias"])


QUOTED = ["0.5", " 0.5 ", "\t1e-3\n", "1E3", "3", "3.0", "3.00", "-2", "+2", ".5", "5.", "1_000", "1_0.5", "inf",
          "-Infinity", "nan", "1e400", "007", "0x10", "1,5", "", "  ", "abc", "1__0", "_1", "1e", "0.5\x00", "\u0661",
          "\xa00.5", "true", "True", "YES", "on", "t", "n", "off", "0", "1", " true", "tru", "1.0", "3.5", "1e2"]


@pytest.mark.parametrize("tp", [float, int, bool])
def test_quoted_values_are_read_exactly_as_mergekit_reads_them(tp: type) -> None:
    """A quoted string for a number (or a boolean) is accepted iff mergekit's pydantic validation accepts it,
    and gives the same value."""
    from mergekit.merge_methods.base import ParameterScope, ParameterSpec
    from pydantic import ValidationError

    from mllm.merge.settings import parse_setting

    spec = ParameterSpec("x", tp, ParameterScope.SHARED)
    for text in QUOTED:
        try:
            want = spec.validate(text)
        except ValidationError:
            with pytest.raises(MergeError, match="m.yaml: parameters.x: expected"):
                parse_setting(tp, text, "m.yaml: parameters.x")
            continue
        got = parse_setting(tp, text, "m.yaml: parameters.x")
        assert type(got) is type(want) and (got == want or (got != got and want != want)), (text, got, want)


def test_quoted_numbers_in_a_ties_yaml_merge_as_mergekit_merges_them(tmp_path: Path, ckpt, llamas) -> None:
    """The same YAML with quoted numbers (scalars, a gradient, a filter value, a boolean) merges as mergekit
    merges it; a string mergekit refuses is refused in one line naming the key."""
    cfg = {"merge_method": "ties", "base_model": str(llamas["base"]), "dtype": "float32",
           "models": [{"model": str(llamas["a"]), "parameters": {"weight": "0.7", "density": ["0.3", "0.8"]}},
                      {"model": str(llamas["b"]), "parameters": {"weight": [{"filter": "mlp", "value": "5e-1"},
                                                                            {"value": "0.4"}], "density": "0.6"}}],
           "parameters": {"lambda": " 1.5 ", "normalize": "false", "rescale": "yes"}}
    path = ckpt.write_yaml(tmp_path / "m.yaml", cfg)
    params = load_plan(path).params_for("model.layers.0.mlp.up_proj.weight", 1.0)
    assert params.lambda_ == 1.5 and params.normalize is False and params.rescale is True
    assert params.weight == {str(llamas["a"]): 0.7, str(llamas["b"]): 0.5} and params.density[str(llamas["a"])] == 0.8
    _assert_parity(ckpt, run_merge(path, tmp_path / "ours"), _mergekit(cfg, tmp_path / "mk"))
    cfg["parameters"]["lambda"] = "1.5x"
    with pytest.raises(MergeError, match=r"m.yaml: parameters.lambda: expected a number, got '1.5x'"):
        load_plan(ckpt.write_yaml(tmp_path / "m.yaml", cfg))
    with pytest.raises(ValueError, match="unable to parse string as a number"):
        _mergekit(cfg, tmp_path / "mk_bad")
