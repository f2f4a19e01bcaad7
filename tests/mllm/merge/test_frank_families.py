"""FRANK on MLLM folders as transformers saves them, and InternVL's original layout, with no name_map.

Per family: the MLLM is a tiny random model of tests/hf_families.py (V = theta_0 + tau_V); the base
theta_0 and the reasoner R = theta_0 + tau_R are plain causal LMs of the family's LLM type, built from
the MLLM's language-model tensors under the plain names (loaded into the transformers class, so the names
and shapes are transformers'). The merge YAML names no name_map. Checks: the merged decoder blocks equal
Eq. 13 (Wei & Chen, 2025, arXiv 2505.16151) computed here from the three folders, every other tensor is
byte-identical to the MLLM's, the output carries the MLLM's config, processor, tokenizer and chat
template, loads with AutoModelForImageTextToText + AutoProcessor with no missing or unused weight, and
generates; a block whose shape differs is refused in one line naming the folder, tensor and both shapes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from hf_families import IMAGES, LM, MAX_NEW, save_family
from safetensors.torch import save_file

from mllm.merge import MergeError, load_plan, run_merge
from mllm.merge.engine import open_readers
from mllm.merge.families import detect_name_map, with_detected_names
from mllm.merge.tensors import ModelReader

# family -> (plain LLM model_type, where the MLLM file keeps the LLM's "model." tensors, and its lm_head.;
# None: tied to the embeddings, not saved). Written from what transformers 5.x's save_pretrained writes.
FAMILIES: dict[str, tuple[str, str, str | None]] = {
    "llava": ("llama", "language_model.model.", "language_model.lm_head."),
    "llava_onevision": ("qwen2", "language_model.model.", "language_model.lm_head."),
    "qwen2_vl": ("qwen2", "model.", "lm_head."),
    "qwen2_5_vl": ("qwen2", "model.", "lm_head."),
    "qwen3_vl": ("qwen3", "model.language_model.", "lm_head."),
    "idefics3": ("llama", "model.text_model.", "lm_head."),
    "smolvlm": ("llama", "model.text_model.", "lm_head."),
    "internvl": ("qwen2", "language_model.model.", None),
    "gemma3": ("gemma3_text", "language_model.model.", None),
    "internvl_chat": ("qwen2", "language_model.model.", "language_model.lm_head."),  # InternVL's own layout
}
SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
         "num_key_value_heads", "head_dim", "query_pre_attn_scalar", "sliding_window")
VOCAB = ("model.embed_tokens.weight", "lm_head.weight")
IMAGE_ROWS = 4  # the plain LLMs' vocabulary is this much shorter than the MLLM's (whose image tokens come last)
SIDE_FILES = ("config.json", "chat_template.jinja", "processor_config.json", "tokenizer.json", "tokenizer_config.json")


def mllm_name(plain: str, family: str) -> str:
    """A plain causal LM's tensor name as the family's MLLM file holds it."""
    _, blocks, head = FAMILIES[family]
    if plain.startswith("lm_head."):
        assert head is not None
        return head + plain.removeprefix("lm_head.")
    return blocks + plain.removeprefix("model.")


def _plain_names(names: Any, family: str) -> list[str]:
    """The plain causal LM's names of the MLLM's language-model tensors among ``names``."""
    _, blocks, head = FAMILIES[family]
    return [("lm_head." + n.removeprefix(head)) if head and n.startswith(head) else "model." + n.removeprefix(blocks)
            for n in names if (head and n.startswith(head)) or n.startswith(blocks)]


def state_of(path: Path) -> dict[str, torch.Tensor]:
    r = ModelReader(path)
    return {n: r.get(n) for n in r.names()}


def save_internvl_chat(folder: Path) -> Path:
    """InternVL's original checkpoint layout, which transformers cannot load (remote code): a Qwen2 LLM's
    tensors under ``language_model.``, InternViT tensors under ``vision_model.`` (as many encoder layers
    as the LLM has decoder layers, so only the token embeddings tell the two apart) and the ``mlp1``
    projector."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    llm = Qwen2ForCausalLM(Qwen2Config(**LM, vocab_size=300, tie_word_embeddings=False))
    state = {f"language_model.{k}": v.contiguous() for k, v in llm.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    fake = {"vision_model.embeddings.patch_embedding.weight": (16, 3, 8, 8), "mlp1.0.weight": (64,),
            "mlp1.1.weight": (32, 64), "mlp1.1.bias": (32,)}
    fake |= {f"vision_model.encoder.layers.{i}.{t}": (48, 16) for i in range(LM["num_hidden_layers"])
             for t in ("attn.qkv.weight", "mlp.fc1.weight")}
    state |= {k: torch.randn(shape, generator=g) for k, shape in fake.items()}
    folder.mkdir(parents=True)
    save_file(state, folder / "model.safetensors")
    config = {"model_type": "internvl_chat", "architectures": ["InternVLChatModel"], "template": "internvl2_5",
              "llm_config": llm.config.to_dict(), "vision_config": {"model_type": "intern_vit_6b", "hidden_size": 16,
                                                                    "num_hidden_layers": LM["num_hidden_layers"]}}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def save_plain(folder: Path, family: str, text: dict[str, Any], state: dict[str, torch.Tensor]) -> Path:
    """A plain causal LM of the family's LLM type with the MLLM's text sizes, holding ``state`` (plain names;
    strict loading: the names and shapes are the transformers class's own)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type, _, head = FAMILIES[family]
    config = AutoConfig.for_model(model_type, **{k: text[k] for k in SIZES if k in text},
                                  tie_word_embeddings=head is None)
    model = AutoModelForCausalLM.from_config(config)
    if head is None:
        state = {**state, "lm_head.weight": state["model.embed_tokens.weight"]}
    model.load_state_dict(state, strict=True)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One family's MLLM V, base theta_0 = V's LLM - tau_V and reasoner R = theta_0 + tau_R (the block
    task vectors scaled per layer, so lambda_V differs between blocks), and their FRANK merge."""
    name = request.param
    root = tmp_path_factory.mktemp(name)
    mllm = save_internvl_chat(root / "mllm") if name == "internvl_chat" else save_family(name, root / "mllm")
    v = state_of(mllm)
    plain = {p: mllm_name(p, name) for p in _plain_names(v, name)}  # plain name -> the MLLM's
    g = torch.Generator().manual_seed(5)

    def tau(p: str, scale: float) -> torch.Tensor:
        depth = int(p.split(".")[2]) + 1 if p.startswith("model.layers.") else 1
        return scale * depth * torch.randn(v[plain[p]].shape, generator=g)

    base = {p: v[n] - tau(p, 0.02) for p, n in plain.items()}
    base = {p: t[:-IMAGE_ROWS] if p in VOCAB else t for p, t in base.items()}
    reasoner = {p: t + tau(p, 0.05 if p.startswith("model.layers.0.") else 0.01)[:len(t)] for p, t in base.items()}
    text = dict(ModelReader(mllm).config.get("text_config") or ModelReader(mllm).config["llm_config"])
    text["vocab_size"] -= IMAGE_ROWS
    folders = {"mllm": mllm, "base": save_plain(root / "base", name, text, base),
               "reasoner": save_plain(root / "reasoner", name, text, reasoner)}
    yaml_path = root / "frank.yaml"
    yaml_path.write_text(json.dumps({"merge_method": "frank", "base_model": str(folders["base"]),
                                     "models": [{"model": str(mllm)}, {"model": str(folders["reasoner"])}]}))
    return {"name": name, **folders, "yaml": yaml_path, "out": run_merge(yaml_path, root / "out"), "plain": plain}


def test_detected_name_map_turns_the_mllm_names_into_the_llm_names(family: dict[str, Any]) -> None:
    plan = load_plan(family["yaml"])
    plan = with_detected_names(plan, open_readers(plan))
    mapped = {plan.canonical(n): n for n in ModelReader(family["mllm"]).names()}
    base = set(ModelReader(family["base"]).names()) - ({"lm_head.weight"} if FAMILIES[family["name"]][2] is None else set())
    assert {p: mapped.get(p) for p in base} == {p: family["plain"][p] for p in base}


def test_merged_blocks_are_eq13_and_everything_else_is_the_mllms(family: dict[str, Any]) -> None:
    merged, v = state_of(family["out"]), state_of(family["mllm"])
    b, r = state_of(family["base"]), state_of(family["reasoner"])
    assert merged.keys() == v.keys()
    layers = LM["num_hidden_layers"]
    lambdas, merged_names = [], set()
    for layer in range(layers):
        block = [p for p in b if p.startswith(f"model.layers.{layer}.")]
        tau_v = {p: v[mllm_name(p, family["name"])] - b[p] for p in block}
        tau_r = {p: r[p] - b[p] for p in block}
        nv, nr = (sum(float((t ** 2).sum()) for t in tau.values()) for tau in (tau_v, tau_r))
        lam = nv / (nv + nr)  # Eq. 13
        lambdas.append(lam)
        for p in block:
            name = mllm_name(p, family["name"])
            assert torch.allclose(merged[name], b[p] + lam * tau_v[p] + (1 - lam) * tau_r[p], atol=1e-6), name
            merged_names.add(name)
    assert lambdas[0] < 0.5 < lambdas[-1]  # the reasoner moved block 0 most, the MLLM the last block
    doc = json.loads((family["out"] / "frank_coefficients.json").read_text())
    assert [row["lambda_V"] for row in doc["layers"]] == pytest.approx(lambdas, rel=1e-5)
    assert sum(".layers." in n and n.startswith(FAMILIES[family["name"]][1]) for n in v) == len(merged_names)
    for n in v.keys() - merged_names:  # vision tower, projector, embeddings with the image tokens, norm, lm_head
        assert merged[n].dtype == v[n].dtype and merged[n].view(torch.uint8).equal(v[n].view(torch.uint8)), n


@pytest.mark.parametrize("family", sorted(set(FAMILIES) - {"internvl_chat"}), indirect=True)  # needs remote code
def test_output_has_the_mllms_files_loads_and_generates(family: dict[str, Any]) -> None:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from mllm.hf_native import NativeMLLM

    out = family["out"]
    for f in SIDE_FILES:
        assert (out / f).read_bytes() == (family["mllm"] / f).read_bytes(), f
    model, info = AutoModelForImageTextToText.from_pretrained(out, local_files_only=True, output_loading_info=True)
    assert type(model) is type(AutoModelForImageTextToText.from_pretrained(family["mllm"], local_files_only=True))
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    answer = NativeMLLM(model, AutoProcessor.from_pretrained(out, local_files_only=True)).generate_ids(
        IMAGES[:1], ["<image>\nwhat colour is the circle?"], max_new_tokens=MAX_NEW, min_new_tokens=MAX_NEW)
    assert answer.shape == (1, MAX_NEW)


@pytest.mark.parametrize("family", ["llava"], indirect=True)
def test_dry_run_shows_the_name_map_it_found(family: dict[str, Any], tmp_path: Path, capsys) -> None:
    run_merge(family["yaml"], tmp_path / "out", dry_run=True)
    lines = capsys.readouterr().out.splitlines()
    assert lines[1] == r"# name_map: ^language_model\.model\. -> model., ^language_model\.lm_head\. -> lm_head."
    q = "language_model.model.layers.1.self_attn.q_proj.weight"
    assert next(x for x in lines if x.startswith(q + " ")).startswith(
        f"{q} [32, 32] float32 <- frank t=1 [{family['mllm']}:{q}, {family['reasoner']}:model.layers.1.self_attn."
        f"q_proj.weight; base {family['base']}:model.layers.1.self_attn.q_proj.weight] ")


def _edited_reasoner(family: dict[str, Any], folder: Path, edit: str) -> Path:
    """A copy of the reasoner with block 1's up_proj one row short (``shape``), or block 1 gone (``layers``)."""
    state = state_of(family["reasoner"])
    if edit == "shape":
        state["model.layers.1.mlp.up_proj.weight"] = state["model.layers.1.mlp.up_proj.weight"][1:].clone()
    else:
        state = {k: t for k, t in state.items() if not k.startswith("model.layers.1.")}
    folder.mkdir()
    save_file(state, folder / "model.safetensors")
    shutil.copy(family["reasoner"] / "config.json", folder / "config.json")
    return folder


# one family whose text model_type differs from its LLM's (qwen2_vl_text / qwen2), one whose does not
@pytest.mark.parametrize("family", ["llava", "qwen2_vl"], indirect=True)
@pytest.mark.parametrize("edit", ["shape", "layers"])
def test_a_block_that_differs_is_refused_naming_folder_tensor_and_shapes(family: dict[str, Any], tmp_path: Path,
                                                                          edit: str) -> None:
    bad = _edited_reasoner(family, tmp_path / "reasoner", edit)
    cfg = tmp_path / "frank.yaml"
    cfg.write_text(family["yaml"].read_text().replace(str(family["reasoner"]), str(bad)))
    up = "model.layers.1.mlp.up_proj.weight"
    want = (f"{bad / 'model.safetensors'}: tensor '{up}' of decoder block 1 has shape [63, 32], the reference's "
            f"'{mllm_name(up, family['name'])}' in {family['mllm'] / 'model.safetensors'} has [64, 32]"
            if edit == "shape" else f"{bad}: number of decoder blocks 1, the reference {family['mllm']} has 2")
    with pytest.raises(MergeError) as err:
        run_merge(cfg, tmp_path / "out")
    assert str(err.value) == want
    assert not (tmp_path / "out").exists()


def _two_prefixes(folder: Path, layers: int) -> ModelReader:
    """``a.`` holds token embeddings and 2 blocks, ``b.`` embeddings and ``layers``; the text config says ``layers``."""
    names = ["a.embed_tokens.weight", "a.layers.0.w", "a.layers.1.w", "a.lm_head.weight", "lm_head.weight",
             "b.embed_tokens.weight", *(f"b.layers.{i}.w" for i in range(layers))]
    folder.mkdir()
    save_file({n: torch.zeros(2) for n in names}, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({"text_config": {"num_hidden_layers": layers}}))
    return ModelReader(folder)


def test_the_text_configs_layer_count_picks_the_prefix_and_a_tie_is_refused(tmp_path: Path) -> None:
    # b.'s head is the top-level lm_head (a.lm_head does not enclose b.): already the LLM's name
    assert [(p.pattern, r) for p, r in detect_name_map(_two_prefixes(tmp_path / "one", 1))] == [(r"^b\.", "model.")]
    with pytest.raises(MergeError) as err:
        detect_name_map(_two_prefixes(tmp_path / "two", 2))
    assert str(err.value) == (f"{tmp_path / 'two'}: the language model's decoder blocks could be under any of "
                              f"['a.', 'b.']; set name_map in the merge YAML")


@pytest.mark.parametrize("family", ["qwen3_vl"], indirect=True)
def test_an_mllm_that_is_not_the_reference_is_refused_with_a_hint(family: dict[str, Any], tmp_path: Path) -> None:
    cfg = tmp_path / "frank.yaml"  # the reasoner listed first: it is the reference, whose names need no map
    cfg.write_text(json.dumps({"merge_method": "frank", "base_model": str(family["base"]),
                               "models": [{"model": str(family["reasoner"])}, {"model": str(family["mllm"])}]}))
    with pytest.raises(MergeError, match=f"^{family['mllm']}: number of decoder blocks 0, the reference "
                                         f"{family['reasoner']} has 2 .*make the MLLM the reference"):
        run_merge(cfg, tmp_path / "out")
