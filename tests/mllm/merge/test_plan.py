"""Merge YAML validation and the header-only compatibility checks (nothing written on refusal)."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch

from mllm.merge import MergeError, load_plan, run_merge
from mllm.merge.methods.ties import TiesParams
from mllm.registry import MERGE_METHODS


def _ties(ckpt, tmp_path: Path, llamas, **extra) -> Path:
    data = {
        "merge_method": "ties", "base_model": str(llamas["base"]),
        "models": [{"model": str(llamas["a"]), "parameters": {"weight": 0.6, "density": 0.5}},
                   {"model": str(llamas["b"]), "parameters": {"weight": 0.4}}],
        "parameters": {"density": 0.8, "int8_mask": True},
    }
    data.update(extra)
    return ckpt.write_yaml(tmp_path / "merge.yaml", data)


def test_plan_resolves_per_model_defaults_and_conditional_values(tmp_path: Path, ckpt, llamas) -> None:
    weight = [{"filter": "self_attn.q_proj", "value": 0.9}, {"value": 0.4}]  # a substring, as in mergekit
    path = _ties(ckpt, tmp_path, llamas)
    text = path.read_text().replace("weight: 0.4", f"weight: {json.dumps(weight)}")
    path.write_text(text)
    plan = load_plan(path)
    a, b = str(llamas["a"]), str(llamas["b"])
    p = plan.params_for("model.layers.0.self_attn.q_proj.weight")
    assert isinstance(p, TiesParams) and p.normalize is True and p.int8_mask is True
    assert p.weight == {a: 0.6, b: 0.9} and p.density == {a: 0.5, b: 0.8}  # model value, else top-level
    assert plan.params_for("model.layers.0.mlp.up_proj.weight").weight[b] == 0.4
    assert plan.reference.id == str(llamas["base"]) and [m.id for m in plan.models] == [a, b]
    assert plan.method_name == "ties" and plan.method is MERGE_METHODS.get("ties")  # the YAML key names it


def test_base_listed_among_models_is_not_a_task_vector(tmp_path: Path, ckpt, llamas) -> None:
    path = ckpt.write_yaml(tmp_path / "m.yaml", {
        "merge_method": "task_arithmetic", "base_model": str(llamas["base"]),
        "models": [{"model": str(llamas["base"])}, {"model": str(llamas["a"]), "parameters": {"weight": 1.0}}],
    })
    assert [m.id for m in load_plan(path).models] == [str(llamas["a"])]


@pytest.mark.parametrize(("edit", "message"), [
    ({"merge_method": "frobnicate"}, "merge_method: unknown merge method 'frobnicate'; expected one of: "),
    ({"slices": []}, "models / slices: give exactly one of them"),
    ({"modules": {}}, "modules: per-module merges .* not supported yet"),
    ({"parameters": {"densty": 0.5}},
     r"parameters.densty: unknown parameter; did you mean 'density'\? \(expected one of: weight, density"),
    ({"parameters": {"normalize": "maybe"}}, "parameters.normalize: expected true/false, got 'maybe'"),  # "yes": as mergekit
    ({"parameters": {"lambda": "big"}}, "parameters.lambda: expected a number, got 'big'"),
    ({"merge_methd": "ties"}, r"merge_methd: unknown key; did you mean 'merge_method'\?"),
    ({"parameters": {"lambda": [0.1, "x"]}}, r"parameters.lambda\[1\]: expected a number, got 'x'"),
    ({"parameters": {"lambda": []}}, r"parameters.lambda: an empty list"),
    ({"parameters": {"lambda": [{"filter": "mlp", "value": 2.0}, 0.5]}}, r"lambda\[1\]: expected \{filter"),
    ({"parameters": {"lambda": [{"filter": 3, "value": 2.0}]}}, r"lambda\[0\].filter: expected a string"),
    ({"parameters": {"density": 1.5}}, "density of .* must be in"),
    ({"dtype": "float8"}, "dtype: expected one of"),
    ({"base_model": None}, "base_model: required by merge_method ties"),
    ({"name_map": "qwen_vl"}, "name_map: unknown preset 'qwen_vl'"),
    ({"layer_pattern": "layers"}, "needs one capture group"),
    ({"shard_size": "lots"}, "expected a size in bytes"),
    ({"shard_size": "5B"}, "expected a size in bytes"),  # mergekit's "5B" counts parameters: refused
])
def test_bad_yaml_values_name_file_and_field(tmp_path: Path, ckpt, llamas, edit: dict, message: str) -> None:
    path = _ties(ckpt, tmp_path, llamas, **edit)
    with pytest.raises(MergeError, match=message) as err:
        load_plan(path)
    assert str(path) in str(err.value)


def test_model_level_errors(tmp_path: Path, ckpt, llamas) -> None:
    path = _ties(ckpt, tmp_path, llamas)
    path.write_text(path.read_text().replace("weight: 0.4", "normalize: true"))
    with pytest.raises(MergeError, match=r"models\[1\].parameters.normalize: a shared parameter"):
        load_plan(path)
    path = ckpt.write_yaml(tmp_path / "w.yaml", {
        "merge_method": "task_arithmetic", "base_model": str(llamas["base"]), "models": [{"model": str(llamas["a"])}],
    })
    with pytest.raises(MergeError, match="parameter 'weight' is required for model"):
        load_plan(path)
    path = ckpt.write_yaml(tmp_path / "l.yaml", {"merge_method": "linear", "base_model": str(llamas["base"]),
                                                  "models": [{"model": str(llamas["a"]), "parameters": {"weight": 1.0}}]})
    with pytest.raises(MergeError, match="parameter 'weight' is required for model"):  # the base joins the models
        load_plan(path)
    path = ckpt.write_yaml(tmp_path / "n.yaml", {"merge_method": "frank", "base_model": str(llamas["base"]),
                                                  "models": [{"model": str(llamas["a"])}]})
    with pytest.raises(MergeError, match="frank merges 2 models"):
        load_plan(path)


def test_malformed_yaml_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("merge_method: ties\nmodels: [a, b\n")
    with pytest.raises(MergeError, match=r"bad.yaml: malformed YAML \(line"):
        load_plan(path)
    with pytest.raises(MergeError, match="merge config not found"):
        load_plan(tmp_path / "missing.yaml")


def _refused(path: Path, out: Path, message: str) -> None:
    with pytest.raises(MergeError, match=message):
        run_merge(path, out)
    assert not out.exists() and not any(p.name.startswith(f".{out.name}") for p in out.parent.iterdir())


def test_refuses_shape_mismatch_naming_tensor_and_file(tmp_path: Path, ckpt, llamas) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(llamas["a"], bad)
    state = ckpt.state_of(bad)
    state["model.layers.2.mlp.up_proj.weight"] = torch.zeros(8, 16)
    from safetensors.torch import save_file

    save_file(state, bad / "model.safetensors")
    path = _ties(ckpt, tmp_path, llamas, models=[{"model": str(bad), "parameters": {"weight": 1.0}}])
    _refused(path, tmp_path / "out", r"bad/model.safetensors: tensor 'model.layers.2.mlp.up_proj.weight' has shape \[8, 16\]")


def test_refuses_other_architecture_family(tmp_path: Path, ckpt, llamas) -> None:
    bad = tmp_path / "qwen"
    shutil.copytree(llamas["a"], bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["model_type"] = "qwen2"
    (bad / "config.json").write_text(json.dumps(cfg))
    path = _ties(ckpt, tmp_path, llamas, models=[{"model": str(bad), "parameters": {"weight": 1.0}}])
    _refused(path, tmp_path / "out", "qwen/config.json: model_type 'qwen2' differs from 'llama'")


def test_refuses_vocab_mismatch_unless_embeddings_excluded(tmp_path: Path, ckpt, llamas) -> None:
    big = ckpt.save_llama(tmp_path / "big", vocab=64, seed=5)
    path = _ties(ckpt, tmp_path, llamas, models=[{"model": str(big), "parameters": {"weight": 1.0}}])
    _refused(path, tmp_path / "out", r"lm_head.weight' has shape \[64, 16\].*vocab sizes differ \(64 vs 48\)")
    path = _ties(ckpt, tmp_path, llamas, models=[{"model": str(big), "parameters": {"weight": 1.0}}],
                 exclude=["embed_tokens", "lm_head"])
    out = run_merge(path, tmp_path / "out")
    merged, base = ckpt.state_of(out), ckpt.state_of(llamas["base"])
    assert torch.equal(merged["lm_head.weight"], base["lm_head.weight"])  # copied from the reference


def test_refuses_missing_tensor_and_existing_output(tmp_path: Path, ckpt, llamas) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(llamas["a"], bad)
    state = ckpt.state_of(bad)
    del state["model.norm.weight"]
    from safetensors.torch import save_file

    save_file(state, bad / "model.safetensors")
    path = _ties(ckpt, tmp_path, llamas, models=[{"model": str(bad), "parameters": {"weight": 1.0}}])
    _refused(path, tmp_path / "out", "tensor 'model.norm.weight' to merge is missing")
    (tmp_path / "taken").mkdir()
    with pytest.raises(MergeError, match="already exists"):
        run_merge(_ties(ckpt, tmp_path, llamas), tmp_path / "taken")


def test_yaml_numbers_without_a_dot_are_numbers(tmp_path: Path, llamas) -> None:
    # PyYAML's YAML 1.1 resolver reads "5e-1" as a string; the one validator reads it as YAML 1.2 does
    path = tmp_path / "merge.yaml"
    path.write_text(f"merge_method: ties\nbase_model: {llamas['base']}\nmodels:\n"
                    f"  - model: {llamas['a']}\n    parameters: {{weight: 6e-1, density: 5e-1}}\n"
                    f"  - model: {llamas['b']}\n    parameters: {{weight: 4E-1}}\nparameters: {{density: 8e-1}}\n")
    plan = load_plan(path)
    params = plan.params_for(None)
    assert dataclasses.asdict(params)["weight"] == {str(llamas["a"]): 0.6, str(llamas["b"]): 0.4}
    assert dataclasses.asdict(params)["density"] == {str(llamas["a"]): 0.5, str(llamas["b"]): 0.8}


@pytest.mark.parametrize(("extra", "detect"), [
    ({}, True), ({"name_map": {}}, False), ({"name_map": "llava"}, False),
    ({"layer_pattern": r"^language_model\.model\.layers\.(\d+)\."}, False),
])
def test_name_map_is_found_from_the_weights_unless_the_yaml_sets_name_map_or_layer_pattern(
        tmp_path: Path, ckpt, llamas, extra: dict, detect: bool) -> None:
    from mllm.merge.engine import open_readers
    from mllm.merge.families import with_detected_names

    plan = load_plan(_ties(ckpt, tmp_path, llamas, **extra))
    assert plan.detect_names is detect
    found = with_detected_names(plan, open_readers(plan))
    assert not found.detect_names and found.name_map == plan.name_map  # a plain LLM's names need no map
