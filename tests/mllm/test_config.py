"""Config loading and the registry: every user error names the file and the dotted key."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from mllm.config import (
    RECIPES_DIR,
    ConfigError,
    RunConfig,
    apply_overrides,
    from_dict,
    load_config,
    recipe_names,
    resolve_recipe,
    save_config,
    to_dict,
)
from mllm.registry import ENCODERS, PROJECTORS, Registry, RegistryError
from mllm.schema import load_yaml
from train.trainer import TrainConfig


@dataclass
class _Inner:
    width: int = 4
    scale: float = 1.0
    names: list[str] = field(default_factory=list)


@dataclass
class _Outer:
    inner: _Inner = field(default_factory=_Inner)
    flag: bool = False
    path: str | None = None


def test_from_dict_builds_nested_and_converts_ints_to_float() -> None:
    out = from_dict(_Outer, {"inner": {"width": 8, "scale": 2, "names": ["a"]}, "flag": True})
    assert out == _Outer(_Inner(8, 2.0, ["a"]), True, None)
    assert isinstance(out.inner.scale, float)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"inner": {"widht": 3}}, "cfg.inner.widht: unknown key"),
        ({"inner": {"width": "3"}}, "cfg.inner.width: expected an integer"),
        ({"inner": {"width": True}}, "cfg.inner.width: expected an integer"),
        ({"flag": "yes"}, "cfg.flag: expected true/false"),
        ({"inner": {"names": "abc"}}, "cfg.inner.names: expected a list"),
        ({"inner": {"names": [1]}}, "cfg.inner.names[0]: expected a string"),
        ({"path": 3}, "cfg.path"),
    ],
)
def test_from_dict_errors_name_the_key(data: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        from_dict(_Outer, data, where="cfg")


def test_tiny_recipe_loads_and_round_trips(tmp_path: Path) -> None:
    assert "tiny" in recipe_names()
    cfg = load_config("tiny")
    assert isinstance(cfg, RunConfig)
    assert cfg.model.encoder.name == "timm_vit" and cfg.model.projector.name == "mlp"
    save_config(cfg, tmp_path)
    again = load_config(str(tmp_path / "config.yaml"))
    assert to_dict(again) == to_dict(cfg)
    assert yaml.safe_load((tmp_path / "config.yaml").read_text()) == to_dict(cfg)


def test_overrides_are_dotted_and_typed() -> None:
    cfg = load_config("tiny", ["train.steps=7", "model.llm.arch.num_hidden_layers=1", "model.encoder.layers=[-1, -2]"])
    assert cfg.train.steps == 7
    assert cfg.model.llm.arch["num_hidden_layers"] == 1
    assert cfg.model.encoder.cfg.layers == [-1, -2]
    assert apply_overrides({"a": {"b": 1}}, ["a.c=x"]) == {"a": {"b": 1, "c": "x"}}
    assert apply_overrides({}, ["lr=1e-3", "n=2", "s=nan-ish"]) == {"lr": 1e-3, "n": 2, "s": "nan-ish"}
    with pytest.raises(ConfigError) as err:
        apply_overrides({}, ["novalue"])
    assert str(err.value) == "--set novalue: expected KEY=VALUE with a dotted key, e.g. train.steps=100"
    assert apply_overrides({"h": [{"w": 1}, {"w": 2}]}, ["h[1].w=3", "h.0.w=4"]) == {"h": [{"w": 4}, {"w": 3}]}
    with pytest.raises(ConfigError) as err:
        apply_overrides({"h": [{"w": 1}]}, ["h[2].w=3"])
    assert str(err.value) == "--set h[2].w=3: h is a list of 1; expected an index below 1, got '2'"


def test_malformed_yaml_names_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  encoder: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: malformed YAML \(line"):
        load_config(str(bad))


def test_wrong_key_in_recipe_file(tmp_path: Path) -> None:
    data = yaml.safe_load(Path(load_config.__code__.co_filename).with_name("recipes").joinpath("tiny.yaml").read_text())
    data["train"]["stpes"] = 3
    path = tmp_path / "typo.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=r"typo.yaml.*train.stpes: unknown key for TrainConfig"):
        load_config(str(path))


def test_unknown_part_name_lists_valid_ones(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_config("tiny", ["model.projector={name: mlpp}"])
    assert str(err.value) == ("--set model.projector={name: mlpp}: model.projector.name: unknown projector 'mlpp'; "
                              "did you mean 'mlp'? (expected one of: linear, mlp, pool_adapter, pyramid)")


def test_an_error_names_where_the_value_came_from(tmp_path: Path) -> None:
    tiny = str(RECIPES_DIR / "tiny.yaml")
    with pytest.raises(ConfigError) as err:
        load_config("tiny", ["train.stpes=1"])
    assert str(err.value) == (
        "--set train.stpes=1: train.stpes: unknown key for TrainConfig; did you mean 'steps'? (expected one of: "
        + ", ".join(f.name for f in dataclasses.fields(TrainConfig)) + ")"
    )
    (tmp_path / "child.yaml").write_text("base: tiny\ntrain:\n  lr: fast\n")
    with pytest.raises(ConfigError) as err:
        load_config(str(tmp_path / "child.yaml"))
    assert str(err.value) == f"{tmp_path / 'child.yaml'}: train.lr: expected a number, got 'fast'"
    with pytest.raises(ConfigError) as err:  # a key the child does not touch is blamed on the base that wrote it
        load_config(str(tmp_path / "child.yaml"), ["train.lr=1e-3", "model.encoder.depth=0.5"])
    assert str(err.value) == "--set model.encoder.depth=0.5: model.encoder.depth: expected an integer, got 0.5"
    (tmp_path / "child.yaml").write_text("base: tiny\nmodel:\n  encoder:\n    name: timm_vit\n    dpeth: 2\n")
    with pytest.raises(ConfigError, match=r"child.yaml: model.encoder.dpeth: unknown key for TimmViTConfig; did you "
                                          r"mean 'depth'\?"):
        load_config(str(tmp_path / "child.yaml"))
    with pytest.raises(ConfigError) as err:
        load_config("tiny", ["model.aux_heads[0].weight=-1"])
    assert str(err.value).startswith("--set model.aux_heads[0].weight=-1: model.aux_heads[0]: object_heads: expected")
    assert tiny.endswith("tiny.yaml")


def test_yaml_numbers_are_numbers_in_files_and_overrides(tmp_path: Path) -> None:
    (tmp_path / "r.yaml").write_text("base: tiny\ntrain:\n  lr: 2e-5\n  weight_decay: 1e-0\n  min_lr_ratio: 1E-1\n")
    cfg = load_config(str(tmp_path / "r.yaml"), ["train.grad_clip=5e-1"])
    assert (cfg.train.lr, cfg.train.weight_decay, cfg.train.min_lr_ratio, cfg.train.grad_clip) == (2e-5, 1.0, 0.1, 0.5)
    assert load_yaml("a: 1e3\nb: '1e3'\nc: 1_000\nd: .5\ne: v1e3", "x") == {
        "a": 1000.0, "b": "1e3", "c": 1000, "d": 0.5, "e": "v1e3"}


def test_tokenizer_numbers_is_checked() -> None:
    assert load_config("tiny", ["model.tokenizer_numbers=digits"]).model.tokenizer_numbers == "digits"
    with pytest.raises(ConfigError) as err:
        load_config("tiny", ["model.tokenizer_numbers=bytes"])
    assert str(err.value) == ("--set model.tokenizer_numbers=bytes: model.tokenizer_numbers: expected one of "
                              "['digits', 'whole'], got 'bytes'")
    with pytest.raises(ConfigError, match=r"^--set model.loss_reduction=row: model.loss_reduction: expected one of "
                                          r"\['token', 'sample'\], got .row.$"):
        load_config("tiny", ["model.loss_reduction=row"])


def test_recipe_inherits_its_base(tmp_path: Path) -> None:
    (tmp_path / "wide.yaml").write_text("base: tiny\nmodel:\n  llm:\n    arch:\n      hidden_size: 192\ntrain:\n  lr: 1.0e-3\n")
    (tmp_path / "fused.yaml").write_text(
        "base: wide.yaml\nmodel:\n  projector: {name: linear}\n  encoder:\n    name: fused\n"
        "    towers: [{name: timm_vit, model_name: vit_tiny_patch16_224, image_size: 64, patch_size: 16}]\n"
        "    fusion: {name: concat}\n"
    )
    tiny, wide = to_dict(load_config("tiny")), to_dict(load_config(str(tmp_path / "wide.yaml")))
    assert wide["model"]["llm"]["arch"] == {**tiny["model"]["llm"]["arch"], "hidden_size": 192}  # merged key by key
    assert wide["train"] == {**tiny["train"], "lr": 1e-3} and wide["data"] == tiny["data"]
    fused = load_config(str(tmp_path / "fused.yaml"))  # a base given as a path, relative to the recipe
    assert fused.model.llm.arch["hidden_size"] == 192 and fused.train.lr == 1e-3
    assert fused.model.encoder.name == "fused"  # another part replaces tiny's encoder mapping whole
    assert not hasattr(fused.model.encoder.cfg, "stem") and fused.model.projector.name == "linear"


def test_bad_recipe_bases(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match=r"b.yaml: base: a.yaml leads back to .*a.yaml \(a cycle of bases\)"):
        load_config(str(tmp_path / "a.yaml"))
    (tmp_path / "c.yaml").write_text("base: [tiny]\n")
    with pytest.raises(ConfigError, match=r"c.yaml: base: expected a recipe name or a YAML path, got \['tiny'\]"):
        load_config(str(tmp_path / "c.yaml"))
    (tmp_path / "d.yaml").write_text("base: tinyy\n")
    with pytest.raises(ConfigError, match="unknown recipe 'tinyy'"):
        load_config(str(tmp_path / "d.yaml"))


def test_unknown_recipe_and_missing_file() -> None:
    with pytest.raises(ConfigError) as err:
        load_config("nope")
    assert str(err.value) == f"unknown recipe 'nope' (expected one of: {', '.join(recipe_names())}, or a YAML path)"
    with pytest.raises(ConfigError, match=r"^unknown recipe 'tinyy'; did you mean 'tiny'\? \(expected one of"):
        load_config("tinyy")
    with pytest.raises(ConfigError, match="missing.yaml: config file not found"):
        load_config("missing.yaml")


def test_a_run_folder_named_like_a_recipe_does_not_hide_the_recipe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "tiny").mkdir()  # e.g. the output of `mllm train tiny --out tiny`
    monkeypatch.chdir(tmp_path)
    assert resolve_recipe("tiny") == RECIPES_DIR / "tiny.yaml"


def test_registry_contract() -> None:
    reg: Registry[object] = Registry("widget")
    reg.register("a", "collections:OrderedDict")
    with pytest.raises(ValueError, match="already registered"):
        reg.register("a", dict)
    with pytest.raises(RegistryError, match="unknown widget 'b'; expected one of: a"):
        reg.get("b")
    import collections

    assert reg.get("a") is collections.OrderedDict
    for table in (ENCODERS, PROJECTORS):
        for name in table.names():
            cls = table.get(name)
            assert hasattr(cls, "config_cls"), f"{table.kind} {name} lacks config_cls"
